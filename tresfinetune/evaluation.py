"""Running a model over a loader and turning its scores into the validation metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.metrics import mean_average_precision, topk_accuracy
from tresfinetune.runtime import autocast, scores_from_logits
from tresfinetune.tasks import SINGLE_LABEL


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


def compute_metrics(scores: np.ndarray, targets: np.ndarray, task: str, prefix: str = "val_") -> dict[str, float]:
    """top-1/top-5 for single-label, mAP for multi-label; percent."""
    if len(scores) == 0:
        return {}
    if task == SINGLE_LABEL:
        accuracy = topk_accuracy(scores, targets, ks=(1, 5))
        return {f"{prefix}top1": accuracy[1], f"{prefix}top5": accuracy[5]}
    return {f"{prefix}map": mean_average_precision(scores, targets)}


def main_metric(task: str) -> str:
    """The metric that picks the best checkpoint and drives early stopping."""
    return "val_top1" if task == SINGLE_LABEL else "val_map"
