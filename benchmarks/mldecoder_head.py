"""ML-Decoder head: the group fully-connected layer as one batched matmul vs the reference's per-group Python loop.

    python benchmarks/mldecoder_head.py [--classes 9605] [--groups 200] [--batch 16] [--iters 5] [--threads 1]
                                        [--model-size 224] [--model-batch 8] [--model-iters 3] [--wall]

Part 1, the head alone at OpenImages size (9605 classes, 200 groups, batch 16; 7x7 and 14x14 feature maps of 2048
channels), forward + backward in training mode (dropout on), including the gradient to the feature map:
- "batched": tresfinetune's MLDecoderHead (torch.bmm over the groups);
- "per-group loop": the same module with its group FC replaced by the reference's loop (a zero tensor filled
  group by group with `out[:, g, :] = h[:, g, :] @ W[g]`). Same weights, same dropout masks (same seed per call).
Both the whole head and its group-FC stage alone (on the decoder's (G, B, E) output) are timed; the outputs and
gradients are checked equal. Part 2: training img/s of the whole TResNet-M (224 px, CPU) with the ML-Decoder head
vs the fc head (80 classes, as COCO), forward + backward + Adam step. Timings interleave the variants after a
warm-up and report medians of process CPU time (--wall: wall time). Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import interleaved_seconds

from tresfinetune.models import MLDecoderHead, create_model


def loop_group_fc(head: MLDecoderHead, t: torch.Tensor) -> torch.Tensor:
    """The reference's group FC: a Python loop over groups writing into a zero tensor (t is (G, B, E))."""
    h = t.transpose(0, 1)  # (B, G, E), as the reference holds it
    pooling = head.decoder.duplicate_pooling
    out = torch.zeros(h.shape[0], h.shape[1], pooling.shape[2], device=h.device, dtype=h.dtype)
    for g in range(h.shape[1]):
        out[:, g, :] = h[:, g, :] @ pooling[g]
    return out.flatten(1)[:, : head.num_classes] + head.decoder.duplicate_pooling_bias


class LoopHead(MLDecoderHead):
    def group_fc(self, t: torch.Tensor) -> torch.Tensor:
        return loop_group_fc(self, t)


def forward_backward(head: MLDecoderHead, features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout masks for both variants
    features.grad = None
    head.zero_grad(set_to_none=True)
    logits = head(features)
    logits.square().mean().backward()
    return logits


def head_table(args: argparse.Namespace, clock) -> None:
    torch.manual_seed(0)
    batched = MLDecoderHead(2048, args.classes, args.groups).train()
    loop = LoopHead(2048, args.classes, args.groups).train()
    loop.load_state_dict(batched.state_dict())
    g, e = batched.groups, batched.embedding
    print(f"ML-Decoder head alone: {args.classes} classes, {g} groups of {batched.decoder.duplicate_pooling.shape[2]}, "
          f"embedding {e}, batch {args.batch}, forward + backward (training mode)")
    print("| feature map | variant | whole head ms | group FC ms | whole-head speed-up | group-FC speed-up |")
    print("|---|---|---|---|---|---|")
    for size in (7, 14):
        features = torch.randn(args.batch, 2048, size, size, requires_grad=True)
        out_b = forward_backward(batched, features)
        grad_b = features.grad.clone()
        out_l = forward_backward(loop, features)
        assert torch.allclose(out_b, out_l, rtol=1e-5, atol=1e-5), "the two heads disagree"
        assert torch.allclose(grad_b, features.grad, rtol=1e-4, atol=1e-6), "the two heads' gradients disagree"
        t = torch.randn(g, args.batch, e, requires_grad=True)

        def fc_step(fc, t=t):
            t.grad = None
            fc(t).square().mean().backward()

        seconds = interleaved_seconds({
            "batched": lambda f=features: forward_backward(batched, f),
            "per-group loop": lambda f=features: forward_backward(loop, f),
            "fc batched": lambda: fc_step(batched.group_fc),
            "fc loop": lambda: fc_step(lambda x: loop_group_fc(loop, x)),
        }, args.iters, clock)
        for name, fc_name in (("per-group loop", "fc loop"), ("batched", "fc batched")):
            whole = seconds["per-group loop"] / seconds[name]
            fc = seconds["fc loop"] / seconds[fc_name]
            print(f"| {size}x{size} | {name} | {seconds[name] * 1e3:.1f} | {seconds[fc_name] * 1e3:.2f} | "
                  f"{whole:.2f}x | {fc:.1f}x |")


def model_table(args: argparse.Namespace, clock) -> None:
    images = torch.rand(args.model_batch, 3, args.model_size, args.model_size)
    targets = (torch.rand(args.model_batch, 80) < 0.1).float()
    steps = {}
    for head in ("fc", "ml_decoder"):
        torch.manual_seed(0)
        model = create_model("tresnet_m", num_classes=80, head=head).train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up
        steps[head] = step
    seconds = interleaved_seconds(steps, args.model_iters, clock)
    print(f"\nTResNet-M training at {args.model_size}px, batch {args.model_batch}, 80 classes (forward + backward + "
          "Adam step)")
    print("| head | img/s | relative to fc |\n|---|---|---|")
    for head in steps:
        print(f"| {head} | {args.model_batch / seconds[head]:.2f} | {seconds['fc'] / seconds[head]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=9605)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-size", type=int, default=224)
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-iters", type=int, default=3)
    parser.add_argument("--skip-model", action="store_true", help="only the head table")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of process CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of "
          f"{'wall' if args.wall else 'process CPU'} time")
    head_table(args, clock)
    if not args.skip_model:
        model_table(args, clock)


if __name__ == "__main__":
    main()
