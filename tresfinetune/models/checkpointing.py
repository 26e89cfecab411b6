"""Activation checkpointing of TResNet's body: keep each segment's input, recompute the rest in backward.

The body runs as a chain of segments: the stem, each stage's residual blocks in groups of `BLOCKS_PER_SEGMENT`,
and the last stage (at 1/32 of the input side), which runs without checkpointing. In training only each
checkpointed segment's input stays alive; backward reruns one segment at a time to rebuild what its own backward
needs. The native norm helps twice over: inside a segment it saves only its output, which is the next
conv's saved input anyway, and the segment's input is the first conv's saved input, so nothing is held twice.
Recomputation replays each norm layer's choices and leaves the running statistics alone (see norm.py).

Longer segments keep fewer inputs but recompute more at once. Peak memory of a TResNet-M training step at 448 px,
batch 8, float32, CPU (benchmarks/model_vs_timm.py --high-res-only measures it): no checkpointing 1551 MiB; blocks
per segment 1: 573, 2: 483, 3: 522, 4: 573 (groups crossing stage boundaries did no better). Two it is. Leaving the
last stage out of checkpointing kept the peak at 484 MiB and took the step time from 1.31x to 1.23x the
non-checkpointed step's (interleaved CPU time): its backward comes first, when every kept input is still held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tresfinetune.models.norm import replayable_forward

BLOCKS_PER_SEGMENT = 2


def body_segments(body: nn.Sequential, blocks_per_segment: int = BLOCKS_PER_SEGMENT) -> list[list[nn.Module]]:
    """The stem (space-to-depth and conv1), each stage's blocks in groups, then the whole last stage.

    The last segment is not checkpointed (see checkpointed_forward).
    """
    segments: list[list[nn.Module]] = [[]]
    stages = [list(module) for name, module in body.named_children() if name.startswith("layer")]
    segments[0] = [module for name, module in body.named_children() if not name.startswith("layer")]
    for blocks in stages[:-1]:
        segments += [blocks[i:i + blocks_per_segment] for i in range(0, len(blocks), blocks_per_segment)]
    return segments + stages[-1:]


def _run(modules: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        for module in modules:
            x = module(x)
        return x

    return forward


def checkpointed_forward(segments: list[list[nn.Module]], x: torch.Tensor) -> torch.Tensor:
    """The segments applied in turn, each but the last under torch.utils.checkpoint (non-reentrant).

    Backward starts with the last segment, at a moment when every segment input is held anyway: recomputing it
    would cost time and save nothing.
    """
    *checkpointed, last = segments
    for modules in checkpointed:
        # No random ops in the body (ML-Decoder's dropout is in the head): no RNG state to stash and restore.
        if torch.compiler.is_compiling():
            # The compiler rejects custom contexts; there the norm runs as plain batch norm, with nothing to replay,
            # and the compiled graph updates the running statistics once.
            x = checkpoint(_run(modules), x, use_reentrant=False, preserve_rng_state=False)
        else:
            x = checkpoint(_run(modules), x, use_reentrant=False, preserve_rng_state=False,
                           context_fn=replayable_forward)
    return _run(last)(x)
