"""What every dataset source produces, the registry of sources, and helpers they share.

A source turns `data.root` (in whatever layout the user has) into a `DataSource`: the task, the class names and the
samples of each split. A sample is `(image, target)`: the image is a file path or an RGB uint8 array, the target an
int class index (single-label) or a float32 vector with one entry per class (multi-label): 1 positive, 0 negative,
-1 unknown (not annotated, see SPEC.md section 10; fully labelled sources have no -1), or a SparseTarget that gives
that vector. Splits load on first use, so a source with a huge split (COCO train) costs nothing until that split is
asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tresfinetune.errors import UserError
from tresfinetune.recipe import DataConfig
from tresfinetune.tasks import SINGLE_LABEL

log = logging.getLogger("tresfinetune")



class Sample(NamedTuple):
    image: Any  # str path, or np.ndarray (H, W, 3) uint8 RGB
    target: Any  # int (single-label) or np.ndarray float32 of 1 / 0 / -1 (unknown) per class (multi-label)


class LazySplits(Mapping):
    """Split name -> list of samples, each built by its loader function the first time it is read."""

    def __init__(self, loaders: dict[str, Callable[[], list[Sample]]]):
        self._loaders = dict(loaders)
        self._loaded: dict[str, list[Sample]] = {}

    def __getitem__(self, name: str) -> list[Sample]:
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __repr__(self) -> str:
        return f"LazySplits({list(self._loaders)})"


@dataclass
class DataSource:
    task: str  # "single-label" | "multi-label"
    class_names: list[str]
    splits: Mapping[str, list[Sample]]
    # Other names users know a split by (e.g. CIFAR's "test" is our "val"); not listed in `splits`.
    aliases: dict[str, str] = field(default_factory=dict)
    name: str = ""
    limit: int | None = None  # data.limit: at most this many samples per split, a seeded subset in original order

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> list[Sample]:
        """The samples of split `name` (or an alias of one); UserError listing the available splits otherwise."""
        resolved = self.aliases.get(name, name)
        if resolved not in self.splits:
            available = ", ".join(list(self.splits) + [f"{a} (= {b})" for a, b in self.aliases.items()])
            close = difflib.get_close_matches(name, list(self.splits) + list(self.aliases), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"dataset '{self.name}' has no split '{name}'; available: {available}{hint}")
        samples = self.splits[resolved]
        if self.limit is not None and len(samples) > self.limit:
            keep = np.sort(np.random.default_rng(0).choice(len(samples), self.limit, replace=False))
            samples = [samples[i] for i in keep]
        return samples

    def check_trainable(self, split: str) -> None:
        """UserError unless a single-label source has two classes or more, each with an image in `split`; a class
        left out only by data.limit's subset is a warning (a quick run on a few images is still a run)."""
        if self.task != SINGLE_LABEL:
            return
        if len(self.class_names) < 2:
            classes = f"a single class ('{self.class_names[0]}')" if self.class_names else "no classes"
            raise UserError(f"dataset '{self.name}' has {classes}; a single-label model needs at least two to tell "
                            "apart (a folder dataset: one sub-folder of images per class)")
        limited = self.split(split)  # also names the available splits when `split` is not one
        full = self.splits[self.aliases.get(split, split)]
        missing = _classes_without_images(full, self.class_names)
        if missing:
            raise UserError(f"{_naming(missing)} {'has' if len(missing) == 1 else 'have'} no image in the '{split}' "
                            f"split of dataset '{self.name}', so the model could never learn "
                            f"{'it' if len(missing) == 1 else 'them'}; add images there or remove the class")
        if self.limit is not None and len(full) > self.limit:
            missing = _classes_without_images(limited, self.class_names)
            if missing:
                log.warning("data.limit %d leaves %s without an image in the '%s' split", self.limit,
                            _naming(missing), split)


def _classes_without_images(samples: list[Sample], class_names: list[str]) -> list[str]:
    present = {int(sample.target) for sample in samples}
    return [name for index, name in enumerate(class_names) if index not in present]


def _naming(classes: list[str], shown: int = 5) -> str:
    """"class 'a'" or "classes 'a', 'b' and 3 more"."""
    if len(classes) == 1:
        return f"class '{classes[0]}'"
    more = f" and {len(classes) - shown} more" if len(classes) > shown else ""
    return "classes " + ", ".join(f"'{name}'" for name in classes[:shown]) + more


@dataclass(frozen=True)
class SourceInfo:
    build: Callable[..., DataSource]
    task: str | None  # None: it depends on the data (see from_data)
    # Default-augmentation hints: whether horizontal flips keep the label (not for digits), and the smallest crop
    # area of the default RandomResizedCrop (None: the general default).
    hflip: bool = True
    crop_scale: tuple[float, float] | None = None
    # For sources whose task and hints depend on the data (webdataset shards): data config -> the fields above that
    # the data sets ({"task": ..., "hflip": ..., "crop_scale": ...}, any of them), read cheaply.
    from_data: Callable[..., dict] | None = None


_REGISTRY: dict[str, SourceInfo] = {}


def register(name: str, task: str | None, hflip: bool = True, crop_scale: tuple[float, float] | None = None,
             from_data: Callable[..., dict] | None = None) -> Callable:
    def add(build: Callable[..., DataSource]) -> Callable[..., DataSource]:
        _REGISTRY[name] = SourceInfo(build, task, hflip, crop_scale, from_data)
        return build

    return add


