"""The public benchmark datasets, read from their official on-disk layouts (see SPEC.md section 7).

data.root may be the folder an archive unpacks into or its parent. Where a dataset has no validation split, "val" is
its official test split (and "test" is accepted as another name for it).
"""

from __future__ import annotations

import json
import logging
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from tresfinetune.datasets.download import RemoteFile, fetch
from tresfinetune.datasets.source import (
    DataSource,
    LazySplits,
    Sample,
    find_dataset_dir,
    multi_hot,
    partial_target,
    register,
    require_root,
)
from tresfinetune.errors import UserError
from tresfinetune.tasks import MULTI_LABEL, SINGLE_LABEL

log = logging.getLogger("tresfinetune")


def _download_root(data_cfg: Any, dataset: str) -> Path:
    if not data_cfg.root:
        raise UserError(f"dataset '{dataset}' needs data.root: the folder to download into "
                        "(e.g. --set data.root=~/data)")
    return Path(data_cfg.root).expanduser()


def _check_first_image(samples: list[Sample], images_dir: Path, dataset: str) -> None:
    """A missing first image almost always means the image folder is elsewhere: say so before training starts."""
    if samples and isinstance(samples[0].image, str) and not Path(samples[0].image).is_file():
        raise UserError(f"{dataset}: image '{samples[0].image}' named by the annotations is missing; are the images "
                        f"unpacked into {images_dir}?")


# ---- CIFAR --------------------------------------------------------------------------------------------------------

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py", "meta": "batches.meta", "names_key": "label_names", "labels_key": "labels",
        "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
        "remote": RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                             "c58f30108f718f92721af3b95e74349a", extract=True),
    },
    "cifar100": {
        "folder": "cifar-100-python", "meta": "meta", "names_key": "fine_label_names", "labels_key": "fine_labels",
        "train": ["train"], "test": ["test"],
        "remote": RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                             "eb9058c3a382ffc7106e4002c42a8d85", extract=True),
    },
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR ships Python 2 pickles of dicts, lists and numpy arrays; refuse anything else a file might smuggle in."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"CIFAR file '{path}' is missing; re-extract the official archive (or set data.download: true)")
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any unpickling failure means the file is not what CIFAR ships
        raise UserError(f"CIFAR file '{path}' is not a valid CIFAR pickle ({e}); re-extract the official archive") \
            from None


def _cifar_split(folder: Path, files: list[str], labels_key: str) -> list[Sample]:
    images, labels = [], []
    for name in files:
        batch = _read_cifar_pickle(folder / name)
        try:
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in batch[labels_key])
        except (KeyError, ValueError, TypeError):
            raise UserError(f"CIFAR file '{folder / name}' lacks 'data' / '{labels_key}' in the official layout") \
                from None
    # Planes R, G, B of 32x32 each -> HWC, one contiguous block the samples are views of.
    pixels = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
    return [Sample(pixels[i], label) for i, label in enumerate(labels)]


def _build_cifar(data_cfg: Any, name: str) -> DataSource:
    layout = CIFAR[name]
    folder_name, meta = layout["folder"], layout["meta"]
    if data_cfg.download:
        root = _download_root(data_cfg, name)
        if find_dataset_dir(root, folder_name, meta) is None:
            remote = layout["remote"]
            fetch([remote], root, f"download {remote.url} yourself and unpack it into {root}")
    root = require_root(data_cfg.root, name)
    folder = find_dataset_dir(root, folder_name, meta)
    if folder is None:
        raise UserError(f"no {name} found in {root}: expected {folder_name}/{meta} (the official python version, "
                        f"unpacked); set data.download: true to fetch it")
    class_names = [str(n) for n in _read_cifar_pickle(folder / meta)[layout["names_key"]]]
    splits = LazySplits({
        "train": lambda: _cifar_split(folder, layout["train"], layout["labels_key"]),
        "val": lambda: _cifar_split(folder, layout["test"], layout["labels_key"]),
    })
    return DataSource(SINGLE_LABEL, class_names, splits, aliases={"test": "val"}, name=name)


