"""The data layer: dataset sources, augmentation pipelines and loaders.

    source = build_source(recipe.data)          # task, class names, samples per split
    train_loader, val_loader, source = build_loaders(recipe)
    pipeline = build_transforms(recipe, train=True)   # HWC uint8 RGB -> HWC uint8 tensor; to_model_input per batch
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2

from tresfinetune.datasets import local, official, openimages, shards  # noqa: F401  (importing registers the sources)
from tresfinetune.datasets.images import UnreadableImage, load_image
from tresfinetune.datasets.loaders import ImageDataset, build_loaders
from tresfinetune.datasets.source import MULTI_LABEL, SINGLE_LABEL, DataSource, Sample, registered_names, source_info
from tresfinetune.datasets.transforms import build_transforms

if TYPE_CHECKING:
    from tresfinetune.recipe import DataConfig


# OpenCV's thread pool does not survive fork(): a DataLoader worker forked after this process ran a parallel OpenCV
# op (build_transforms' check of the pipeline does) hangs for ever. The loader workers provide the parallelism.
cv2.setNumThreads(1)


def source_names() -> list[str]:
    """Names accepted by data.name."""
    return registered_names()


def build_source(data_cfg: DataConfig) -> DataSource:
    """The dataset described by a recipe's `data` section (UserError for a missing or malformed one)."""
    source = source_info(data_cfg.name).build(data_cfg)
    source.limit = data_cfg.limit
    return source


__all__ = ["DataSource", "Sample", "SINGLE_LABEL", "MULTI_LABEL", "source_names", "build_source", "build_transforms",
           "build_loaders", "ImageDataset", "load_image", "UnreadableImage"]
