"""Validation and evaluation metrics; every accuracy-like number is in percent.

Inputs are the scores and targets the training loop or `evaluate` collected over a whole split, as torch
tensors or numpy arrays. Single-label targets are class indices (N,); multi-label targets are rows (N, C) of
1 (positive), 0 (negative) and -1 (unknown: not annotated). Multi-label definitions follow the ASL paper (arXiv
2009.14119): mAP, CP/CR/CF1 and OP/OR/OF1. Unknown entries are left out of every multi-label number, as if that image
were not in the split for that class (SPEC.md section 10).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from tresfinetune.errors import UserError
from tresfinetune.tasks import SINGLE_LABEL

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(values: ArrayLike | Sequence) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.numpy()
    return np.asarray(values)


def _scores_matrix(scores: ArrayLike) -> np.ndarray:
    scores = _to_numpy(scores)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise UserError(f"Expected scores of shape (samples, classes) with at least one sample, got {scores.shape}.")
    if np.isnan(scores).any():
        raise UserError("The model's scores contain NaN; the model has diverged, so check the run's training loss.")
    return scores


def _class_indices(targets: ArrayLike, num_samples: int, num_classes: int) -> np.ndarray:
    targets = _to_numpy(targets)
    if targets.shape != (num_samples,) or not np.issubdtype(targets.dtype, np.integer):
        raise UserError(
            f"Expected {num_samples} integer class labels to go with the scores, got an array of shape "
            f"{targets.shape} and type {targets.dtype}."
        )
    if targets.min() < 0 or targets.max() >= num_classes:
        raise UserError(f"Class labels must lie in 0..{num_classes - 1}; found {targets.min()}..{targets.max()}.")
    return targets


def _label_masks(targets: ArrayLike, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(positive, known) boolean masks of multi-label targets holding 1, 0 or -1 (unknown)."""
    targets = _to_numpy(targets)
    if targets.shape != shape:
        raise UserError(f"Multi-label targets of shape {targets.shape} do not match scores of shape {shape}.")
    if not np.isin(targets, (-1, 0, 1)).all():
        raise UserError("Multi-label targets must be 1 (positive), 0 (negative) or -1 (unknown) for every class.")
    return targets == 1, targets != -1


def _unknowns_last(scores: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Scores with unknown entries at -inf: ranked below every known entry, they change no precision or recall
    of the known ones (scores are probabilities or logits, never -inf themselves)."""
    return scores if known.all() else np.where(known, scores, -np.inf)


def topk_accuracy(logits_or_scores: ArrayLike, targets: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percent of samples whose label is among the k highest scores, for each k in ks.

    A k larger than the number of classes counts as the number of classes (so top-5 of 3 classes is 100%).
    """
    scores = _scores_matrix(logits_or_scores)
    num_samples, num_classes = scores.shape
    labels = _class_indices(targets, num_samples, num_classes)
    if any(k < 1 for k in ks):
        raise UserError(f"Top-k accuracy needs every k >= 1, got {list(ks)}.")
    largest_k = min(max(ks), num_classes)
    top_classes = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), largest_k, dim=1).indices.numpy()
    hit_rank = top_classes == labels[:, None]  # (N, largest_k), at most one True per row
    return {k: float(hit_rank[:, : min(k, num_classes)].any(axis=1).mean() * 100) for k in ks}