@register("cifar10", SINGLE_LABEL)
def build_cifar10(data_cfg: Any) -> DataSource:
    return _build_cifar(data_cfg, "cifar10")


@register("cifar100", SINGLE_LABEL)
def build_cifar100(data_cfg: Any) -> DataSource:
    return _build_cifar(data_cfg, "cifar100")


# ---- Oxford Flowers-102 -------------------------------------------------------------------------------------------

FLOWERS_BASE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS_FILES = [
    RemoteFile(FLOWERS_BASE + "102flowers.tgz", "52808999861908f626f3c1f4e79d11fa", extract=True),
    RemoteFile(FLOWERS_BASE + "imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
    RemoteFile(FLOWERS_BASE + "setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c"),
]


def _load_mat(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} '{path}' is missing; put the official file there")
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises several types for non-.mat content
        raise UserError(f"{what} '{path}' is not a readable .mat file ({e})") from None


def _flower_names() -> list[str]:
    from torchvision.datasets import Flowers102

    names = getattr(Flowers102, "classes", None)
    return list(names) if names and len(names) == 102 else [str(i) for i in range(1, 103)]


@register("flowers102", SINGLE_LABEL)
def build_flowers102(data_cfg: Any) -> DataSource:
    if data_cfg.download:
        root = _download_root(data_cfg, "flowers102")
        if find_dataset_dir(root, "flowers-102", "setid.mat") is None:
            fetch(FLOWERS_FILES, root / "flowers-102",
                  f"download 102flowers.tgz, imagelabels.mat and setid.mat from {FLOWERS_BASE} into "
                  f"{root / 'flowers-102'} and unpack the .tgz there")
    root = require_root(data_cfg.root, "flowers102")
    folder = find_dataset_dir(root, "flowers-102", "imagelabels.mat")
    if folder is None:
        raise UserError(f"no flowers102 found in {root}: expected flowers-102/imagelabels.mat, setid.mat and jpg/ "
                        f"(from {FLOWERS_BASE}); set data.download: true to fetch them")
    labels = np.atleast_1d(_load_mat(folder / "imagelabels.mat", "flowers102 label file")["labels"]).astype(int)
    setid = _load_mat(folder / "setid.mat", "flowers102 split file")
    if not (folder / "jpg").is_dir():
        raise UserError(f"flowers102: image folder {folder / 'jpg'} is missing; unpack 102flowers.tgz into {folder}")
    names = _flower_names() if labels.max() <= 102 else [str(i) for i in range(1, labels.max() + 1)]

    def split(key: str) -> list[Sample]:
        # Image numbers and labels are 1-based.
        samples = [Sample(str(folder / "jpg" / f"image_{n:05d}.jpg"), int(labels[n - 1]) - 1)
                   for n in np.atleast_1d(setid[key]).astype(int)]
        _check_first_image(samples, folder / "jpg", "flowers102")
        return samples

    splits = LazySplits({"train": lambda: split("trnid"), "val": lambda: split("valid"),
                         "test": lambda: split("tstid")})
    return DataSource(SINGLE_LABEL, names, splits, name="flowers102")


# ---- Stanford Cars ------------------------------------------------------------------------------------------------

CARS_LAYOUT = ("stanford_cars/devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
               "cars_train/ and cars_test/")


@register("stanford_cars", SINGLE_LABEL)
def build_stanford_cars(data_cfg: Any) -> DataSource:
    if data_cfg.download:
        raise UserError("stanford_cars cannot be downloaded: its original URL is dead; get the files (e.g. from a "
                        f"Kaggle mirror of 'Stanford Cars'), arrange them as {CARS_LAYOUT} under data.root, and set "
                        "data.download: false")
    root = require_root(data_cfg.root, "stanford_cars")
    folder = find_dataset_dir(root, "stanford_cars", "devkit/cars_meta.mat")
    if folder is None:
        raise UserError(f"no stanford_cars found in {root}: expected {CARS_LAYOUT}")
    class_names = [str(n) for n in np.atleast_1d(_load_mat(folder / "devkit" / "cars_meta.mat",
                                                          "stanford_cars class file")["class_names"])]

    def split(annotations: list[Path], images_name: str) -> list[Sample]:
        path = next((p for p in annotations if p.is_file()), annotations[0])
        records = np.atleast_1d(_load_mat(path, "stanford_cars annotation file")["annotations"])
        images_dir = folder / images_name
        if (images_dir / images_name).is_dir():  # some mirrors nest cars_train/cars_train/
            images_dir = images_dir / images_name
        if not images_dir.is_dir():
            raise UserError(f"stanford_cars: image folder {images_dir} is missing")
        samples = [Sample(str(images_dir / str(r["fname"])), int(r["class"]) - 1) for r in records]
        _check_first_image(samples, images_dir, "stanford_cars")
        return samples

    test_annos = [folder / "cars_test_annos_withlabels.mat", folder / "devkit" / "cars_test_annos_withlabels.mat"]
    splits = LazySplits({
        "train": lambda: split([folder / "devkit" / "cars_train_annos.mat"], "cars_train"),
        "val": lambda: split(test_annos, "cars_test"),
    })
    return DataSource(SINGLE_LABEL, class_names, splits, aliases={"test": "val"}, name="stanford_cars")


# ---- MS-COCO (multi-label classification) -------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"COCO annotation file '{path}' is not valid JSON ({e})") from None


@register("coco", MULTI_LABEL)
def build_coco(data_cfg: Any) -> DataSource:
    if data_cfg.download:
        raise UserError("coco is not downloaded automatically (about 20 GB); get train2014.zip, val2014.zip and "
                        "annotations_trainval2014.zip from cocodataset.org, unzip them into data.root, and set "
                        "data.download: false")
    root = require_root(data_cfg.root, "coco")
    base = next((b for b in (root, root / "coco") if (b / "annotations").is_dir()), None)
    if base is None:
        raise UserError(f"no COCO annotations found in {root}: expected annotations/instances_train2014.json and "
                        "instances_val2014.json (or 2017) next to train2014/ and val2014/")
    years = [y for y in ("2014", "2017") if (base / "annotations" / f"instances_val{y}.json").is_file()
             or (base / "annotations" / f"instances_train{y}.json").is_file()]
    if not years:
        raise UserError(f"COCO annotation file {base / 'annotations' / 'instances_train2014.json'} is missing "
                        "(2017 files are accepted too)")
    if len(years) > 1:
        log.info("found COCO 2014 and 2017 annotations; using 2014 as train/val (2017 as train2017/val2017)")
    cache: dict[str, dict] = {}

    def annotations(split: str) -> dict:
        if split not in cache:
            path = base / "annotations" / f"instances_{split}.json"
            if not path.is_file():
                raise UserError(f"COCO annotation file '{path}' is missing")
            cache[split] = _read_json(path)
        return cache[split]

    primary = years[0]
    first = f"val{primary}" if (base / "annotations" / f"instances_val{primary}.json").is_file() else f"train{primary}"
    try:
        categories = sorted(annotations(first)["categories"], key=lambda c: c["id"])
        class_names = [str(c["name"]) for c in categories]
    except (KeyError, TypeError):
        raise UserError(f"COCO annotation file for {first} has no 'categories' list") from None
    index_of_category = {c["id"]: i for i, c in enumerate(categories)}

    def split(name: str) -> list[Sample]:
        raw = annotations(name)
        images_dir = next((d for d in (base / name, base / "images" / name) if d.is_dir()), base / name)
        if not images_dir.is_dir():
            raise UserError(f"COCO image folder {images_dir} is missing; unzip {name}.zip into {base}")
        try:
            labels: dict[int, set[int]] = {image["id"]: set() for image in raw["images"]}
            for annotation in raw["annotations"]:
                labels[annotation["image_id"]].add(index_of_category[annotation["category_id"]])
            # Images without objects stay in, with an all-zero target, as in the ASL protocol.
            samples = [Sample(str(images_dir / image["file_name"]), multi_hot(labels[image["id"]], len(class_names)))
                       for image in sorted(raw["images"], key=lambda im: im["id"])]
        except (KeyError, TypeError) as e:
            raise UserError(f"COCO annotation file instances_{name}.json is not in the instances format (problem "
                            f"at {e!r}); use the official instances_*.json files") from None
        finally:
            del cache[name]  # the parsed JSON is large; the samples are all we keep
        _check_first_image(samples, images_dir, "coco")
        return samples

    loaders = {}
    for year in years:
        suffix = "" if year == primary else year
        for part in ("train", "val"):
            if (base / "annotations" / f"instances_{part}{year}.json").is_file():
                loaders[f"{part}{suffix}"] = lambda n=f"{part}{year}": split(n)
    aliases = {f"{part}{primary}": part for part in ("train", "val") if part in loaders}
    if "val" in loaders:
        aliases["test"] = "val"
    return DataSource(MULTI_LABEL, class_names, LazySplits(loaders), aliases=aliases, name="coco")


# ---- PASCAL VOC 2007 (multi-label classification) -----------------------------------------------------------------

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _voc_target(path: Path, use_difficult: bool | str) -> np.ndarray:
    """The image's target: difficult objects count as positives (True), are left out (False), or make a class with
    only difficult objects unknown ("unknown")."""
    if use_difficult != "unknown":
        return multi_hot(_voc_labels(path, bool(use_difficult)), len(VOC_CLASSES))
    clear, every = _voc_labels(path, False), _voc_labels(path, True)
    only_difficult = every - clear
    return partial_target(clear, set(range(len(VOC_CLASSES))) - only_difficult, len(VOC_CLASSES))


def _voc_labels(path: Path, use_difficult: bool) -> set[int]:
    if not path.is_file():
        raise UserError(f"VOC annotation file '{path}' is missing")
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise UserError(f"VOC annotation file '{path}' is not valid XML ({e})") from None
    labels = set()
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise UserError(f"VOC annotation file '{path}' names an unknown class '{name}'")
        if use_difficult or (obj.findtext("difficult") or "0").strip() != "1":
            labels.add(VOC_CLASSES.index(name))
    return labels


@register("voc2007", MULTI_LABEL)
def build_voc2007(data_cfg: Any) -> DataSource:
    if data_cfg.download:
        raise UserError("voc2007 is not downloaded automatically; get VOCtrainval_06-Nov-2007.tar and "
                        "VOCtest_06-Nov-2007.tar (e.g. from a PASCAL VOC mirror), unpack both into data.root, and set "
                        "data.download: false")
    root = require_root(data_cfg.root, "voc2007")
    folder = next((c for c in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007")
                   if (c / "ImageSets" / "Main").is_dir()), None)
    if folder is None:
        raise UserError(f"no VOC2007 found in {root}: expected VOCdevkit/VOC2007/ImageSets/Main/trainval.txt, "
                        "Annotations/ and JPEGImages/")

    def split(list_name: str) -> list[Sample]:
        ids = [line.split()[0] for line in (folder / "ImageSets" / "Main" / f"{list_name}.txt").read_text().splitlines()
               if line.strip()]
        samples = [Sample(str(folder / "JPEGImages" / f"{i}.jpg"),
                          _voc_target(folder / "Annotations" / f"{i}.xml", data_cfg.use_difficult))
                   for i in ids]
        _check_first_image(samples, folder / "JPEGImages", "voc2007")
        return samples

    # The ASL protocol: train on trainval, evaluate on test.
    loaders = {}
    if (folder / "ImageSets" / "Main" / "trainval.txt").is_file():
        loaders["train"] = lambda: split("trainval")
    if (folder / "ImageSets" / "Main" / "test.txt").is_file():
        loaders["val"] = lambda: split("test")
    if not loaders:
        raise UserError(f"VOC split lists {folder / 'ImageSets' / 'Main'}/trainval.txt and test.txt are missing")
    return DataSource(MULTI_LABEL, VOC_CLASSES, LazySplits(loaders), aliases={"trainval": "train", "test": "val"},
                      name="voc2007")
