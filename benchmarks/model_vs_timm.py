"""Our TResNet vs timm's, same run, CPU: eval img/s, train img/s, activation bytes saved for backward, and the
peak memory of a high-resolution training step with and without activation checkpointing.

    python benchmarks/model_vs_timm.py [--model tresnet_m] [--batch 8] [--size 224] [--iters 5] [--threads 1]
                                       [--weights FILE] [--high-res-size 448] [--high-res-batch 8]
                                       [--high-res-iters 3] [--high-res-only | --skip-high-res]

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

High-resolution rows (TResNet-M 448 px, batch 8 by default): ours, ours with `set_grad_checkpointing(True)`, timm,
timm with its own `set_grad_checkpointing(True)`. Peak memory of one training step (forward, backward, gradients
freed) above what the process held before it, measured the same way for each: in a fresh process per variant, after
one warm-up step, the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and read back after the step
(VmHWM), with glibc told to return every freed block above 128 KiB to the system (MALLOC_MMAP_THRESHOLD_), so that
RSS follows the bytes actually alive. Linux only. Step time: CPU time, interleaved, median of --high-res-iters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from timing import interleaved_seconds

from tresfinetune.throughput import proc_bytes, reset_peak_rss


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


HIGH_RES_VARIANTS = ("ours", "ours+checkpointing", "timm", "timm+checkpointing")


def build_pair(name: str, weights: str | None) -> dict[str, torch.nn.Module]:
    """Our model and timm's with the same weights (ours converted to timm's layout)."""
    import timm

    from tresfinetune.models import create_model, ours_to_timm

    ours = create_model(name, num_classes=1000, slopes="timm", weights=weights)
    reference = timm.create_model(name, num_classes=1000)
    reference.load_state_dict(ours_to_timm(ours.state_dict()))
    return {"ours": ours, "timm": reference}


def high_res_model(variant: str, weights: str | None, name: str) -> torch.nn.Module:
    """One of HIGH_RES_VARIANTS, from the same seed (and so the same weights) each time."""
    torch.manual_seed(0)
    model = build_pair(name, weights)[variant.split("+")[0]]
    model.set_grad_checkpointing(variant.endswith("+checkpointing"))
    return model.train()


def step_peak_bytes(args: argparse.Namespace) -> int:
    """In this (fresh) process: peak RSS of one training step of args.peak_of above the RSS just before it."""
    torch.set_num_threads(args.threads)
    model = high_res_model(args.peak_of, args.weights, args.model)
    x = torch.rand(args.high_res_batch, 3, args.high_res_size, args.high_res_size)
    y = torch.randint(0, 1000, (args.high_res_batch,))
    train_step(model, x, y)  # warm-up: one-time allocations (kernel workspaces, caches) happen here
    before = proc_bytes("/proc/self/status", "VmRSS")
    if before is None or not reset_peak_rss():
        raise OSError("this system does not expose the peak RSS (/proc/self/status VmHWM, /proc/self/clear_refs)")
    train_step(model, x, y)
    return proc_bytes("/proc/self/status", "VmHWM") - before


def high_res_peaks(args: argparse.Namespace) -> dict[str, float | None]:
    """MiB per variant, each measured by this script in a fresh process; None where it could not be measured."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    peaks: dict[str, float | None] = {}
    for variant in HIGH_RES_VARIANTS:
        command = [sys.executable, __file__, "--peak-of", variant, "--model", args.model, "--threads",
                   str(args.threads), "--high-res-size", str(args.high_res_size), "--high-res-batch",
                   str(args.high_res_batch)] + (["--weights", args.weights] if args.weights else [])
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        peaks[variant] = json.loads(lines[-1])["peak_bytes"] / 2**20 if done.returncode == 0 and lines else None
        if peaks[variant] is None:
            print(f"{variant}: peak not measured: {done.stderr.strip().splitlines()[-1:]}")
    return peaks


def high_res_table(args: argparse.Namespace, clock) -> None:
    variants = {variant: high_res_model(variant, args.weights, args.model) for variant in HIGH_RES_VARIANTS}
    x = torch.rand(args.high_res_batch, 3, args.high_res_size, args.high_res_size)
    y = torch.randint(0, 1000, (args.high_res_batch,))
    steps = {name: (lambda m=m: train_step(m, x, y)) for name, m in variants.items()}
    interleaved_seconds(steps, 1, clock)
    seconds = interleaved_seconds(steps, args.high_res_iters, clock)
    del variants, steps
    peaks = high_res_peaks(args)

    print(f"\n{args.model}, {args.high_res_size}px, batch {args.high_res_batch}, float32: peak memory of a training "
          f"step above the model's own (fresh process each, VmHWM), step time median of {args.high_res_iters}")
    print(f"| {'variant':<20} | {'peak MiB':>9} | {'x timm':>7} | {'step s':>7} | {'x ours':>7} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for variant in HIGH_RES_VARIANTS:
        peak, timm_peak = peaks[variant], peaks["timm"]
        ratio = "n/a" if peak is None or timm_peak is None else f"{peak / timm_peak:.3f}"
        print(f"| {variant:<20} | {'n/a' if peak is None else f'{peak:.0f}':>9} | {ratio:>7} | "
              f"{seconds[variant]:>7.2f} | {seconds[variant] / seconds['ours']:>7.3f} |")
    if None not in peaks.values():
        ours, checkpointed = peaks["ours"], peaks["ours+checkpointing"]
        goals = [
            ("ours+checkpointing / timm", checkpointed / peaks["timm"], "<= 0.30"),
            ("ours+checkpointing / timm+checkpointing", checkpointed / peaks["timm+checkpointing"], "< 1"),
            ("step time ours+checkpointing / ours", seconds["ours+checkpointing"] / seconds["ours"], "<= 1.3"),
            ("ours / timm (no checkpointing)", ours / peaks["timm"], "<= 0.8"),
        ]
        for label, value, goal in goals:
            print(f"{label}: {value:.3f} (goal {goal})")


def main() -> None:
    import timm

    from tresfinetune.models.norm import KEEP_INPUT_RATIO

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tresnet_m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="time with wall clock instead of CPU time")
    parser.add_argument("--weights", help="a TResNet weights file for both models (default: random init)")
    parser.add_argument("--high-res-size", type=int, default=448)
    parser.add_argument("--high-res-batch", type=int, default=8)
    parser.add_argument("--high-res-iters", type=int, default=3)
    parser.add_argument("--high-res-only", action="store_true", help="only the high-resolution memory rows")
    parser.add_argument("--skip-high-res", action="store_true", help="leave the high-resolution rows out")
    parser.add_argument("--peak-of", choices=HIGH_RES_VARIANTS, help=argparse.SUPPRESS)  # the measuring process
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    if args.peak_of:
        print(json.dumps({"peak_bytes": step_peak_bytes(args)}))
        return
    torch.set_num_threads(args.threads)
    if args.high_res_only:
        high_res_table(args, clock)
        return
    torch.manual_seed(0)

    models = build_pair(args.model, args.weights)
    ours = models["ours"]
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
    if not args.skip_high_res:
        del models, eval_steps, train_steps
        high_res_table(args, clock)


if __name__ == "__main__":
    main()