def _rank_by_score(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rank every class's samples by descending score. Returns, each of shape (C, N) with one class per row:
    sorted scores, sorted targets, cumulative true positives, and for each rank the last rank of its group of
    tied scores (a tied group is retrieved all at once, so the order inside it does not matter)."""
    # One class per contiguous row: sorting and gathering along rows is ~2x faster than down columns.
    class_scores = np.ascontiguousarray(scores.T)
    order = np.argsort(-class_scores, axis=1)
    sorted_scores = np.take_along_axis(class_scores, order, axis=1)
    sorted_targets = np.take_along_axis(np.ascontiguousarray(targets.T), order, axis=1)
    true_positives = np.cumsum(sorted_targets, axis=1)

    num_samples = scores.shape[0]
    ends_group = np.ones_like(sorted_scores, dtype=bool)
    ends_group[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    # The end of each rank's group is the first group end at or after it: a reversed running minimum.
    group_end = np.where(ends_group, np.arange(num_samples), num_samples - 1)
    group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[:, ::-1]
    return sorted_scores, sorted_targets, true_positives, group_end


def average_precision_per_class(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Non-interpolated average precision of every class, in percent, shape (C,).

    For each class, samples are ranked by score and the precision at the rank of each positive is averaged.
    Tied scores are retrieved together (every positive of a tied group gets the precision at the group's end),
    which makes the result independent of sort order and equal to scikit-learn's average_precision_score.
    Classes with no positive sample have no AP: their entry is NaN, and mean_average_precision skips them.
    Unknown (-1) entries are left out: each class's AP is over the images annotated for it.
    """
    scores = _scores_matrix(scores)
    targets, known = _label_masks(targets, scores.shape)
    _, sorted_targets, true_positives, group_end = _rank_by_score(_unknowns_last(scores, known), targets)
    precision_at_rank = true_positives / np.arange(1, scores.shape[0] + 1)
    precision_at_group_end = np.take_along_axis(precision_at_rank, group_end, axis=1)

    num_positives = targets.sum(axis=0)
    summed = (precision_at_group_end * sorted_targets).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_positives > 0, summed / num_positives * 100, np.nan)


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """mAP in percent: the mean of average_precision_per_class over the classes that have (known) positives."""
    per_class = average_precision_per_class(scores, targets)
    if np.isnan(per_class).all():
        raise UserError("No sample in this split has any positive label, so mAP is undefined; check the labels.")
    return float(np.nanmean(per_class))


def multilabel_threshold_metrics(
    scores: ArrayLike, targets: ArrayLike, thresholds: float | np.ndarray
) -> dict[str, float]:
    """CP, CR, CF1 (per-class precision and recall averaged over classes) and OP, OR, OF1 (over all
    predictions), in percent, predicting a class where its score is >= its threshold.

    thresholds is one number or one per class. Precision of a class with no predicted positives counts as 0;
    classes with no positive samples are left out of CP and CR, as they are of mAP. CF1 = 2 CP CR / (CP + CR).
    Unknown (-1) entries count neither as predictions nor as positives.
    """
    scores = _scores_matrix(scores)
    targets, known = _label_masks(targets, scores.shape)
    thresholds = _to_numpy(thresholds).astype(np.float64)
    if thresholds.ndim > 1 or (thresholds.ndim == 1 and thresholds.shape[0] != scores.shape[1]):
        raise UserError(f"Give one threshold or one per class ({scores.shape[1]}), not {thresholds.shape}.")

    predicted = (scores >= thresholds) & known
    correct = (predicted & targets).sum(axis=0)
    num_predicted = predicted.sum(axis=0)
    num_positives = targets.sum(axis=0)
    has_positives = num_positives > 0
    if not has_positives.any():
        raise UserError("No sample in this split has any positive label, so precision and recall are undefined.")

    precision = np.divide(correct, num_predicted, out=np.zeros(len(correct)), where=num_predicted > 0)
    recall = correct / np.maximum(num_positives, 1)
    class_precision = precision[has_positives].mean() * 100
    class_recall = recall[has_positives].mean() * 100
    overall_precision = correct.sum() / max(num_predicted.sum(), 1) * 100
    overall_recall = correct.sum() / num_positives.sum() * 100
    return {
        "CP": float(class_precision),
        "CR": float(class_recall),
        "CF1": _f1(class_precision, class_recall),
        "OP": float(overall_precision),
        "OR": float(overall_recall),
        "OF1": _f1(overall_precision, overall_recall),
    }


