"""Datasets, samplers and DataLoaders for training and validation.

Reproducibility: every training sample's augmentation is drawn from a generator seeded with (recipe seed, epoch,
sample index), so epoch e looks the same whatever the number of workers, whether workers persist, and whether the
run was resumed at epoch e. The training order depends on (seed, epoch) only.

Unreadable images: the dataset returns a `BadSample` in their place; the collate function leaves it out of the
batch, and the loader either reports the skipped files (once per run, via logging) or stops with a UserError naming
the file (data.on_bad_image: error). This happens in the main process, so it works the same with workers.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from tresfinetune.datasets.images import DecodedImageCache, UnreadableImage, load_image
from tresfinetune.datasets.source import DataSource, Sample, build_source, has_unknown_labels
from tresfinetune.datasets.transforms import build_transforms
from tresfinetune.errors import UserError
from tresfinetune.tasks import MULTI_LABEL

if TYPE_CHECKING:
    from tresfinetune.recipe import Recipe

log = logging.getLogger("tresfinetune")

REPORT_FIRST = 5  # paths named in the skipped-images message


class BadSample(NamedTuple):
    path: str
    reason: str
    kind: str = "image"  # or "shard": a webdataset shard that could not be read to its end


class ImageDataset(Dataset):
    """Samples -> (image tensor HWC uint8, target): int64 scalar (single-label) or float32 multi-hot.

    Indexed by a sample index, or by (index, epoch) as the training sampler yields, so the augmentation can be
    seeded per sample and epoch.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, task: str, seed: int = 0,
                 cache: DecodedImageCache | None = None):
        self.samples = samples
        self.transform = transform
        self.multi_label = task == MULTI_LABEL
        self.seed = seed
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> np.ndarray:
        """The sample's RGB uint8 pixels, before augmentation; UnreadableImage for a broken file."""
        image = self.samples[index].image
        if not isinstance(image, str):
            return image
        fits = getattr(self.transform, "decode_fits", None)  # decode JPEGs no larger than the pipeline needs
        return self.cache.load(image, fits) if self.cache else load_image(image, fits)

    def target(self, index: int) -> torch.Tensor:
        target = self.samples[index].target
        if self.multi_label:
            return torch.as_tensor(np.asarray(target, dtype=np.float32))
        return torch.tensor(int(target), dtype=torch.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            pixels = self.load(index)
        except UnreadableImage as e:
            return BadSample(e.path, e.reason)
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(self.seed, epoch, index)
        return self.transform(pixels), self.target(index)


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
    """Stack the readable samples; hand the unreadable ones on separately so the loader can report them."""
    good = [item for item in batch if not isinstance(item, BadSample)]
    bad = [item for item in batch if isinstance(item, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0), bad
    # default_collate stacks straight into shared memory inside workers: no extra copy on the way to the trainer.
    return default_collate([g[0] for g in good]), default_collate([g[1] for g in good]), bad


class TrainSampler(Sampler):
    """Shuffled order seeded by (seed, epoch); with several processes, each rank's share of it, padded by
    repetition to equal length (as DistributedSampler). Yields (index, epoch) keys for per-sample seeding."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(size / world_size) if size else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_start(self, position: int) -> None:
        """Begin this epoch's order at `position` (a resumed run): the samples before it are not loaded at all."""
        self.start = position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(self.size).tolist()
        padded = order + order[: self.per_rank * self.world_size - self.size]
        return iter((index, self.epoch) for index in padded[self.rank :: self.world_size][self.start :])

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(Sampler):
    """Rank's contiguous, unpadded share of 0..size-1, in order: across ranks every sample is seen exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop = size * rank // world_size, size * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class BadImageLog:
    """Unreadable files met so far in this run, shared by the train and val loaders; each is reported once."""

    def __init__(self, on_bad_image: str = "skip"):
        self.on_bad_image = on_bad_image
        self.paths: dict[str, str] = {}  # path -> reason, in the order met
        self.shards: set[str] = set()  # those of `paths` that are damaged webdataset shards
        self._reported = 0

    def add(self, bad: list[BadSample]) -> None:
        if bad and self.on_bad_image == "error":
            raise UserError(f"cannot read {bad[0].kind} '{bad[0].path}' ({bad[0].reason}); fix or delete it, or set "
                            "data.on_bad_image: skip to train without it")
        for item in bad:
            self.paths.setdefault(item.path, item.reason)
            if item.kind == "shard":
                self.shards.add(item.path)

    def report(self) -> None:
        new = list(self.paths)[self._reported:]
        images = [path for path in new if path not in self.shards]
        if images:
            shown = ", ".join(images[:REPORT_FIRST]) + (", ..." if len(images) > REPORT_FIRST else "")
            log.warning("skipped %d unreadable image(s): %s", len(images), shown)
        for shard in (path for path in new if path in self.shards):
            log.warning("skipped the rest of shard %s: %s", shard, self.paths[shard])
        self._reported = len(self.paths)


class ImageLoader(DataLoader):
    """A DataLoader yielding (images, targets) that leaves unreadable images out and reports them."""

    def __init__(self, *args: Any, bad_images: BadImageLog, **kwargs: Any):
        super().__init__(*args, collate_fn=collate_skipping_bad, **kwargs)
        self.bad_images = bad_images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for images, targets, bad in super().__iter__():
                self.bad_images.add(bad)
                if len(images):
                    yield images, targets
        finally:
            self.bad_images.report()


def dataset_has_unknown_labels(dataset: Dataset) -> bool:
    """Whether a loader's multi-label targets include unknowns (-1): listed samples are looked at, streamed shards
    say so themselves (their dataset.json)."""
    if hasattr(dataset, "has_unknown_labels"):
        return dataset.has_unknown_labels
    return has_unknown_labels(dataset.samples)


def _worker_init(worker_id: int) -> None:
    # The augmentation is reseeded per sample; this seeds anything else a custom transform might draw from.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)  # the workers already run in parallel (OpenCV is single-threaded: see datasets/__init__)


def build_loaders(recipe: Recipe, source: DataSource | None = None, rank: int = 0, world_size: int = 1,
                  device: torch.device = torch.device("cpu")) -> tuple[DataLoader, DataLoader, DataSource]:
    """(train_loader, val_loader, source) for a recipe; batch_size is per process.

    The training sampler always has set_epoch(epoch); call it before each epoch.
    """
    if source is None:
        source = build_source(recipe.data)
    if hasattr(source, "build_loaders"):  # streamed, not indexed (shards): the source makes its own loaders
        return source.build_loaders(recipe, rank, world_size, device)
    train_samples = source.split(recipe.data.train_split)
    val_samples = source.split(recipe.data.val_split)
    if not train_samples:
        raise UserError(f"the '{recipe.data.train_split}' split of {source.name or recipe.data.name} has no images")
    source.check_trainable(recipe.data.train_split)  # two classes or more, each with a training image
    if not val_samples:
        raise UserError(f"the '{recipe.data.val_split}' split of {source.name or recipe.data.name} has no images; set "
                        "data.val_split to another split")
    cache = None
    if recipe.data.decode_cache:
        cache = DecodedImageCache(recipe.data.decode_cache)
        try:
            cache.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the data.decode_cache folder '{cache.folder}': {e.strerror or e}") from None
    train_set = ImageDataset(train_samples, build_transforms(recipe, train=True), source.task, recipe.seed, cache)
    val_set = ImageDataset(val_samples, build_transforms(recipe, train=False), source.task, recipe.seed, cache)

    bad_images = BadImageLog(recipe.data.on_bad_image)
    workers = recipe.workers
    common: dict[str, Any] = {
        "batch_size": recipe.batch_size,
        "num_workers": workers,
        "pin_memory": device.type == "cuda" and recipe.data.pin_memory,
        "persistent_workers": workers > 0 and recipe.data.persistent_workers,
        "worker_init_fn": _worker_init if workers > 0 else None,
        "bad_images": bad_images,
    }
    train_sampler = TrainSampler(len(train_set), recipe.seed, rank, world_size)
    generator = torch.Generator().manual_seed(recipe.seed)  # seeds the workers' base seed
    train_loader = ImageLoader(train_set, sampler=train_sampler, drop_last=len(train_sampler) >= recipe.batch_size,
                               generator=generator, **common)
    val_loader = ImageLoader(val_set, sampler=ShardSampler(len(val_set), rank, world_size), drop_last=False,
                             **common)
    return train_loader, val_loader, source
