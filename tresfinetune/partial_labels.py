"""Training on partially labelled multi-label data: which treatment of unknowns, and the label prior.

The class-aware selective loss (SPEC.md section 10) needs each class's prior, how often it is present. As in the
PartialLabelingCSL paper, it is the average predicted probability of a model trained with unknowns ignored, over
the training images: either read from a CSV (`loss.prior`, e.g. the `class_prior.csv` of an earlier run) or
estimated during this run's first `loss.prior_epochs` epochs, which train in ignore mode.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from tresfinetune.errors import UserError
from tresfinetune.files import write_failure

PRIOR_FILE = "class_prior.csv"  # written into the run folder


def choose_partial_mode(requested: str | None, task: str, has_unknowns: bool) -> str | None:
    """The treatment of unknown labels: the recipe's, else `ignore` when the data has unknowns, else `negative`.
    None for single-label data, where there is nothing to choose."""
    if task != "multi-label":
        if requested is not None:
            raise UserError("loss.partial applies to multi-label data only; remove it for this single-label dataset")
        return None
    return requested or ("ignore" if has_unknowns else "negative")


class PriorEstimate:
    """Running sum of the sigmoid of the training logits per class, kept on the logits' device so that updating
    it never waits for the GPU; `state()` (a host sync) goes into last.pt for resuming."""

    def __init__(self, num_classes: int, state: dict | None = None):
        self.total = torch.zeros(num_classes, dtype=torch.float64)
        self.count = 0
        if state:
            self.total, self.count = torch.tensor(state["total"], dtype=torch.float64), int(state["count"])

    def update(self, logits: torch.Tensor) -> None:
        with torch.no_grad():
            self.total = self.total.to(logits.device) + logits.detach().float().sigmoid().sum(0)
        self.count += logits.shape[0]

    def state(self) -> dict:
        return {"total": self.total.tolist(), "count": self.count}


def write_prior(path: Path, class_names: list[str], prior: np.ndarray) -> None:
    """The reference code's layout: a header row, then one `class,prior` row per class."""
    try:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "prior"])
            writer.writerows((name, f"{value:.6g}") for name, value in zip(class_names, prior, strict=True))
    except OSError as e:
        raise write_failure(path, e) from None


def read_prior(path: str | Path, class_names: list[str]) -> np.ndarray:
    """A prior CSV (header, then `class,prior` rows) as one value per class of the dataset, in class order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"label prior file loss.prior '{path}' does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row]
    values: dict[str, float] = {}
    for number, row in enumerate(rows[1:], start=2):
        try:
            values[row[0].strip()] = float(row[1])
        except (IndexError, ValueError):
            raise UserError(f"{path.name} row {number} is not 'class,prior' with a number prior") from None
    missing = [name for name in class_names if name not in values]
    if missing:
        raise UserError(f"label prior file '{path}' has no prior for {len(missing)} class(es), e.g. '{missing[0]}'")
    return np.array([values[name] for name in class_names], dtype=np.float64)
