"""Running a model over a loader: the class probabilities and targets of every sample, for validation and evaluate."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.runtime import autocast, scores_from_logits


@torch.no_grad()
def collect_scores(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    task: str,
    mean: list[float],
    std: list[float],
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta_flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (softmax or sigmoid by task) and targets for every sample the loader yields.

    The loader yields uint8 batches; `mean`/`std` are the normalisation the model was trained with.
    """
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    all_scores, all_targets = [], []
    for images, targets in loader:
        images = to_model_input(images, device, mean, std, memory_format)
        with autocast(device, amp_dtype):
            logits = model(images)
            if tta_flip:
                logits = (logits + model(images.flip(-1))) / 2
        scores = scores_from_logits(logits, task)
        all_scores.append(scores.cpu().numpy())
        all_targets.append(targets.numpy())
    if not all_scores:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(all_scores), np.concatenate(all_targets)
