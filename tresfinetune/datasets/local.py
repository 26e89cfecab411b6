"""The user's own data (a folder of class folders, a CSV of labels) and scikit-learn's bundled digits."""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tresfinetune.datasets.images import is_image_file, list_images
from tresfinetune.datasets.source import (
    DataSource,
    LazySplits,
    Sample,
    multi_hot,
    partial_target,
    register,
    require_root,
    seeded_split,
)
from tresfinetune.errors import UserError
from tresfinetune.tasks import MULTI_LABEL, SINGLE_LABEL

log = logging.getLogger("tresfinetune")

# Sub-folders of data.root taken as ready-made splits (any case); "valid" / "validation" mean "val".
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _no_download(data_cfg: Any, name: str) -> None:
    if data_cfg.download:
        raise UserError(f"dataset '{name}' is your own data and cannot be downloaded; set data.download: false")


def _natural_key(text: str) -> list:
    """Sort "class2" before "class10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


# ---- a folder of class folders ------------------------------------------------------------------------------------


def _class_folders(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: _natural_key(d.name))


def _scan_classes(folder: Path, where: str) -> dict[str, list[Path]]:
    """Class name -> its image files; UserError for no class folders or a class folder without images."""
    classes = {}
    for class_dir in _class_folders(folder):
        images = list_images(class_dir)
        if not images:
            raise UserError(f"class folder '{class_dir}' has no images (jpg, png, ...); add some or remove the folder")
        classes[class_dir.name] = images
    if not classes:
        raise UserError(f"{where} '{folder}' has no class folders; put each class's images in its own sub-folder, "
                        "e.g. root/cat/*.jpg and root/dog/*.jpg")
    loose = [f for f in folder.iterdir() if f.is_file() and is_image_file(f.name)]
    if loose:
        log.warning("ignoring %d image(s) directly in %s (e.g. %s); images must be inside a class folder",
                    len(loose), folder, loose[0].name)
    return classes


@register("folder", SINGLE_LABEL)
def build_folder(data_cfg: Any) -> DataSource:
    _no_download(data_cfg, "folder")
    root = require_root(data_cfg.root, "folder")
    # root/train/<class>/ (+ val/, test/) when every sub-folder is a split name; else root/<class>/ (a class may be
    # called "train").
    subfolders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    split_dirs: dict[str, Path] = {}
    if subfolders and all(d.name.lower() in SPLIT_FOLDERS for d in subfolders):
        for entry in sorted(subfolders):
            split_dirs.setdefault(SPLIT_FOLDERS[entry.name.lower()], entry)

    if "train" in split_dirs:
        train_classes = _scan_classes(split_dirs["train"], "training folder")
        class_names = list(train_classes)
        index = {name: i for i, name in enumerate(class_names)}

        def load(split: str) -> list[Sample]:
            classes = train_classes if split == "train" else _scan_classes(split_dirs[split], f"{split} folder")
            unknown = [name for name in classes if name not in index]
            if unknown:
                raise UserError(f"'{split_dirs[split] / unknown[0]}' is not a class in {split_dirs['train']}; "
                                "every split must use the training folder's class names")
            return [Sample(str(path), index[name]) for name, paths in classes.items() for path in paths]

        loaders = {split: (lambda s=split: load(s)) for split in split_dirs}
        if "val" not in split_dirs:
            # train/ without val/: hold out a stratified share of train/ (test/, if present, stays untouched).
            def split_train(part: int) -> list[Sample]:
                samples = load("train")
                chosen = seeded_split([s.target for s in samples], len(samples), data_cfg.val_fraction)[part]
                return [samples[i] for i in chosen]

            loaders["train"], loaders["val"] = (lambda: split_train(0)), (lambda: split_train(1))
        return DataSource(SINGLE_LABEL, class_names, LazySplits(loaders), name="folder")

    classes = _scan_classes(root, "data.root")
    class_names = list(classes)
    samples = [Sample(str(path), i) for i, paths in enumerate(classes.values()) for path in paths]
    train_idx, val_idx = seeded_split([s.target for s in samples], len(samples), data_cfg.val_fraction)
    splits = {"train": [samples[i] for i in train_idx], "val": [samples[i] for i in val_idx]}
    return DataSource(SINGLE_LABEL, class_names, splits, name="folder")


# ---- a CSV of file names and labels -------------------------------------------------------------------------------

FILE_COLUMNS = ("file", "filename", "file_name", "image", "image_id", "img", "path", "name", "id")
TRUE_VALUES, FALSE_VALUES = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}
UNKNOWN_VALUES = {"", "-1", "-1.0"}  # one column per class: nobody said whether the class is there


def _find_csv(data_cfg: Any, root: Path) -> Path:
    if data_cfg.csv:
        path = Path(data_cfg.csv).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise UserError(f"label file data.csv '{path}' does not exist")
        return path
    found = sorted(p for p in root.glob("*.csv") if not p.name.startswith("."))
    if len(found) == 1:
        return found[0]
    raise UserError(f"multilabel_csv needs data.csv: the label file (relative to {root} or absolute)")


def _resolve_image(root: Path, name: str, csv_path: Path, row_number: int) -> str:
    path = root / name
    if path.is_file():
        return str(path)
    if not path.suffix:  # "img_001" for img_001.jpg / .JPG / .png
        for candidate in sorted(path.parent.glob(path.name + ".*")):
            if is_image_file(candidate.name):
                return str(candidate)
    raise UserError(f"{csv_path.name} row {row_number} names '{name}', which is not a file under {root}")


@register("multilabel_csv", MULTI_LABEL)
def build_multilabel_csv(data_cfg: Any) -> DataSource:
    """Two styles, both with a header row: `file,labels` with labels split by data.label_delimiter, or a file column
    and one 0/1 column per class. An optional `split` column assigns rows to splits; otherwise a seeded split.

    Partial labels: in the per-class style an empty cell or -1 is unknown; in the list style, data.negative_column
    names a second list of labels known absent, and then every class in neither list is unknown."""
    _no_download(data_cfg, "multilabel_csv")
    root = require_root(data_cfg.root, "multilabel_csv")
    csv_path = _find_csv(data_cfg, root)
    rows = _read_label_rows(csv_path, data_cfg.csv_delimiter)
    columns = _LabelColumns.from_header(rows[0], csv_path, data_cfg)
    files, label_sets, negative_sets, split_names = [], [], [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(columns.header):
            raise UserError(f"{csv_path.name} row {number} has {len(row)} columns but the header has "
                            f"{len(columns.header)}; check data.csv_delimiter ({data_cfg.csv_delimiter!r})")
        files.append(_resolve_image(root, row[columns.file].strip(), csv_path, number))
        labels, negatives = columns.row_labels(row, f"{csv_path.name} row {number}", data_cfg.label_delimiter)
        label_sets.append(labels)
        negative_sets.append(negatives)
        if columns.split is not None:
            split = row[columns.split].strip().lower()
            split_names.append(SPLIT_FOLDERS.get(split, split))

    if columns.one_per_class:
        class_names = [columns.header[c] for c in columns.labels]
    else:
        class_names = sorted(set().union(*label_sets, *(n for n in negative_sets if n)), key=_natural_key)
    if not class_names:
        raise UserError(f"label file '{csv_path}' has no labels at all")
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for path, labels, negatives in zip(files, label_sets, negative_sets, strict=True):
        positive_ids = {index[n] for n in labels}
        target = (multi_hot(positive_ids, len(class_names)) if negatives is None
                  else partial_target(positive_ids, {index[n] for n in negatives}, len(class_names)))
        samples.append(Sample(path, target))
    splits = _csv_splits(samples, split_names if columns.split is not None else None, data_cfg.val_fraction,
                         csv_path.name)
    return DataSource(MULTI_LABEL, class_names, splits, name="multilabel_csv")


def _read_label_rows(csv_path: Path, delimiter: str) -> list[list[str]]:
    """The non-empty rows of a label CSV, header first."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f, delimiter=delimiter) if any(c.strip() for c in row)]
    except UnicodeDecodeError:
        raise UserError(f"label file '{csv_path}' is not UTF-8 text") from None
    if len(rows) < 2:
        raise UserError(f"label file '{csv_path}' needs a header row and at least one data row")
    return rows


