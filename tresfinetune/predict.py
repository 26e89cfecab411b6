"""Predicting the classes of image files with a trained checkpoint.

    result = predict(["photos/"], checkpoint="runs/flowers-20250101-120000")
    write_predictions(result, "predictions.csv")

Images go through the checkpoint's own evaluation preprocessing (the val pipeline of its recipe). Single-label
runs report the top-k classes with their softmax probabilities; multi-label runs report every class whose
sigmoid probability reaches its threshold (tuned per class on the validation split during training, or one
given threshold).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tresfinetune.checkpoint import RunInfo
from tresfinetune.datasets.images import UnreadableImage, list_images, load_image
from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.errors import UserError
from tresfinetune.files import write_text
from tresfinetune.runtime import resolve_device, scores_from_logits
from tresfinetune.tasks import MULTI_LABEL

log = logging.getLogger("tresfinetune")

OUTPUT_FORMATS = (".csv", ".json", ".jsonl")
DEFAULT_THRESHOLD = 0.5  # multi-label checkpoints without tuned thresholds


@dataclass
class Prediction:
    path: str
    labels: list[str]  # single-label: the top-k classes, best first; multi-label: the classes at/above threshold
    probabilities: list[float]  # one per label
    top_label: str  # the highest-scoring class, whether or not it passed a threshold
    top_probability: float


@dataclass
class PredictionResult:
    checkpoint: Path
    task: str
    class_names: list[str]
    predictions: list[Prediction]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    thresholds: list[float] | None = None  # multi-label: those applied


def find_latest_checkpoint(runs_dir: str | Path = "runs") -> Path:
    """best.pt of the most recently written run under `runs_dir`."""
    runs_dir = Path(runs_dir).expanduser()
    candidates = list(runs_dir.rglob("best.pt")) if runs_dir.is_dir() else []
    if not candidates:
        raise UserError(f"no --checkpoint given and no trained run (a best.pt) under '{runs_dir}'; train one with "
                        "'tresfinetune train' or pass --checkpoint PATH")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def collect_image_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly (any extension: they are tried) and those found in folders, recursively."""
    found: list[Path] = []
    paths = list(paths)
    if not paths:
        raise UserError("give the image files or folders to predict, e.g. 'tresfinetune predict photos/'")
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            images = list_images(path)
            if not images:
                log.warning("no image files in folder '%s'", path)
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"'{path}' does not exist; check the path of the image or folder to predict")
    if not found:
        raise UserError(f"no image files in {', '.join(repr(str(p)) for p in paths)} (looked for "
                        "jpg, png, bmp, gif, tif, webp, ppm/pgm)")
    return list(dict.fromkeys(found))  # a file given twice is predicted once


def inference_transform(info: RunInfo) -> Callable[[np.ndarray], torch.Tensor]:
    """The evaluation preprocessing of the run `info` describes."""
    from tresfinetune.datasets.transforms import build_transforms
    from tresfinetune.recipes import recipe_from_dict

    raw = dict(info.recipe or {})
    if not raw:  # a checkpoint without its recipe: the default evaluation pipeline for its size
        raw = {"input_size": info.input_size}
    return build_transforms(recipe_from_dict(raw), train=False)


class ImageFiles(Dataset):
    """(index, image tensor) per file; (index, reason) for a file that cannot be decoded."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[np.ndarray], torch.Tensor]):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, self.transform(load_image(self.paths[index], getattr(self.transform, "decode_fits", None)))
        except UnreadableImage as e:
            return index, e.reason


def _collate(items: list) -> list:
    return items


def model_scores(model: nn.Module, images: torch.Tensor, task: str) -> torch.Tensor:
    """Softmax (single-label) or sigmoid (multi-label) probabilities, float32 on the CPU."""
    return scores_from_logits(model(images), task).cpu()


def multi_label_thresholds(info: RunInfo, threshold: float | None) -> list[float]:
    """The given threshold for every class, else the checkpoint's tuned ones, else 0.5."""
    if threshold is not None:
        return [float(threshold)] * len(info.class_names)
    if info.thresholds:
        return [float(t) for t in info.thresholds]
    log.warning("the checkpoint has no tuned thresholds; using %g for every class (set one with --threshold)",
                DEFAULT_THRESHOLD)
    return [DEFAULT_THRESHOLD] * len(info.class_names)


def _describe(path: Path, scores: torch.Tensor, class_names: list[str], task: str, top_k: int,
              thresholds: list[float] | None, threshold: float | None) -> Prediction:
    best = int(scores.argmax())
    if task == MULTI_LABEL:
        passed = [i for i in torch.argsort(scores, descending=True).tolist() if scores[i] >= thresholds[i]]
    else:
        passed = torch.topk(scores, min(top_k, len(class_names))).indices.tolist()
        if threshold is not None:
            passed = [i for i in passed if scores[i] >= threshold]
    return Prediction(str(path), [class_names[i] for i in passed], [float(scores[i]) for i in passed],
                      class_names[best], float(scores[best]))


