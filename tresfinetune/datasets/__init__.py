"""The data layer: dataset sources, augmentation pipelines and loaders.

    source = build_source(recipe.data)          # task, class names, samples per split
    train_loader, val_loader, source = build_loaders(recipe)
    pipeline = build_transforms(recipe, train=True)   # HWC uint8 RGB -> HWC uint8 tensor; to_model_input per batch
"""

from __future__ import annotations

import cv2

from tresfinetune.datasets import local, official, openimages, shards  # noqa: F401  (importing registers the sources)
from tresfinetune.datasets.images import UnreadableImage, load_image
from tresfinetune.datasets.loaders import ImageDataset, build_loaders
from tresfinetune.datasets.source import DataSource, Sample, build_source, registered_names
from tresfinetune.datasets.transforms import build_transforms
from tresfinetune.tasks import MULTI_LABEL, SINGLE_LABEL

# OpenCV's thread pool does not survive fork(): a DataLoader worker forked after this process ran a parallel OpenCV
# op (build_transforms' check of the pipeline does) hangs for ever. The loader workers provide the parallelism.
cv2.setNumThreads(1)


def source_names() -> list[str]:
    """Names accepted by data.name."""
    return registered_names()


__all__ = ["DataSource", "Sample", "SINGLE_LABEL", "MULTI_LABEL", "source_names", "build_source", "build_transforms",
           "build_loaders", "ImageDataset", "load_image", "UnreadableImage"]