@dataclass
class _LabelColumns:
    """Which columns of a label CSV hold the file, the split, the labels and the known-absent labels."""

    header: list[str]
    file: int
    split: int | None
    negative: int | None
    labels: list[int]

    @property
    def one_per_class(self) -> bool:
        return len(self.labels) > 1

    @classmethod
    def from_header(cls, row: list[str], csv_path: Path, data_cfg: Any) -> _LabelColumns:
        header = [h.strip() for h in row]
        lowered = [h.lower() for h in header]
        file_col = next((lowered.index(n) for n in FILE_COLUMNS if n in lowered), 0)
        split_col = lowered.index("split") if "split" in lowered else None
        negative_col = None
        if data_cfg.negative_column:
            if data_cfg.negative_column.strip().lower() not in lowered:
                raise UserError(f"label file '{csv_path}' has no column '{data_cfg.negative_column}' "
                                f"(data.negative_column); its columns are {', '.join(header)}")
            negative_col = lowered.index(data_cfg.negative_column.strip().lower())
        label_cols = [i for i in range(len(header)) if i not in (file_col, split_col, negative_col)]
        if not label_cols:
            hint = f" (check data.csv_delimiter, now {data_cfg.csv_delimiter!r})" if len(header) == 1 else ""
            raise UserError(f"label file '{csv_path}' has no label column besides '{header[file_col]}'{hint}")
        columns = cls(header, file_col, split_col, negative_col, label_cols)
        if columns.one_per_class and negative_col is not None:
            raise UserError("data.negative_column goes with the `file,labels` list form; with one column per class, "
                            "mark known-absent classes 0 and unknown ones -1 or empty")
        return columns

    def row_labels(self, row: list[str], where: str, delimiter: str) -> tuple[set[str], set[str] | None]:
        """(positive labels, negative labels) of a row; None for the negatives means every other class."""
        if not self.one_per_class:
            labels = _label_list(row[self.labels[0]], delimiter)
            return labels, None if self.negative is None else _label_list(row[self.negative], delimiter)
        labels, negatives = set(), set()
        for col in self.labels:
            value = row[col].strip().lower()
            if value not in TRUE_VALUES | FALSE_VALUES | UNKNOWN_VALUES:
                raise UserError(f"{where}, column '{self.header[col]}': expected 1, 0 or -1 / empty (unknown), got "
                                f"'{row[col]}'")
            if value in TRUE_VALUES:
                labels.add(self.header[col])
            elif value in FALSE_VALUES:
                negatives.add(self.header[col])
        return labels, negatives


