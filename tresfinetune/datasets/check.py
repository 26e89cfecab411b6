"""`tresfinetune data check`: read every image of a dataset once and summarise what training will see.

The report is a plain dict (written as JSON by --json):
    {"task": ..., "splits": {NAME: {"images": N, "classes": K, "unreadable": U, "per_class": {...},
     "smallest_class": [name, n], "largest_class": [name, n], "also_in": {OTHER_SPLIT: n}}}, "unreadable": [paths]}
"images" counts the readable images, "classes" the classes with at least one of them; "also_in" counts images whose
content also appears in another split (same bytes, whatever the file name). Multi-label splits also carry
"labels": {"per_class": {NAME: {"positives": P, "negatives": N, "unknowns": U}}, "overall": {...},
"without_positives": [class names]}, counted over the readable images; "per_class" above counts positives.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from rich.progress import Progress
from rich.table import Table

from tresfinetune.datasets.images import UnreadableImage, decode_image, load_image, truncation
from tresfinetune.datasets.source import DataSource, Sample, count_labels
from tresfinetune.tasks import MULTI_LABEL

if TYPE_CHECKING:
    from tresfinetune.recipe import Recipe

log = logging.getLogger("tresfinetune")


def _inspect(image: Any) -> tuple[str | None, str | None]:
    """(content hash, None) for a readable image, (None, reason) for an unreadable one."""
    if not isinstance(image, str):
        return hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest(), None
    try:
        with open(image, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, e.strerror or str(e)
    if not data:
        return None, "empty file"
    reason = truncation(data)
    if reason:
        return None, reason
    # A reduced-size decode still walks all of a JPEG's data, so it finds broken files at a fraction of the cost.
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_4) is None:
        try:
            load_image(image)  # Pillow may read what OpenCV cannot
        except UnreadableImage as e:
            return None, e.reason
    return hashlib.md5(data).hexdigest(), None


def _label_names(sample: Sample, source: DataSource) -> list[str]:
    if source.task == MULTI_LABEL:
        return [source.class_names[i] for i in np.flatnonzero(np.asarray(sample.target) == 1)]
    return [source.class_names[int(sample.target)]]


def check_data(recipe: Recipe, source: DataSource | None = None, threads: int | None = None,
               show_progress: bool = False) -> dict:
    """Read every image of every split once; the report described in the module docstring."""
    from tresfinetune.datasets import build_source
    from tresfinetune.datasets.shards import ShardSource

    source = source or build_source(recipe.data)
    threads = threads or min(16, os.cpu_count() or 1)
    if isinstance(source, ShardSource):
        return check_shards(source, threads, show_progress)
    report: dict[str, Any] = {"task": source.task, "splits": {}, "unreadable": []}
    hashes: dict[str, set[str]] = {}
    with Progress(transient=True, disable=not show_progress) as progress, ThreadPoolExecutor(threads) as pool:
        for split in source.splits:
            samples = source.splits[split]
            task = progress.add_task(f"reading {split}", total=len(samples))
            per_class: Counter[str] = Counter({name: 0 for name in source.class_names})
            split_hashes: set[str] = set()
            readable: list[Sample] = []
            unreadable = 0
            no_labels = 0
            # OpenCV decodes without the GIL, so threads read images in parallel.
            for sample, (digest, reason) in zip(samples, pool.map(_inspect, (s.image for s in samples)), strict=True):
                progress.advance(task)
                if digest is None:
                    unreadable += 1
                    report["unreadable"].append(sample.image)
                    log.debug("unreadable: %s (%s)", sample.image, reason)
                    continue
                split_hashes.add(digest)
                readable.append(sample)
                labels = _label_names(sample, source)
                no_labels += not labels
                per_class.update(labels)
            hashes[split] = split_hashes
            present = {name: n for name, n in per_class.items() if n}
            entry: dict[str, Any] = {
                "images": len(samples) - unreadable,
                "classes": len(present),
                "unreadable": unreadable,
                "per_class": dict(per_class),
                "smallest_class": list(min(per_class.items(), key=lambda kv: kv[1])) if per_class else None,
                "largest_class": list(max(per_class.items(), key=lambda kv: kv[1])) if per_class else None,
            }
            if source.task == MULTI_LABEL:
                entry["images_without_labels"] = no_labels
                entry["labels"] = _label_counts(readable, source.class_names)
            report["splits"][split] = entry
    for split, entry in report["splits"].items():
        entry["also_in"] = {other: len(hashes[split] & hashes[other]) for other in hashes
                            if other != split and hashes[split] & hashes[other]}
    return report


def _split_entry(images: int, unreadable: int, per_class: dict[str, int]) -> dict[str, Any]:
    present = {name: n for name, n in per_class.items() if n}
    return {
        "images": images,
        "classes": len(present),
        "unreadable": unreadable,
        "per_class": dict(per_class),
        "smallest_class": list(min(per_class.items(), key=lambda kv: kv[1])) if per_class else None,
        "largest_class": list(max(per_class.items(), key=lambda kv: kv[1])) if per_class else None,
    }


def _inspect_bytes(item: tuple[str, bytes]) -> tuple[str | None, str | None]:
    """_inspect for an image already in memory (a shard member)."""
    name, data = item
    if data and cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_4) is None:
        try:
            decode_image(data, name)
        except UnreadableImage as e:
            return None, e.reason
    elif not data:
        return None, "empty file"
    return hashlib.md5(data).hexdigest(), None


class _ShardTally:
    """Counts of one split of shards as its samples are inspected."""

    def __init__(self, class_names: list[str], multi_label: bool):
        self.class_names, self.multi_label = class_names, multi_label
        self.per_class: Counter[str] = Counter({name: 0 for name in class_names})
        self.counts = np.zeros((3, len(class_names)), np.int64)  # positives, negatives, unknowns
        self.hashes: set[str] = set()
        self.images = self.no_labels = 0
        self.unreadable: list[str] = []

    def add(self, name: str, digest: str | None, reason: str | None, target: Any) -> None:
        if digest is None:
            self.unreadable.append(name)
            log.debug("unreadable: %s (%s)", name, reason)
            return
        self.images += 1
        self.hashes.add(digest)
        if self.multi_label:
            dense = np.asarray(target, dtype=np.float32)
            self.counts += np.stack([dense == 1, dense == 0, dense < 0])
            names = [self.class_names[i] for i in np.flatnonzero(dense == 1)]
        else:
            names = [self.class_names[target]]
        self.no_labels += not names
        self.per_class.update(names)

    def entry(self) -> dict[str, Any]:
        entry = _split_entry(self.images, len(self.unreadable), dict(self.per_class))
        if self.multi_label:
            entry["images_without_labels"] = self.no_labels
            entry["labels"] = _label_table_counts(self.counts, self.class_names)
        return entry


def _listed_entry(listed: dict, multi_label: bool) -> dict[str, Any]:
    """A split's report from dataset.json's counts (what `data pack` wrote), for shards too costly to read."""
    entry = _split_entry(listed["images"], len(listed.get("skipped", [])), listed["per_class"])
    entry["counted_from"] = "dataset.json"
    if multi_label:
        per_class = listed["labels"]
        entry["labels"] = {
            "per_class": per_class,
            "overall": {kind: sum(row[kind] for row in per_class.values())
                        for kind in ("positives", "negatives", "unknowns")},
            "without_positives": [name for name, row in per_class.items() if not row["positives"]],
        }
    return entry


def check_shards(source: Any, threads: int, show_progress: bool = False) -> dict:
    """check_data for webdataset shards: local shards are read in full; remote ones (http, pipe:) are counted from
    dataset.json when it has the counts, since reading them all would mean downloading the whole set."""
    from tresfinetune.datasets import shards

    report: dict[str, Any] = {"task": source.task, "splits": {}, "unreadable": []}
    hashes: dict[str, set[str]] = {}
    class_index = {name: i for i, name in enumerate(source.class_names)}
    multi_label = source.task == MULTI_LABEL
    with Progress(transient=True, disable=not show_progress) as progress, ThreadPoolExecutor(threads) as pool:
        for split, shard_split in source.shard_splits.items():
            listed = (source.metadata or {}).get("splits", {}).get(split)
            if listed and not all(shards.is_local(url) for url in shard_split.urls):
                report["splits"][split] = _listed_entry(listed, multi_label)
                hashes[split] = set()
                report.setdefault("notes", []).append(
                    f"split '{split}': counted from {shards.METADATA_FILE}, as reading remote shards would download "
                    "them all; images were not decoded")
                continue
            bar = progress.add_task(f"reading {split}", total=shard_split.images)
            tally = _ShardTally(source.class_names, multi_label)
            stream = shards.ShardStream(shard_split, [shards.Reader(tuple(range(len(shard_split.urls))))], None,
                                        source.task, source.class_names)
            pending: list[tuple[str, bytes, Any]] = []
            for sample in itertools.chain(stream.raw_samples(stream.readers[0]), [None]):
                if isinstance(sample, dict):
                    name, image = shards.sample_name(sample), shards.image_entry(sample)
                    try:
                        target = shards.parse_target(sample, source.task, class_index)
                    except (ValueError, UnicodeDecodeError) as e:
                        tally.add(name, None, f"bad label file: {e}", None)
                        continue
                    if image is None:
                        tally.add(name, None, "no image file in the sample", None)
                        continue
                    pending.append((name, sample[image], target))
                elif sample is not None:  # a damaged shard
                    tally.add(sample.path, None, sample.reason, None)
                if len(pending) == 64 or (sample is None and pending):
                    # OpenCV decodes without the GIL, so threads check images in parallel.
                    digests = pool.map(_inspect_bytes, [(name, data) for name, data, _ in pending])
                    for (name, _, target), (digest, reason) in zip(pending, digests, strict=True):
                        tally.add(name, digest, reason, target)
                    progress.advance(bar, len(pending))
                    pending = []
            report["splits"][split] = tally.entry()
            report["unreadable"].extend(tally.unreadable)
            hashes[split] = tally.hashes
    for split, entry in report["splits"].items():
        entry["also_in"] = {other: len(hashes[split] & hashes[other]) for other in hashes
                            if other != split and hashes[split] & hashes[other]}
    return report


def _label_counts(samples: list[Sample], class_names: list[str]) -> dict[str, Any]:
    """Positives, negatives and unknowns per class and overall, and the classes without any positive."""
    return _label_table_counts(count_labels(samples, len(class_names)), class_names)


def _label_table_counts(counts: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    kinds = ("positives", "negatives", "unknowns")
    return {
        "per_class": {name: {kind: int(n) for kind, n in zip(kinds, counts[:, c], strict=True)}
                      for c, name in enumerate(class_names)},
        "overall": {kind: int(n) for kind, n in zip(kinds, counts.sum(axis=1), strict=True)},
        "without_positives": [name for name, n in zip(class_names, counts[0], strict=True) if n == 0],
    }


def label_warnings(report: dict) -> list[str]:
    """One line per multi-label split with classes that have no positive there (their AP is undefined)."""
    lines = []
    for split, entry in report["splits"].items():
        missing = entry.get("labels", {}).get("without_positives", [])
        if missing:
            shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
            lines.append(f"split '{split}': {len(missing)} class(es) have no positive image: {shown}")
    return lines


def label_table(report: dict, split: str) -> Table:
    """Positives / negatives / unknowns per class in one multi-label split."""
    labels = report["splits"][split]["labels"]
    table = Table(title=f"labels in '{split}'")
    for column in ("class", "positives", "negatives", "unknowns"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in (*labels["per_class"].items(), ("[bold]all classes[/]", labels["overall"])):
        table.add_row(name, *("[yellow]0[/]" if kind == "positives" and row[kind] == 0 else str(row[kind])
                              for kind in ("positives", "negatives", "unknowns")))
    return table


def summary_table(report: dict, title: str = "") -> Table:
    """The report as a rich table, one row per split."""
    table = Table(title=title or f"{report['task']} dataset")
    multi_label = report["task"] == MULTI_LABEL
    columns = ["split", "images", "classes", "smallest class", "largest class", "unreadable", "also in"]
    if multi_label:
        columns[5:5] = ["positives", "negatives", "unknowns"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("split", "also in") else "right")
    for split, entry in report["splits"].items():
        smallest, largest = entry["smallest_class"], entry["largest_class"]
        also = ", ".join(f"{other}: {n}" for other, n in entry["also_in"].items())
        cells = [split, str(entry["images"]), str(entry["classes"]),
                 f"{smallest[0]} ({smallest[1]})" if smallest else "",
                 f"{largest[0]} ({largest[1]})" if largest else "",
                 f"[red]{entry['unreadable']}[/]" if entry["unreadable"] else "0",
                 f"[yellow]{also}[/]" if also else ""]
        if multi_label:
            cells[5:5] = [str(entry["labels"]["overall"][kind]) for kind in ("positives", "negatives", "unknowns")]
        table.add_row(*cells)
    return table


def _shard_preview(recipe: Recipe, source: Any, pipeline: Any, count: int) -> list[tuple[np.ndarray, str]]:
    """The first `count` readable training samples of the shards, in shard order, augmented as epoch 0 would."""
    from tresfinetune.datasets import shards

    split = source.shard_split(recipe.data.train_split)
    stream = shards.ShardStream(split, [shards.Reader(tuple(range(len(split.urls))))], pipeline, source.task,
                                source.class_names, recipe.seed)
    class_index = {name: i for i, name in enumerate(source.class_names)}
    shown = []
    for sample in stream.raw_samples(stream.readers[0]):
        if len(shown) == count:
            break
        if not isinstance(sample, dict) or shards.image_entry(sample) is None:
            continue
        name = shards.sample_name(sample)
        try:
            target = shards.parse_target(sample, source.task, class_index)
            pixels = decode_image(sample[shards.image_entry(sample)], name, pipeline.decode_fits)
        except (UnreadableImage, ValueError, UnicodeDecodeError):
            continue
        pipeline.reseed(recipe.seed, 0, zlib.crc32(name.encode()))
        shown.append((pipeline.augment(pixels), ", ".join(_label_names(Sample(name, target), source)) or "(none)"))
    return shown


def write_preview(recipe: Recipe, path: str | os.PathLike, source: DataSource | None = None, count: int = 16) -> Path:
    """A PNG grid of `count` augmented training samples (epoch 0's first ones), titled with their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tresfinetune.datasets import build_source
    from tresfinetune.datasets.loaders import ImageDataset, TrainSampler
    from tresfinetune.datasets.shards import ShardSource
    from tresfinetune.datasets.transforms import build_transforms
    from tresfinetune.errors import UserError
    from tresfinetune.files import save_figure

    source = source or build_source(recipe.data)
    pipeline = build_transforms(recipe, train=True)
    shown = []
    if isinstance(source, ShardSource):
        shown = _shard_preview(recipe, source, pipeline, count)
    else:
        samples = source.split(recipe.data.train_split)
        dataset = ImageDataset(samples, pipeline, source.task, recipe.seed)
        for index, epoch in TrainSampler(len(samples), recipe.seed):
            if len(shown) == count:
                break
            try:
                pixels = dataset.load(index)
            except UnreadableImage:
                continue
            pipeline.reseed(recipe.seed, epoch, index)
            shown.append((pipeline.augment(pixels), ", ".join(_label_names(samples[index], source)) or "(none)"))
    if not shown:
        raise UserError(f"no readable training images to preview in split '{recipe.data.train_split}'")
    columns = int(np.ceil(np.sqrt(len(shown))))
    rows = int(np.ceil(len(shown) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (image, label) in zip(axes.flat, shown, strict=False):
        axis.imshow(image if image.dtype == np.uint8 else np.clip(image, 0, 1))  # albumentations floats are 0..1
        axis.set_title(label if len(label) <= 40 else label[:37] + "...", fontsize=8)
    figure.tight_layout()
    path = Path(path).expanduser()
    try:
        save_figure(figure, path)
    except OSError as e:
        raise UserError(f"cannot write preview '{path}': {e.strerror or e}") from None
    finally:
        plt.close(figure)
    return path
