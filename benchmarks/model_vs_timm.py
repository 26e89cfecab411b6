"""Our TResNet vs timm's, same run, CPU: eval img/s, train img/s, activation bytes saved for backward.

    python benchmarks/model_vs_timm.py [--model tresnet_m] [--batch 8] [--size 224] [--iters 5] [--threads 1]
                                       [--weights FILE]

Both models get the same weights (ours converted to timm's layout). Timings are interleaved (ours, timm, ours,
timm, ...) after a warm-up, and the median is reported, so drifting machine load hits both alike. Time is the
process's CPU time: with one thread that is the work done, while on a shared machine wall time mostly measures
the neighbours (pass --wall to use it anyway). Saved bytes are
counted exactly with torch.autograd.graph.saved_tensors_hooks over one training forward: every tensor autograd
keeps, deduplicated by storage (a tensor saved by two ops, or views of one buffer, count once), parameters and
buffers excluded; they are counted in float32 and under bf16 autocast. Under 16-bit autocast our norm layers keep
the input of channels whose |bias| / scale is large (see models/norm.py), so that figure depends on the weights:
`--weights FILE` loads a TResNet file (the authors' or timm's) into both models, else both start from our random
initialisation (biases 0: no channel keeps its input). Not a test: run it by hand; it needs timm.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from timing import interleaved_seconds


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> int:
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    autocast = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(x)
    del out
    return sum(storages.values())


def eval_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    import timm

    from tresfinetune.models import create_model, ours_to_timm
    from tresfinetune.models.norm import KEEP_INPUT_RATIO

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tresnet_m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="time with wall clock instead of CPU time")
    parser.add_argument("--weights", help="a TResNet weights file for both models (default: random init)")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = create_model(args.model, num_classes=1000, slopes="timm", weights=args.weights)
    reference = timm.create_model(args.model, num_classes=1000)
    reference.load_state_dict(ours_to_timm(ours.state_dict()))
    models = {"ours": ours, "timm": reference}
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))

    saved = {name: saved_activation_bytes(m, x) for name, m in models.items()}
    saved_bf16 = {name: saved_activation_bytes(m, x, torch.bfloat16) for name, m in models.items()}
    norms = ours.norm_layers()
    kept = sum(int((n.bias.abs() > KEEP_INPUT_RATIO * (n.weight.abs() + n.eps)).sum()) for n in norms)
    channels = sum(n.num_features for n in norms)
    for m in models.values():
        m.eval()
    eval_steps = {name: (lambda m=m: eval_step(m, x)) for name, m in models.items()}
    interleaved_seconds(eval_steps, 1, clock)  # warm-up
    eval_s = interleaved_seconds(eval_steps, args.iters, clock)
    for m in models.values():
        m.train()
    train_steps = {name: (lambda m=m: train_step(m, x, y)) for name, m in models.items()}
    interleaved_seconds(train_steps, 1, clock)
    train_s = interleaved_seconds(train_steps, args.iters, clock)

    print(f"{args.model}, batch {args.batch}, {args.size}px, {args.threads} thread(s), median of {args.iters}, "
          f"{'wall' if args.wall else 'CPU'} time, torch {torch.__version__}, timm {timm.__version__}")
    print(f"| {'metric':<28} | {'ours':>10} | {'timm':>10} | {'ours/timm':>9} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
    rows = [
        ("eval img/s", args.batch / eval_s["ours"], args.batch / eval_s["timm"]),
        ("train img/s (fwd+bwd)", args.batch / train_s["ours"], args.batch / train_s["timm"]),
        ("saved activations (MiB)", saved["ours"] / 2**20, saved["timm"] / 2**20),
        ("saved activations bf16 (MiB)", saved_bf16["ours"] / 2**20, saved_bf16["timm"] / 2**20),
    ]
    for label, a, b in rows:
        print(f"| {label:<28} | {a:>10.2f} | {b:>10.2f} | {a / b:>9.3f} |")
    print(f"bf16: {kept} of {channels} norm channels ({100 * kept / channels:.1f}%) keep their input for backward")


if __name__ == "__main__":
    main()