def _csv_splits(samples: list[Sample], split_names: list[str] | None, val_fraction: float,
                csv_name: str) -> dict[str, list[Sample]]:
    """Splits from the split column, or a seeded train/val split (also when the column lacks train or val)."""
    if split_names is None:
        train_idx, val_idx = seeded_split(None, len(samples), val_fraction)
        return {"train": [samples[i] for i in train_idx], "val": [samples[i] for i in val_idx]}
    splits: dict[str, list[Sample]] = {}
    for sample, split in zip(samples, split_names, strict=True):
        splits.setdefault(split or "train", []).append(sample)
    if "train" not in splits or "val" not in splits:
        log.info("%s's split column has no %s rows; holding out data.val_fraction of train as val", csv_name,
                 "train" if "train" not in splits else "val")
        pool = splits.pop("train", []) if "train" in splits else splits.pop(next(iter(splits)))
        train_idx, val_idx = seeded_split(None, len(pool), val_fraction)
        splits["train"], splits["val"] = [pool[i] for i in train_idx], [pool[i] for i in val_idx]
    return splits


def _label_list(text: str, delimiter: str) -> set[str]:
    return {t.strip() for t in text.strip().split(delimiter or None) if t.strip()}


# ---- scikit-learn digits ------------------------------------------------------------------------------------------

DIGITS_SIZE = 32


def digits_images(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 scans as (N, size, size, 3) uint8 RGB, dark ink on white, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (255 - digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 17 ink levels 0..16 -> 255..0
    upscaled = np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR) for g in grey])
    return np.ascontiguousarray(np.repeat(upscaled[..., None], 3, axis=3)), digits.target.astype(int)


@register("digits", SINGLE_LABEL, hflip=False, crop_scale=(0.6, 1.0))  # whole, unmirrored digits
def build_digits(data_cfg: Any) -> DataSource:
    images, labels = digits_images()
    train_idx, val_idx = seeded_split(labels.tolist(), len(labels), data_cfg.val_fraction)
    splits = {name: [Sample(images[i], int(labels[i])) for i in idx] for name, idx in
              (("train", train_idx), ("val", val_idx))}
    return DataSource(SINGLE_LABEL, [str(d) for d in range(10)], splits, name="digits")