@torch.no_grad()
def predict(
    paths: Iterable[str | Path],
    checkpoint: str | Path | None = None,
    top_k: int = 5,
    threshold: float | None = None,
    batch_size: int = 32,
    device: str = "auto",
    workers: int = 0,
    runs_dir: str | Path = "runs",
) -> PredictionResult:
    """Classify image files and the images in folders (recursively) with a checkpoint or run folder.

    Without `checkpoint`, the most recent run's best.pt under `runs_dir` is used (and logged). `threshold`:
    multi-label, one threshold for every class instead of the tuned ones; single-label, leave out top-k classes
    below it. Files that cannot be decoded are skipped and listed in `unreadable`.
    """
    from tresfinetune.models.from_checkpoint import load_trained_model

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UserError(f"--threshold is a probability between 0 and 1, got {threshold}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    image_paths = collect_image_paths(paths)
    if checkpoint is None:
        checkpoint = find_latest_checkpoint(runs_dir)
        log.info("using %s (the most recent run under %s)", checkpoint, runs_dir)
    torch_device = resolve_device(device)
    trained = load_trained_model(checkpoint, device=torch_device)
    model, info = trained.model, trained.info
    task, class_names = info.task, info.class_names
    thresholds = multi_label_thresholds(info, threshold) if task == MULTI_LABEL else None

    loader = DataLoader(ImageFiles(image_paths, inference_transform(info)), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    predictions: list[Prediction] = []
    unreadable: list[tuple[str, str]] = []
    for batch in loader:
        good = [(i, item) for i, item in batch if isinstance(item, torch.Tensor)]
        unreadable.extend((str(image_paths[i]), item) for i, item in batch if isinstance(item, str))
        if not good:
            continue
        images = to_model_input(torch.stack([item for _, item in good]), torch_device, info.mean, info.std)
        for (i, _), scores in zip(good, model_scores(model, images, task), strict=True):
            predictions.append(_describe(image_paths[i], scores, class_names, task, top_k, thresholds, threshold))
    return PredictionResult(trained.path, task, class_names, predictions, unreadable, thresholds)


# ---- output -------------------------------------------------------------------------------------------------------


def prediction_record(prediction: Prediction) -> dict:
    return {
        "path": prediction.path,
        "labels": prediction.labels,
        "probabilities": [round(p, 6) for p in prediction.probabilities],
        "top_label": prediction.top_label,
        "top_probability": round(prediction.top_probability, 6),
    }


def write_predictions(result: PredictionResult, output: str | Path) -> Path:
    """Write the predictions as .csv (one row per image), .json (one document) or .jsonl (one line per image)."""
    output = Path(output).expanduser()
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UserError(f"--output must end in {', '.join(OUTPUT_FORMATS)} to pick the format, got '{output.name}'")
    if output.parent and not output.parent.exists():
        raise UserError(f"the folder of --output '{output}' does not exist; create it first")
    records = [prediction_record(p) for p in result.predictions]
    if suffix == ".json":
        document = {"checkpoint": str(result.checkpoint), "task": result.task, "class_names": result.class_names,
                    "thresholds": result.thresholds, "predictions": records,
                    "unreadable": [{"path": path, "reason": reason} for path, reason in result.unreadable]}
        write_text(output, json.dumps(document, indent=2) + "\n")
    elif suffix == ".jsonl":
        write_text(output, "".join(json.dumps(record) + "\n" for record in records))
    else:
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["path", "labels", "probabilities", "top_label", "top_probability"])
        for r in records:
            writer.writerow([r["path"], ";".join(r["labels"]), ";".join(f"{p:.6f}" for p in r["probabilities"]),
                             r["top_label"], f"{r['top_probability']:.6f}"])
        write_text(output, table.getvalue())
    return output


def _shown_path(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if relative.startswith("..") else relative


def _percent(probability: float) -> str:
    return f"{probability * 100:.1f}%"


def predictions_table(result: PredictionResult, top_k: int = 5) -> Table:
    """A rich table: one row per image, the best class bold, other top-k classes (or passing labels) after it."""
    multi = result.task == MULTI_LABEL
    table = Table(title=f"Predictions ({_shown_path(str(result.checkpoint))})", title_justify="left")
    table.add_column("image", overflow="fold")
    if multi:
        table.add_column("labels (probability)", overflow="fold")
    else:
        table.add_column("prediction", style="bold")
        table.add_column("probability", justify="right")
        if top_k > 1:
            table.add_column(f"next {min(top_k, len(result.class_names)) - 1}", overflow="fold", style="dim")
    for p in result.predictions:
        image = _shown_path(p.path)
        if multi:
            if p.labels:
                labels = Text(", ".join(f"{name} {_percent(prob)}" for name, prob in
                                        zip(p.labels, p.probabilities, strict=True)))
            else:
                labels = Text(f"none above threshold (best: {p.top_label} {_percent(p.top_probability)})", "dim")
            table.add_row(image, labels)
            continue
        if not p.labels:  # every top-k class was below --threshold
            row = [image, Text("below threshold", "dim"), Text(_percent(p.top_probability), "dim")]
        else:
            row = [image, p.labels[0], _percent(p.probabilities[0])]
        if top_k > 1:
            row.append("  ".join(f"{name} {_percent(prob)}" for name, prob in
                                 zip(p.labels[1:], p.probabilities[1:], strict=True)))
        table.add_row(*row)
    table.caption = f"{len(result.predictions)} image(s), {result.task}, {len(result.class_names)} classes"
    if result.unreadable:
        table.caption += f"; {len(result.unreadable)} unreadable file(s) skipped"
    return table

