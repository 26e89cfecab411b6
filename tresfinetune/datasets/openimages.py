"""OpenImages (V6) image-level labels, read from the files as its downloads lay them out (SPEC.md section 10).

    data.root/
        oidv6-class-descriptions.csv                       LabelName,DisplayName (more classes than are used)
        oidv6-train-annotations-human-imagelabels.csv      ImageID,Source,LabelName,Confidence
        validation-annotations-human-imagelabels.csv
        test-annotations-human-imagelabels.csv
        train/<ImageID>.jpg   validation/<ImageID>.jpg   test/<ImageID>.jpg

Confidence 1 is a verified positive, 0 a verified negative; every class not listed for an image is unknown. The
classes are those the training labels use. Only images present on disk are kept: most users download a subset.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from tresfinetune.datasets.source import (
    DataSource,
    LazySplits,
    Sample,
    SparseTarget,
    register,
    require_root,
)
from tresfinetune.errors import UserError
from tresfinetune.tasks import MULTI_LABEL

log = logging.getLogger("tresfinetune")

DESCRIPTIONS = "oidv6-class-descriptions.csv"
LABEL_FILES = {  # split -> (label file, image folder)
    "train": ("oidv6-train-annotations-human-imagelabels.csv", "train"),
    "val": ("validation-annotations-human-imagelabels.csv", "validation"),
    "test": ("test-annotations-human-imagelabels.csv", "test"),
}
LABEL_HEADER = ("ImageID", "LabelName", "Confidence")  # the columns we read (Source is not needed)


def _find(root: Path, name: str) -> Path | None:
    # The CSVs sit next to the image folders, or in a sub-folder of their own.
    for folder in (root, root / "annotations", root / "labels", root / "metadata"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_descriptions(path: Path) -> dict[str, str]:
    """LabelName -> DisplayName; the header row is optional (older releases have none)."""
    names = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or (number == 1 and row[0] == "LabelName"):
                continue
            if len(row) < 2:
                raise UserError(f"{path.name} row {number} is not 'LabelName,DisplayName'")
            names[row[0].strip()] = row[1].strip()
    return names


def _read_labels(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """ImageID -> (positive LabelNames, negative LabelNames), in file order."""
    labels: dict[str, tuple[list[str], list[str]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in LABEL_HEADER if c not in header]
        if missing:
            raise UserError(f"{path.name} lacks the column(s) {', '.join(missing)}; OpenImages image-level label files "
                            "start with ImageID,Source,LabelName,Confidence")
        image_col, label_col, confidence_col = (header.index(c) for c in LABEL_HEADER)
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                image, label, confidence = row[image_col], row[label_col], float(row[confidence_col])
            except (IndexError, ValueError):
                raise UserError(f"{path.name} row {number} is not ImageID,Source,LabelName,Confidence") from None
            if confidence not in (0.0, 1.0):
                raise UserError(f"{path.name} row {number} has confidence {confidence}; human-verified labels are 0 "
                                "or 1 (machine-generated label files are not supported)")
            positives, negatives = labels.setdefault(image, ([], []))
            (positives if confidence == 1.0 else negatives).append(label)
    return labels


def _image_files(folder: Path) -> dict[str, str]:
    """ImageID -> path of its image, listing the folder once (it may hold millions of files)."""
    with os.scandir(folder) as entries:
        return {Path(e.name).stem: e.path for e in entries
                if e.is_file() and e.name.lower().endswith((".jpg", ".jpeg", ".png"))}


def _unique_names(mids: list[str], descriptions: dict[str, str]) -> list[str]:
    """Display names as class names; a name shared by several classes gets its LabelName added."""
    names = [descriptions.get(mid, mid) for mid in mids]
    repeated = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name} ({mid})" if name in repeated else name for name, mid in zip(names, mids, strict=True)]


@register("openimages", MULTI_LABEL)
def build_openimages(data_cfg: Any) -> DataSource:
    if data_cfg.download:
        raise UserError("openimages is not downloaded automatically (hundreds of GB); fetch the images and the "
                        "human image-level label CSVs (e.g. with the OpenImages downloader) into data.root, and set "
                        "data.download: false")
    root = require_root(data_cfg.root, "openimages")
    label_paths = {split: _find(root, name) for split, (name, _) in LABEL_FILES.items()}
    label_paths = {split: path for split, path in label_paths.items() if path is not None}
    if "train" not in label_paths:
        raise UserError(f"no OpenImages labels found in {root}: expected {LABEL_FILES['train'][0]} (and "
                        f"{LABEL_FILES['val'][0]}) next to the train/ and validation/ image folders")
    descriptions_path = _find(root, DESCRIPTIONS)
    descriptions = _read_descriptions(descriptions_path) if descriptions_path else {}
    if descriptions_path is None:
        log.warning("%s not found in %s; classes are named by their LabelName (e.g. /m/011k07)", DESCRIPTIONS, root)

    train_labels = _read_labels(label_paths["train"])
    mids = sorted({mid for positives, negatives in train_labels.values() for mid in (*positives, *negatives)})
    if not mids:
        raise UserError(f"{label_paths['train'].name} holds no labels")
    index = {mid: i for i, mid in enumerate(mids)}

    def split(name: str) -> list[Sample]:
        labels = train_labels if name == "train" else _read_labels(label_paths[name])
        images_dir = root / LABEL_FILES[name][1]
        if not images_dir.is_dir():
            raise UserError(f"OpenImages image folder {images_dir} is missing; put the {LABEL_FILES[name][1]} images "
                            f"there as <ImageID>.jpg")
        files = _image_files(images_dir)
        samples, unknown_classes = [], set()
        for image_id, (positives, negatives) in labels.items():
            if image_id not in files:
                continue
            unknown_classes.update(m for m in (*positives, *negatives) if m not in index)
            samples.append(Sample(files[image_id], SparseTarget([index[m] for m in positives if m in index],
                                                                [index[m] for m in negatives if m in index],
                                                                len(mids))))
        if not samples:
            raise UserError(f"none of the {len(labels)} images labelled in {label_paths[name].name} is in "
                            f"{images_dir}; are the images there, named <ImageID>.jpg?")
        if len(samples) < len(labels):
            log.info("openimages %s: %d of %d labelled images are on disk; using those", name, len(samples),
                     len(labels))
        if unknown_classes:
            log.info("openimages %s: ignoring %d class(es) the training labels never use", name, len(unknown_classes))
        return samples

    loaders = {name: (lambda n=name: split(n)) for name in label_paths}
    return DataSource(MULTI_LABEL, _unique_names(mids, descriptions), LazySplits(loaders),
                      aliases={"validation": "val"} if "val" in loaders else {}, name="openimages")
