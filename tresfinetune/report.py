"""Plots of a run's history: training loss, validation metric and learning rate per epoch, as PNG files.

    paths = write_report("runs/flowers-20250101-120000")   # -> loss.png, val_metric.png, lr.png in the run folder

Reads the run's metrics.jsonl (one object per epoch, written by `tresfinetune train`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tresfinetune.errors import UserError
from tresfinetune.files import save_figure

# Validation columns in the order they are drawn; the EMA weights' values are dashed next to the raw weights'.
VALIDATION_METRICS = {
    "val_top1": "top-1 (%)",
    "val_top5": "top-5 (%)",
    "val_map": "mAP (%)",
}
EMA_PREFIX = "ema_"


def read_history(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl, in epoch order; UserError when there are none."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        hint = "; pass the run folder, not a file in it" if run_dir.is_file() else ""
        raise UserError(f"run folder '{run_dir}' does not exist{hint}")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"'{run_dir}' has no metrics.jsonl; is it a folder written by 'tresfinetune train'?")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"line {number} of '{metrics}' is not valid JSON; the file is damaged") from None
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    if not rows:
        raise UserError(f"'{metrics}' holds no epochs yet; wait until the first epoch has finished")
    return sorted(rows, key=lambda r: r["epoch"])


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the rows that have a number under `key` (validation may skip epochs)."""
    points = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def write_report(run_dir: str | Path, output: str | Path | None = None) -> list[Path]:
    """Write loss.png, val_metric.png and lr.png (each only when the history has its values) into `output`
    (default: the run folder); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_history(run_dir)
    folder = Path(output).expanduser() if output is not None else Path(run_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"output folder '{folder}' does not exist; create it first")
    title = Path(run_dir).expanduser().resolve().name
    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        save_figure(fig, folder / name)
        plt.close(fig)
        written.append(folder / name)

    def axes(ylabel: str, what: str):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{what}: {title}")
        ax.grid(alpha=0.3)
        # Epochs are whole numbers; without this a short run shows ticks at 1.25, 1.5, ...
        first, last = rows[0]["epoch"], rows[-1]["epoch"]
        if last - first < 15:
            ax.set_xticks(range(first, last + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(first - 0.5, last + 0.5)
        return fig, ax

    epochs, losses = _series(rows, "train_loss")
    if losses:
        fig, ax = axes("training loss", "Training loss")
        ax.plot(epochs, losses, marker="o", markersize=3)
        save(fig, "loss.png")

    drawn = [key for key in VALIDATION_METRICS if _series(rows, key)[1] or _series(rows, EMA_PREFIX + key)[1]]
    if drawn:
        fig, ax = axes("validation metric (%)", "Validation")
        for index, key in enumerate(drawn):
            color = f"C{index}"
            for prefix, style, label in (("", "-", ""), (EMA_PREFIX, "--", " (EMA)")):
                xs, ys = _series(rows, prefix + key)
                if ys:
                    ax.plot(xs, ys, style, color=color, marker="o", markersize=3,
                            label=VALIDATION_METRICS[key] + label)
        ax.legend()
        save(fig, "val_metric.png")

    epochs, rates = _series(rows, "lr")
    if rates:
        fig, ax = axes("learning rate (end of epoch)", "Learning rate")
        ax.plot(epochs, rates, marker="o", markersize=3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        save(fig, "lr.png")
    return written