def source_info(name: str) -> SourceInfo:
    if name not in _REGISTRY:
        raise UserError(f"unknown dataset '{name}'; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def source_defaults(data_cfg: Any) -> SourceInfo:
    """The recipe's source's registry entry, with what its data say filled in (task None: unknown until the data
    can be read)."""
    info = source_info(data_cfg.name)
    return dataclasses.replace(info, **info.from_data(data_cfg)) if info.from_data is not None else info


def registered_names() -> list[str]:
    return list(_REGISTRY)


def build_source(data_cfg: DataConfig) -> DataSource:
    """The dataset described by a recipe's `data` section (UserError for a missing or malformed one)."""
    source = source_info(data_cfg.name).build(data_cfg)
    source.limit = data_cfg.limit
    return source


# ---- helpers shared by the sources ------------------------------------------------------------------------------


DOWNLOADABLE = ("cifar10", "cifar100", "flowers102")  # the sources whose `data.download: true` fetches files


def require_root(root: str | None, dataset: str) -> Path:
    """data.root expanded; UserError when it is unset, missing or empty."""
    if not root:
        raise UserError(f"dataset '{dataset}' needs data.root: set it in the recipe or with --set data.root=PATH")
    path = Path(root).expanduser()
    hint = "or set data.download: true" if dataset in DOWNLOADABLE else "or pass another with --set data.root=PATH"
    if not path.exists():
        raise UserError(f"data.root '{path}' does not exist; check the path ({hint})")
    if not path.is_dir():
        raise UserError(f"data.root '{path}' is a file; point it at the dataset's folder")
    if not any(path.iterdir()):
        raise UserError(f"data.root '{path}' is empty; put the dataset there ({hint})")
    return path


def find_dataset_dir(root: Path, folder_name: str, marker: str) -> Path | None:
    """The folder holding `marker`: root itself or root/folder_name (root may be the unpacked folder or its parent)."""
    for candidate in (root, root / folder_name):
        if (candidate / marker).exists():
            return candidate
    return None


UNKNOWN = -1.0  # a multi-label target entry nobody annotated


def multi_hot(indices: list[int] | set[int], num_classes: int) -> np.ndarray:
    target = np.zeros(num_classes, dtype=np.float32)
    target[list(indices)] = 1.0
    return target


def partial_target(positives: list[int] | set[int], negatives: list[int] | set[int], num_classes: int) -> np.ndarray:
    """A multi-label target where only the listed classes are annotated: 1 positive, 0 negative, -1 elsewhere.
    A class listed as both counts as positive."""
    target = np.full(num_classes, UNKNOWN, dtype=np.float32)
    target[list(negatives)] = 0.0
    target[list(positives)] = 1.0
    return target


class SparseTarget:
    """A partial multi-label target kept as its annotated class indices, for sets with thousands of classes
    (OpenImages: 9,605) where a dense row per image would not fit in memory. np.asarray() gives the dense row."""

    __slots__ = ("positives", "negatives", "num_classes")

    def __init__(self, positives: list[int], negatives: list[int], num_classes: int):
        self.positives = np.unique(np.asarray(positives, dtype=np.int32))
        self.negatives = np.setdiff1d(np.asarray(negatives, dtype=np.int32), self.positives)
        self.num_classes = num_classes

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return partial_target(self.positives, self.negatives, self.num_classes).astype(dtype or np.float32)

    def __repr__(self) -> str:
        return f"SparseTarget(positives={self.positives.tolist()}, negatives={self.negatives.tolist()})"


def has_unknown_labels(samples: list[Sample]) -> bool:
    """Whether any multi-label sample has an unknown (-1) entry."""
    def unknown_in(target: Any) -> bool:
        if isinstance(target, SparseTarget):
            return len(target.positives) + len(target.negatives) < target.num_classes
        return np.asarray(target).min(initial=0) < 0

    return any(unknown_in(s.target) for s in samples)


def count_labels(samples: list[Sample], num_classes: int) -> np.ndarray:
    """(3, C) counts of positive, negative and unknown entries per class over multi-label samples."""
    positives = np.zeros(num_classes, dtype=np.int64)
    negatives = np.zeros(num_classes, dtype=np.int64)
    dense = []
    for sample in samples:
        if isinstance(sample.target, SparseTarget):
            positives[sample.target.positives] += 1  # indices are unique within a target
            negatives[sample.target.negatives] += 1
        else:
            dense.append(np.asarray(sample.target, dtype=np.float32))
    if dense:
        targets = np.stack(dense)
        positives += (targets == 1).sum(0)
        negatives += (targets == 0).sum(0)
    return np.stack([positives, negatives, len(samples) - positives - negatives])


def seeded_split(labels: list[int] | None, count: int, val_fraction: float,
                 seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, val): stratified by `labels` when given (each class with 2+ samples keeps 1+ on each side).

    The seed is fixed rather than the recipe's so runs with different training seeds validate on the same images.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(count)
        n_val = min(max(1, round(count * val_fraction)), count - 1) if count > 1 else 0
        return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
    train, val = [], []
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label in sorted(by_class):
        members = np.array(by_class[label])[rng.permutation(len(by_class[label]))]
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1) if len(members) > 1 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)
