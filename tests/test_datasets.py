"""Dataset sources: small trees in each real on-disk layout, written here and read back."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from tresfinetune.datasets import UnreadableImage, build_source, load_image, source_names
from tresfinetune.datasets.source import seeded_split
from tresfinetune.errors import UserError
from tresfinetune.recipe import DataConfig


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def cfg(name: str, root: Path | str | None = None, **kwargs) -> DataConfig:
    return DataConfig(name=name, root=str(root) if root is not None else None, **kwargs)


def test_registry_names():
    assert set(source_names()) == {"cifar10", "cifar100", "flowers102", "stanford_cars", "coco", "voc2007", "folder",
                                   "multilabel_csv", "digits", "openimages", "webdataset"}


# ---- CIFAR ----------------------------------------------------------------------------------------------------------


def _cifar_batch(n: int, offset: int, labels_key: str) -> dict:
    data = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        data[i, :1024] = offset + i  # red plane
        data[i, 1024:2048] = 100  # green plane
        data[i, 2048 + 5] = 200  # blue, row 0 column 5
    return {"data": data, labels_key: [(offset + i) % 3 for i in range(n)], "batch_label": "x"}


def write_cifar10(parent: Path) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(_cifar_batch(2, 10 * b, "labels"), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(3, 100, "labels"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"], "num_cases_per_batch": 2}, f, protocol=2)
    return folder


def test_cifar10_layout_and_pixels(tmp_path):
    folder = write_cifar10(tmp_path)
    for root in (tmp_path, folder):  # the unpacked folder or its parent
        source = build_source(cfg("cifar10", root))
        assert source.task == "single-label"
        assert source.class_names == ["airplane", "automobile", "bird"]
        assert len(source.split("train")) == 10 and len(source.split("val")) == 3
        assert source.split("test") is source.split("val")
    image, label = source.split("train")[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert label == 10 % 3
    assert tuple(image[0, 5]) == (10, 100, 200) and tuple(image[1, 5]) == (10, 100, 0)  # planes -> HWC, row-major
    with pytest.raises(UserError, match="no split 'tain'.*train.*did you mean 'train'"):
        source.split("tain")


def test_cifar100_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 4), ("test", 2)):
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(n, 0, "fine_labels"), f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "bee", "cup"], "coarse_label_names": ["x"]}, f, protocol=2)
    source = build_source(cfg("cifar100", tmp_path))
    assert source.class_names == ["apple", "bee", "cup"]
    assert [t for _, t in source.split("train")] == [0, 1, 2, 0]


def test_cifar_refuses_pickles_with_code_and_reports_missing(tmp_path):
    folder = write_cifar10(tmp_path)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [Path("x")]}, f)  # an object a plain CIFAR file never holds
    with pytest.raises(UserError, match="not a valid CIFAR pickle"):
        build_source(cfg("cifar10", tmp_path))
    (folder / "batches.meta").unlink()
    with pytest.raises(UserError, match="cifar-10-batches-py/batches.meta"):
        build_source(cfg("cifar10", tmp_path))


# ---- Flowers-102, Stanford Cars --------------------------------------------------------------------------------------


def test_flowers102_official_splits(tmp_path):
    folder = tmp_path / "flowers-102"
    for n in range(1, 7):
        write_image(folder / "jpg" / f"image_{n:05d}.jpg", n)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([[1, 2, 102, 1, 2, 102]])})
    scipy.io.savemat(folder / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]),
                                            "tstid": np.array([[5, 6]])})
    source = build_source(cfg("flowers102", tmp_path))
    assert len(source.class_names) == 102 and source.class_names[0] == "pink primrose"
    assert [Path(p).name for p, _ in source.split("train")] == ["image_00001.jpg", "image_00002.jpg"]
    assert [t for _, t in source.split("val")] == [101, 0]
    assert [t for _, t in source.split("test")] == [1, 101]
    (folder / "setid.mat").unlink()
    with pytest.raises(UserError, match="setid.mat"):
        build_source(cfg("flowers102", folder))


def _cars_annotations(names: list[str], classes: list[int]) -> np.ndarray:
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    return np.array([(1, 2, 20, 10, c, n) for n, c in zip(names, classes, strict=True)], dtype=dtype)


def test_stanford_cars_torchvision_layout(tmp_path):
    folder = tmp_path / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat",
                     {"class_names": np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)})
    scipy.io.savemat(folder / "devkit" / "cars_train_annos.mat",
                     {"annotations": _cars_annotations(["00001.jpg", "00002.jpg"], [1, 2])})
    scipy.io.savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": _cars_annotations(["00001.jpg"], [2])})
    for split, n in (("cars_train", 2), ("cars_test", 1)):
        for i in range(1, n + 1):
            write_image(folder / split / f"{i:05d}.jpg", i)
    source = build_source(cfg("stanford_cars", tmp_path))
    assert source.class_names == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert [t for _, t in source.split("train")] == [0, 1]
    (path, target), = source.split("val")
    assert path.endswith("cars_test/00001.jpg") and target == 1
    with pytest.raises(UserError, match="original URL is dead.*devkit"):
        build_source(cfg("stanford_cars", tmp_path, download=True))


# ---- COCO, VOC ------------------------------------------------------------------------------------------------------


def write_coco(root: Path, year: str = "2014") -> None:
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split, ids in (("train", [1, 2, 3]), ("val", [7])):
        images = [{"id": i, "file_name": f"COCO_{split}{year}_{i:012d}.jpg", "width": 32, "height": 24} for i in ids]
        annotations = [{"id": 1, "image_id": ids[0], "category_id": 90, "bbox": [0, 0, 1, 1]},
                       {"id": 2, "image_id": ids[0], "category_id": 1, "bbox": [0, 0, 1, 1]},
                       {"id": 3, "image_id": ids[0], "category_id": 1, "bbox": [0, 0, 2, 2]}]
        if len(ids) > 1:
            annotations.append({"id": 4, "image_id": ids[1], "category_id": 3, "bbox": [0, 0, 1, 1]})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}{year}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        for image in images:
            write_image(root / f"{split}{year}" / image["file_name"], image["id"])


def test_coco_multi_hot_with_sparse_ids(tmp_path):
    write_coco(tmp_path)
    source = build_source(cfg("coco", tmp_path))
    assert source.task == "multi-label"
    assert source.class_names == ["person", "car", "toothbrush"]  # category ids 1, 3, 90 in id order
    train = source.split("train")
    assert [t.tolist() for _, t in train] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]  # image 3 has no objects: kept
    assert train[0].target.dtype == np.float32
    assert len(source.split("val2014")) == 1 and len(source.split("test")) == 1


def test_coco_2017_and_missing_files(tmp_path):
    write_coco(tmp_path, "2017")
    source = build_source(cfg("coco", tmp_path))
    assert Path(source.split("val")[0].image).parent.name == "val2017"
    (tmp_path / "annotations" / "instances_val2017.json").unlink()
    (tmp_path / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(UserError, match="instances_train2014.json"):
        build_source(cfg("coco", tmp_path))


VOC_XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
VOC_OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult><bndbox/></object>"


def write_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    objects = {"000001": [("dog", 0), ("person", 1)], "000002": [("aeroplane", 0)], "000003": [("tvmonitor", 1)]}
    (voc / "Annotations").mkdir(parents=True)
    for image_id, objs in objects.items():
        write_image(voc / "JPEGImages" / f"{image_id}.jpg", int(image_id))
        body = "".join(VOC_OBJECT.format(name=n, difficult=d) for n, d in objs)
        (voc / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id, objects=body))
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000003\n")
    return voc


def test_voc2007_difficult_objects(tmp_path):
    voc = write_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):
        source = build_source(cfg("voc2007", root))
        assert source.task == "multi-label" and len(source.class_names) == 20
    first = source.split("train")[0].target
    assert first[source.class_names.index("dog")] == 1 and first[source.class_names.index("person")] == 0
    assert source.split("test")[0].target.sum() == 0  # only a difficult object
    with_difficult = build_source(cfg("voc2007", tmp_path, use_difficult=True))
    assert with_difficult.split("train")[0].target[with_difficult.class_names.index("person")] == 1
    assert with_difficult.split("val")[0].target.sum() == 1
    (voc / "Annotations" / "000002.xml").unlink()
    with pytest.raises(UserError, match="000002.xml"):
        build_source(cfg("voc2007", tmp_path)).split("train")


# ---- a user's folder ------------------------------------------------------------------------------------------------


def write_class_folders(root: Path, counts: dict[str, int]) -> None:
    seed = 0
    for name, count in counts.items():
        for i in range(count):
            seed += 1
            write_image(root / name / (f"IMG_{i}.JPG" if i % 2 else f"img_{i}.png"), seed)


def test_folder_ignores_odd_files_and_splits_stratified(tmp_path):
    write_class_folders(tmp_path, {"cat": 10, "dog": 5})
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "cat" / ".hidden.jpg")
    write_image(tmp_path / ".thumbnails" / "x.jpg")
    source = build_source(cfg("folder", tmp_path, val_fraction=0.2))
    assert source.class_names == ["cat", "dog"]
    train, val = source.split("train"), source.split("val")
    assert sorted(t for _, t in val) == [0, 0, 1]  # 20% of each class
    assert len(train) == 12 and not {p for p, _ in train} & {p for p, _ in val}
    assert all(Path(p).suffix.lower() in (".jpg", ".png") and not Path(p).name.startswith(".") for p, _ in train)
    again = build_source(cfg("folder", tmp_path, val_fraction=0.2))
    assert [p for p, _ in again.split("val")] == [p for p, _ in val]  # the split is seeded


def test_folder_with_train_and_val_folders(tmp_path):
    write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "Val", {"b": 1})
    source = build_source(cfg("folder", tmp_path))
    assert source.class_names == ["a", "b"]
    assert len(source.split("train")) == 4 and [t for _, t in source.split("val")] == [1]
    write_class_folders(tmp_path / "Val", {"zebra": 1})
    with pytest.raises(UserError, match="zebra' is not a class"):
        build_source(cfg("folder", tmp_path)).split("val")


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_source(cfg("folder", tmp_path / "missing"))
    with pytest.raises(UserError, match="is empty"):
        build_source(cfg("folder", tmp_path))
    with pytest.raises(UserError, match="needs data.root"):
        build_source(cfg("folder"))
    write_class_folders(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="class folder .*b' has no images"):
        build_source(cfg("folder", tmp_path))


def test_root_with_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_class_folders(tmp_path / "photos", {"a": 2, "b": 2})
    assert build_source(cfg("folder", "~/photos")).class_names == ["a", "b"]


# ---- multi-label CSV ------------------------------------------------------------------------------------------------


def test_multilabel_csv_label_list_style_with_split_column(tmp_path):
    for i in range(4):
        write_image(tmp_path / "images" / f"p{i}.jpg", i)
    (tmp_path / "labels.csv").write_text(
        "image;tags;split\nimages/p0.jpg;sky sea;train\nimages/p1.jpg;sea;train\nimages/p2;boat sky;val\n"
        "images/p3.jpg;;valid\n")
    source = build_source(cfg("multilabel_csv", tmp_path, csv="labels.csv", csv_delimiter=";"))
    assert source.task == "multi-label" and source.class_names == ["boat", "sea", "sky"]
    assert [t.tolist() for _, t in source.split("train")] == [[0, 1, 1], [0, 1, 0]]
    val = source.split("val")
    assert [t.tolist() for _, t in val] == [[1, 0, 1], [0, 0, 0]]
    assert val[0].image.endswith("p2.jpg")  # a name without extension finds its file


def test_multilabel_csv_one_column_per_class_and_seeded_split(tmp_path):
    rows = []
    for i in range(10):
        write_image(tmp_path / f"{i}.png", i)
        rows.append(f"{i}.png,{i % 2},{int(i < 3)}")
    (tmp_path / "y.csv").write_text("filename,cat,dog\n" + "\n".join(rows) + "\n")
    source = build_source(cfg("multilabel_csv", tmp_path, csv=str(tmp_path / "y.csv"), val_fraction=0.3))
    assert source.class_names == ["cat", "dog"]
    assert len(source.split("train")) == 7 and len(source.split("val")) == 3
    targets = {Path(p).name: t.tolist() for p, t in source.split("train") + source.split("val")}
    assert targets["1.png"] == [1, 1] and targets["4.png"] == [0, 0]


def test_multilabel_csv_errors(tmp_path):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "y.csv").write_text("file,labels\na.jpg,x\nmissing.jpg,y\n")
    with pytest.raises(UserError, match="row 3 names 'missing.jpg'"):
        build_source(cfg("multilabel_csv", tmp_path, csv="y.csv"))
    (tmp_path / "y.csv").write_text("file,a,b\na.jpg,1,maybe\n")
    with pytest.raises(UserError, match="column 'b': expected 1, 0 or -1"):
        build_source(cfg("multilabel_csv", tmp_path, csv="y.csv"))
    with pytest.raises(UserError, match="does not exist"):
        build_source(cfg("multilabel_csv", tmp_path, csv="nope.csv"))


# ---- digits, splits, images -----------------------------------------------------------------------------------------


def test_digits_offline():
    source = build_source(cfg("digits", val_fraction=0.2))
    assert source.class_names == [str(d) for d in range(10)]
    train, val = source.split("train"), source.split("val")
    assert len(train) + len(val) == 1797 and 340 <= len(val) <= 380
    image, label = train[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and 0 <= label <= 9
    assert image.min() < 64 and image.max() > 191  # ink and paper span the range
    assert {t for _, t in val} == set(range(10))


def test_seeded_split_keeps_classes_on_both_sides():
    train, val = seeded_split([0] * 5 + [1] * 2 + [2], 8, 0.1)
    assert sorted(train + val) == list(range(8))
    labels = [0] * 5 + [1] * 2 + [2]
    assert {labels[i] for i in val} == {0, 1} and 7 in train  # a single-image class stays in train


def test_load_image_formats(tmp_path):
    base = np.zeros((20, 30, 3), np.uint8)
    base[:10, :15] = (255, 0, 0)
    base[10:, 15:] = (0, 0, 255)
    picture = Image.fromarray(base)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    picture.save(tmp_path / "rotated.JPG", exif=exif, quality=95)
    rotated = load_image(tmp_path / "rotated.JPG")
    assert rotated.shape == (30, 20, 3)
    assert rotated[2, -3, 0] > 200 and rotated[2, -3, 2] < 60  # red top-left corner went to the top right
    picture.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    picture.convert("L").save(tmp_path / "grey.png")
    picture.convert("RGBA").save(tmp_path / "rgba.png")
    picture.convert("P").save(tmp_path / "palette.gif")
    Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    for name in ("cmyk.jpg", "rgba.png", "palette.gif"):
        image = load_image(tmp_path / name)
        assert image.shape == (20, 30, 3) and image.dtype == np.uint8
        assert np.abs(image[0, 0].astype(int) - (255, 0, 0)).max() < 8, name
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (20, 30, 3) and grey[0, 0, 0] == grey[0, 0, 2] == 76
    deep = load_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and deep[0, 0, 0] == 255 and deep[-1, -1, 0] == 0
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html></html>")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cmyk.jpg").read_bytes()[:200])
    for name in ("empty.jpg", "page.jpg", "cut.jpg", "absent.jpg"):
        with pytest.raises(UnreadableImage):
            load_image(tmp_path / name)
