"""Evaluating a checkpoint on a split of its dataset: metrics, rich tables, a plot and a JSON report.

    report = evaluate("runs/flowers-20250101-120000", split="test", overrides=["data.root=/data/flowers"])

The recipe stored in the checkpoint says which dataset and preprocessing to use; `overrides` change it (e.g. the
dataset moved). Single-label: top-1/top-5, per-class precision/recall/F1 and the confusion matrix (PNG).
Multi-label: mAP, per-class AP (PNG bars) and CP/CR/CF1/OP/OR/OF1 at the checkpoint's tuned thresholds and at 0.5.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from tresfinetune.errors import UserError
from tresfinetune.files import save_figure, write_text
from tresfinetune.inference import collect_scores
from tresfinetune.metrics import (
    average_precision_per_class,
    mean_average_precision,
    multilabel_threshold_metrics,
    single_label_report,
)
from tresfinetune.models.from_checkpoint import TrainedModel
from tresfinetune.tasks import SINGLE_LABEL

FIXED_THRESHOLD = 0.5  # multi-label metrics are also given at this threshold, comparable across runs


@dataclass
class EvaluationResult:
    report: dict  # JSON-ready: metrics, per-class numbers, what was evaluated
    plot: Path | None  # confusion matrix (single-label) or per-class AP bars (multi-label)
    json_path: Path | None


def _recipe_for(trained: TrainedModel, overrides: Iterable[str]):
    from tresfinetune.recipes import recipe_from_dict

    if not trained.info.recipe:
        raise UserError(f"'{trained.path}' holds no recipe, so its dataset is unknown; evaluate a "
                        "checkpoint written by 'tresfinetune train'")
    return recipe_from_dict(trained.info.recipe, overrides)


def _check_classes(class_names: list[str], source_classes: list[str], dataset: str) -> None:
    if list(source_classes) != list(class_names):
        only_model = sorted(set(class_names) - set(source_classes))[:5]
        only_data = sorted(set(source_classes) - set(class_names))[:5]
        detail = (f"only in the checkpoint: {', '.join(only_model) or '-'}; only in the data: "
                  f"{', '.join(only_data) or '-'}" if only_model or only_data else "same classes in another order")
        raise UserError(f"the classes of dataset '{dataset}' do not match the checkpoint's ({detail}); point "
                        "--set data.root=... at the data the model was trained on")


def multi_label_metrics(scores: np.ndarray, targets: np.ndarray, class_names: list[str],
                        thresholds: list[float] | None) -> dict:
    """mAP, per-class AP and the threshold metrics; classes without positives have AP None."""
    per_class_ap = average_precision_per_class(scores, targets)
    report = {
        "map": mean_average_precision(scores, targets),
        "num_samples": int(len(scores)),
        "per_class": [
            {"name": name, "ap": None if math.isnan(ap) else float(ap), "positives": int(positives),
             "unknowns": int(unknowns)}
            for name, ap, positives, unknowns in zip(class_names, per_class_ap, (targets == 1).sum(axis=0),
                                                     (targets == -1).sum(axis=0), strict=True)
        ],
        f"at_{FIXED_THRESHOLD:g}": multilabel_threshold_metrics(scores, targets, FIXED_THRESHOLD),
    }
    if thresholds is not None:
        report["at_tuned_thresholds"] = multilabel_threshold_metrics(scores, targets, np.asarray(thresholds))
        for row, threshold in zip(report["per_class"], thresholds, strict=True):
            row["threshold"] = float(threshold)
    return report


def evaluate(
    checkpoint: str | Path,
    overrides: Iterable[str] = (),
    split: str | None = None,
    tta: str | None = None,
    json_path: str | Path | None = None,
    plot: bool = True,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
) -> EvaluationResult:
    """Evaluate a checkpoint (or a run folder's best.pt) on `split` (default: the recipe's val split).

    tta: None or "flip" (average with the horizontally flipped image). The JSON report goes to `json_path` when
    given; the plot goes next to it, or into the checkpoint's folder without one.
    """
    from tresfinetune.datasets import build_source
    from tresfinetune.models.from_checkpoint import load_trained_model
    from tresfinetune.runtime import amp_dtype_for, resolve_device

    if tta not in (None, "none", "flip"):
        raise UserError(f"--tta must be 'flip' (or left out), got {tta!r}")
    trained = load_trained_model(checkpoint)
    model, info = trained.model, trained.info
    recipe = _recipe_for(trained, overrides)
    torch_device = resolve_device(device or recipe.device)
    split = split or recipe.data.val_split
    source = build_source(recipe.data)
    _check_classes(info.class_names, source.class_names, recipe.data.name)
    loader, samples, bad_images = _split_loader(recipe, source, split, info.task, batch_size, workers, torch_device)
    model.to(torch_device)
    channels_last = recipe.channels_last and torch_device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scores, targets = collect_scores(model, loader, torch_device, info.task, info.mean, info.std,
                                     amp_dtype_for(recipe.amp, torch_device), channels_last, tta_flip=tta == "flip")
    if len(scores) == 0:
        raise UserError(f"none of the {len(samples)} images of split '{split}' could be read")

    if info.task == SINGLE_LABEL:
        metrics = single_label_report(scores, targets, info.class_names)
    else:
        metrics = multi_label_metrics(scores, targets, info.class_names, info.thresholds)
    report = {
        "checkpoint": str(trained.path),
        "model": trained.architecture,
        "dataset": recipe.data.name,
        "split": split,
        "task": info.task,
        "tta": "flip" if tta == "flip" else None,
        "input_size": recipe.input_size,
        "class_names": info.class_names,
        "skipped_unreadable": list(bad_images.paths),
        **metrics,
    }

    json_file = Path(json_path).expanduser() if json_path else None
    if json_file is not None:
        if not json_file.parent.is_dir():
            raise UserError(f"the folder of --json '{json_file}' does not exist; create it first")
        write_text(json_file, json.dumps(report, indent=2) + "\n")
    plot_path = None
    if plot:
        folder, stem = ((json_file.parent, json_file.stem) if json_file is not None
                        else (trained.path.parent, f"eval_{split}"))
        plot_path = _plot(report, folder, stem)
    return EvaluationResult(report, plot_path, json_file)


def _split_loader(recipe, source, split: str, task: str, batch_size: int | None, workers: int | None,
                  device: torch.device) -> tuple:
    """(loader, its samples, its unreadable-image log) over every image of `split` once, in order."""
    from tresfinetune.datasets.loaders import BadImageLog, ImageDataset, ImageLoader
    from tresfinetune.datasets.shards import ShardSource, shard_eval_loader
    from tresfinetune.datasets.transforms import build_transforms

    if isinstance(source, ShardSource):  # streamed
        loader = shard_eval_loader(recipe, source, split, batch_size, workers, device)
        return loader, loader.dataset, loader.bad_images
    samples = source.split(split)
    if not samples:
        raise UserError(f"split '{split}' of dataset '{recipe.data.name}' has no images")
    bad_images = BadImageLog("skip")
    loader = ImageLoader(ImageDataset(samples, build_transforms(recipe, train=False), task),
                         batch_size=batch_size or recipe.batch_size, shuffle=False, bad_images=bad_images,
                         num_workers=recipe.workers if workers is None else workers, pin_memory=device.type == "cuda")
    return loader, samples, bad_images


def _plot(report: dict, folder: Path, stem: str) -> Path:
    """The confusion matrix (single-label) or per-class AP bars (multi-label) of a report."""
    if report["task"] == SINGLE_LABEL:
        return plot_confusion_matrix(report["confusion_matrix"], report["class_names"],
                                     folder / f"{stem}_confusion_matrix.png")
    return plot_average_precision(report["per_class"], folder / f"{stem}_ap_per_class.png")


# ---- plots --------------------------------------------------------------------------------------------------------

MAX_TICK_LABELS = 40  # beyond this many classes the axis names would overlap; cells stay, names go


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path) -> Path:
    """Rows (true class) normalised to fractions for the colour; counts written in the cells when they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    n = len(class_names)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.35 * n + 2), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 20:
        for (row, col), count in np.ndenumerate(counts):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                        color="white" if fractions[row, col] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_average_precision(per_class: list[dict], path: Path) -> Path:
    """Horizontal bars of per-class AP, best at the top; classes without positives are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in per_class if r["ap"] is not None), key=lambda r: r["ap"])
    height = min(max(3.0, 0.22 * len(rows) + 1.5), 40.0)
    fig, ax = plt.subplots(figsize=(7, height))
    ax.barh(range(len(rows)), [r["ap"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7 if len(rows) > 30 else 9)
    ax.set_xlim(0, 100)
    ax.set_xlabel("average precision (%)")
    mean_ap = float(np.mean([r["ap"] for r in rows])) if rows else float("nan")
    ax.set_title(f"Per-class AP (mAP {mean_ap:.2f})")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---- tables -------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def evaluation_tables(report: dict, max_classes: int = 30) -> list[Table]:
    """Summary table plus a per-class table (the worst `max_classes` classes when there are more)."""
    title = f"{report['model']} on {report['dataset']} / {report['split']}" + (" (flip TTA)" if report["tta"] else "")
    summary = Table(title=title, title_justify="left", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("images", str(report["num_samples"]))
    per_class = Table(title_justify="left")
    per_class.add_column("class", overflow="fold")
    if report["task"] == SINGLE_LABEL:
        summary.add_row("top-1 accuracy (%)", _pct(report["top1"]))
        summary.add_row("top-5 accuracy (%)", _pct(report["top5"]))
        for key in ("macro_precision", "macro_recall", "macro_f1"):
            summary.add_row(key.replace("_", " ") + " (%)", _pct(report[key]))
        rows = sorted(report["per_class"], key=lambda r: r["f1"])
        for column in ("precision", "recall", "f1", "support"):
            per_class.add_column(column, justify="right")
        for r in rows[:max_classes]:
            per_class.add_row(r["name"], _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"]), str(r["support"]))
    else:
        summary.add_row("mAP (%)", _pct(report["map"]))
        for label, key in (("tuned thresholds", "at_tuned_thresholds"), (f"threshold {FIXED_THRESHOLD:g}",
                                                                          f"at_{FIXED_THRESHOLD:g}")):
            if key in report:
                values = report[key]
                summary.add_row(f"CP / CR / CF1 at {label}", " / ".join(_pct(values[k]) for k in ("CP", "CR", "CF1")))
                summary.add_row(f"OP / OR / OF1 at {label}", " / ".join(_pct(values[k]) for k in ("OP", "OR", "OF1")))
        rows = sorted(report["per_class"], key=lambda r: -1 if r["ap"] is None else r["ap"])
        per_class.add_column("AP (%)", justify="right")
        per_class.add_column("positives", justify="right")
        if any("threshold" in r for r in rows):
            per_class.add_column("threshold", justify="right")
        for r in rows[:max_classes]:
            cells = [r["name"], _pct(r["ap"]), str(r["positives"])]
            if "threshold" in r:
                cells.append(f"{r['threshold']:.3f}")
            per_class.add_row(*cells)
    shown = min(len(rows), max_classes)
    per_class.title = "Per class" + (f" (worst {shown} of {len(rows)})" if len(rows) > shown else "")
    if report["skipped_unreadable"]:
        summary.add_row("unreadable images skipped", str(len(report["skipped_unreadable"])))
    return [summary, per_class]