def _f1(precision: float, recall: float) -> float:
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def _best_f1_thresholds(scores: np.ndarray, targets: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Per class, the threshold whose predictions (score >= threshold) on the known entries give the highest F1.

    The threshold lies halfway between the lowest predicted score and the next lower score, so it also works
    with `>`. The first of equal F1 values wins, i.e. the highest such threshold. Classes need positives.
    Unknown entries rank last (at -inf), where predicting more only lowers F1, so no best rank reaches them.
    """
    sorted_scores, _, true_positives, group_end = _rank_by_score(_unknowns_last(scores, known), targets)
    num_samples = scores.shape[0]
    ranks = np.arange(num_samples)
    # Predicting the top r+1 samples: F1 = 2 TP / (predicted + positives); only valid at group ends.
    f1 = 2 * true_positives / (ranks + 1 + targets.sum(axis=0)[:, None])
    f1 = np.where(group_end == ranks, f1, -1.0)
    best_rank = f1.argmax(axis=1)

    classes = np.arange(scores.shape[1])
    lowest_predicted = sorted_scores[classes, best_rank]
    # Scores are probabilities, so below the lowest score the next step down is 0.
    next_rank = np.minimum(best_rank + 1, num_samples - 1)
    next_lower = np.where(best_rank + 1 < num_samples, sorted_scores[classes, next_rank], 0.0)
    next_lower = np.where(np.isneginf(next_lower), 0.0, next_lower)  # the next one down is unknown
    next_lower = np.minimum(next_lower, lowest_predicted)
    return (lowest_predicted + next_lower) / 2


def tune_thresholds(scores: ArrayLike, targets: ArrayLike, fallback: float | None = None) -> np.ndarray:
    """Per-class thresholds on probabilities that maximise each class's F1 on this split, shape (C,).

    Classes with no positive samples get a global threshold: `fallback` if given, else the single threshold
    that maximises the overall F1 (OF1) of all classes together. Predict a class where its score >= threshold.
    Unknown (-1) entries are left out of every F1.
    """
    scores = _scores_matrix(scores)
    targets, known = _label_masks(targets, scores.shape)
    has_positives = targets.any(axis=0)
    thresholds = np.empty(scores.shape[1], dtype=np.float64)
    if has_positives.any():
        thresholds[has_positives] = _best_f1_thresholds(scores[:, has_positives], targets[:, has_positives],
                                                        known[:, has_positives])
    if not has_positives.all():
        if fallback is None:
            if not has_positives.any():
                raise UserError(
                    "No sample in this split has any positive label, so thresholds cannot be tuned; "
                    "give a fallback threshold or check the labels."
                )
            fallback = float(_best_f1_thresholds(scores.reshape(-1, 1), targets.reshape(-1, 1),
                                                 known.reshape(-1, 1))[0])
        thresholds[~has_positives] = fallback
    return thresholds


def single_label_report(scores: ArrayLike, targets: ArrayLike, class_names: Sequence[str]) -> dict:
    """Top-1/top-5 accuracy, per-class precision/recall/F1/support and the confusion matrix.

    Returns plain Python values (JSON-ready): "top1", "top5", "num_samples", "macro_precision",
    "macro_recall", "macro_f1", "per_class" (one dict per class, in class order: "name", "precision",
    "recall", "f1", "support") and "confusion_matrix" (rows: true class, columns: predicted class).
    Percentages throughout; a class never predicted has precision 0, a class with no samples has recall 0.
    """
    scores = _scores_matrix(scores)
    num_samples, num_classes = scores.shape
    labels = _class_indices(targets, num_samples, num_classes)
    if len(class_names) != num_classes:
        raise UserError(f"Got {len(class_names)} class names for scores over {num_classes} classes.")

    accuracy = topk_accuracy(scores, labels, ks=(1, 5))
    predicted = scores.argmax(axis=1)
    class_ids = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=class_ids, average=None, zero_division=0
    )
    return {
        "top1": accuracy[1],
        "top5": accuracy[5],
        "num_samples": int(num_samples),
        "macro_precision": float(precision.mean() * 100),
        "macro_recall": float(recall.mean() * 100),
        "macro_f1": float(f1.mean() * 100),
        "per_class": [
            {
                "name": str(name),
                "precision": float(p * 100),
                "recall": float(r * 100),
                "f1": float(f * 100),
                "support": int(s),
            }
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=class_ids).tolist(),
    }


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
