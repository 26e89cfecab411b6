"""Shared fixtures: tiny trained runs, made once per test session (CI has 2 cores; training is the slow part)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tresfinetune.recipes import recipe_from_dict
from tresfinetune.train import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TINY_RUN = {
    "model": {"name": "tresnet_m", "weights": "none"},
    "input_size": 32,
    "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}],
                   "val": [{"Resize": {"height": 32, "width": 32}}]},
    "batch_size": 8,
    "workers": 0,
    "seed": 0,
    "optimizer": {"name": "adamw", "lr": 0.002},
}


def colour_image(colour: tuple[int, int, int], rng: np.random.Generator,
                 size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A noisy image dominated by one colour: a class any model learns in a few steps."""
    pixels = np.array(colour, np.int16) + rng.integers(-25, 25, (*size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_colour_folder(root: Path, per_class: int = 8) -> Path:
    """root/<colour>/<colour>_<i>.png for three colours: a `folder` dataset."""
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour_image(colour, rng).save(root / name / f"{name}_{i}.png")
    return root


def write_colour_csv(root: Path, count: int = 24) -> Path:
    """Images with a red and/or a blue half, labels.csv saying which: a `multilabel_csv` dataset."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image,labels"]
    for i in range(count):
        labels = [name for name, present in (("red", i % 2 == 0), ("blue", i % 3 != 1)) if present]
        pixels = np.full((40, 40, 3), 128, np.int16)
        if "red" in labels:
            pixels[:, :20] = COLOURS["red"]
        if "blue" in labels:
            pixels[:, 20:] = COLOURS["blue"]
        pixels += rng.integers(-15, 15, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"img{i}.png")
        lines.append(f"img{i}.png,{' '.join(labels)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train the fixtures on one thread: with other jobs on the CPUs, two threads can be several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """For test modules that run real models: `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def single_label_run(tmp_path_factory) -> Path:
    """A 3-epoch run on three colour classes, with EMA (so last.pt predicts with its EMA weights)."""
    base = tmp_path_factory.mktemp("single_label")
    data_root = write_colour_folder(base / "colours")
    raw = dict(TINY_RUN, data={"name": "folder", "root": str(data_root), "val_fraction": 0.25}, epochs=3, ema=0.5)
    with one_thread():
        return train(recipe_from_dict(raw), output=base / "run", progress=False).run_dir


@pytest.fixture(scope="session")
def multi_label_run(tmp_path_factory) -> Path:
    """A 2-epoch multi-label run (ASL loss) whose best.pt holds tuned per-class thresholds."""
    base = tmp_path_factory.mktemp("multi_label")
    data_root = write_colour_csv(base / "halves")
    raw = dict(TINY_RUN, data={"name": "multilabel_csv", "root": str(data_root), "csv": "labels.csv",
                               "val_fraction": 0.25}, epochs=2)
    with one_thread():
        return train(recipe_from_dict(raw), output=base / "run", progress=False).run_dir
