"""The partial-label loss modes against plain ASL at OpenImages size: forward + backward seconds per batch.

    python benchmarks/partial_loss.py [--batch 64] [--classes 9605] [--unknown 0.99] [--iters 20] [--threads 1]

Logits (batch x classes) with the given share of unknown (-1) targets, as in OpenImages where an image is annotated
for a handful of its 9,605 classes. "asl" is today's loss on the targets with -1 read as 0; "negative", "ignore" and
"selective" wrap it (selective with a prior, so its per-class and top-k rules both run). The loss is a small part
of a training step (TResNet-M at 224, batch 64, runs for seconds on a CPU); this shows what the masking adds.
Timings are interleaved and the median is reported (process CPU time). Not a test: run it by hand.
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_seconds

from tresfinetune.losses import AsymmetricLoss, PartialLabelLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=9605)
    parser.add_argument("--unknown", type=float, default=0.99)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.classes, generator=generator)
    targets = (torch.rand(args.batch, args.classes, generator=generator) < 0.02).float()
    targets[torch.rand(args.batch, args.classes, generator=generator) < args.unknown] = -1
    dense = targets.clamp(min=0)
    prior = torch.rand(args.classes, generator=generator) * 0.1

    losses = {"asl": (AsymmetricLoss(), dense)}
    for mode in ("negative", "ignore", "selective"):
        losses[mode] = (PartialLabelLoss(AsymmetricLoss(), mode), targets)
    losses["selective"][0].set_prior(prior)

    def step(loss: torch.nn.Module, y: torch.Tensor) -> None:
        x = logits.clone().requires_grad_(True)
        loss(x, y).backward()

    steps = {name: (lambda loss=loss, y=y: step(loss, y)) for name, (loss, y) in losses.items()}
    interleaved_seconds(steps, 2)  # warm-up
    seconds = interleaved_seconds(steps, args.iters)
    print(f"batch {args.batch} x {args.classes} classes, {args.unknown:.0%} unknown, {args.threads} thread(s)")
    print(f"{'loss':<10} {'ms/batch':>9} {'vs asl':>7}")
    for name, value in seconds.items():
        print(f"{name:<10} {value * 1e3:>9.2f} {value / seconds['asl']:>6.2f}x")


if __name__ == "__main__":
    main()
