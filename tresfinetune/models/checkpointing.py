"""Activation checkpointing of TResNet's body: keep each segment's input, recompute the rest in backward.

The body runs as a chain of segments (the stem, then each stage's residual blocks in groups of `BLOCKS_PER_SEGMENT`). In
training only each segment's input stays alive; backward reruns one segment at a time to rebuild what its own
backward needs. The native norm helps twice over: inside a segment it saves only its output, which is the next
conv's saved input anyway, and the segment's input is the first conv's saved input, so nothing is held twice.
Recomputation replays each norm layer's choices and leaves the running statistics alone (see norm.py).

Longer segments keep fewer inputs but recompute more at once. Peak memory of a TResNet-M training step at 448 px,
batch 8, float32, CPU (benchmarks/model_vs_timm.py --high-res measures it): no checkpointing 1551 MiB; blocks per
segment 1: 573, 2: 483, 3: 522, 4: 573 (groups crossing stage boundaries did no better); recomputation costs about
one more forward (1.2-1.3x the step time) whatever the grouping. Two it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tresfinetune.models.norm import replayable_forward

BLOCKS_PER_SEGMENT = 2


def body_segments(body: nn.Sequential, blocks_per_segment: int = BLOCKS_PER_SEGMENT) -> list[list[nn.Module]]:
    """The stem (space-to-depth and conv1) as one segment, then each stage's blocks in groups."""
    segments: list[list[nn.Module]] = [[]]
    for name, module in body.named_children():
        if name.startswith("layer"):
            blocks = list(module)
            segments += [blocks[i:i + blocks_per_segment] for i in range(0, len(blocks), blocks_per_segment)]
        else:
            segments[0].append(module)
    return segments


def _run(modules: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        for module in modules:
            x = module(x)
        return x

    return forward


def checkpointed_forward(segments: list[list[nn.Module]], x: torch.Tensor) -> torch.Tensor:
    """The segments applied in turn, each under torch.utils.checkpoint (non-reentrant)."""
    for modules in segments:
        if torch.compiler.is_compiling():
            # The compiler rejects custom contexts; there the norm runs as plain batch norm, with nothing to replay,
            # and the compiled graph updates the running statistics once.
            x = checkpoint(_run(modules), x, use_reentrant=False)
        else:
            x = checkpoint(_run(modules), x, use_reentrant=False, context_fn=replayable_forward)
    return x
