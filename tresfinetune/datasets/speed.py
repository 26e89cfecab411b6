"""How fast a recipe's loader delivers batches on its own (decode + augment + collate, no model).

    result = loader_speed(load_recipe("recipes/folder.yaml"), split="train", batches=20)

A GPU trains TResNet-M at 224 px at thousands of images per second; when the loader delivers fewer, the GPU waits.
The first batch is not timed when there are more: it pays for starting the worker processes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.table import Table

from tresfinetune.errors import UserError

if TYPE_CHECKING:
    from tresfinetune.datasets.source import DataSource
    from tresfinetune.recipe import Recipe

SPLITS = ("train", "val")


def loader_speed(recipe: Recipe, split: str = "train", batches: int = 20,
                 source: DataSource | None = None) -> dict:
    """Images per second of the recipe's train or val loader with its workers, over up to `batches` batches:
    {"split", "images", "seconds", "img_per_s", "workers"}."""
    from tresfinetune.datasets.loaders import build_loaders

    if split not in SPLITS:
        raise UserError(f"--split must be train or val, got {split!r}")
    if batches < 1:
        raise UserError(f"--batches must be at least 1, got {batches}")
    train_loader, val_loader, _ = build_loaders(recipe, source)
    loader = train_loader if split == "train" else val_loader
    warm_up = len(loader) > 1
    images = timed = 0
    start = time.perf_counter()
    for number, (batch, _) in enumerate(loader):
        if number == 0 and warm_up:
            start = time.perf_counter()
            continue
        images += len(batch)
        timed += 1
        if timed == batches:
            break
    seconds = time.perf_counter() - start
    if images == 0:
        raise UserError(f"no readable images in the timed batches of split '{split}'")
    return {"split": split, "images": images, "seconds": seconds, "img_per_s": images / seconds,
            "workers": recipe.workers}


def speed_table(result: dict) -> Table:
    table = Table(title="Loader throughput", title_justify="left", caption="decode + augment + collate, no model")
    for column in ("split", "workers", "images", "seconds", "img/s"):
        table.add_column(column, justify="left" if column == "split" else "right")
    table.add_row(result["split"], str(result["workers"]), str(result["images"]), f"{result['seconds']:.3f}",
                  f"{result['img_per_s']:.1f}")
    return table
