"""A photo whose download was cut short is an unreadable image everywhere: load_image, the decode cache, `data check`,
the training loaders, evaluate and predict. Intact photos (EXIF thumbnail, progressive, a phone's trailer after the
end marker, PNG with bytes after IEND) are never flagged."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from tresfinetune.datasets import build_loaders
from tresfinetune.datasets.check import check_data
from tresfinetune.datasets.images import DecodedImageCache, UnreadableImage, load_image, read_jpeg_header
from tresfinetune.errors import UserError
from tresfinetune.evaluate import evaluate
from tresfinetune.models.from_checkpoint import load_trained_model
from tresfinetune.predict import predict
from tresfinetune.recipes import recipe_from_dict

CUTS = (0.02, 0.10, 0.40, 0.90, 0.995)  # fractions of the file's bytes kept
# A trailer as Samsung phones append after the end-of-image marker (it may hold any bytes, FF D9 included).
PHONE_TRAILER = b"\x00\x00Image_UTC_Data1458170015363SEFH\x01\x00\x00\x00\xff\xd8\xff\xd9" + bytes(range(256)) + b"SEFT"


def exif_with_thumbnail(photo: np.ndarray) -> bytes:
    """An EXIF block (APP1 payload) as cameras write it: orientation in IFD0, and in IFD1 a 160x120 JPEG thumbnail,
    a whole JPEG with its own scan and end marker."""
    buffer = io.BytesIO()
    Image.fromarray(photo).resize((160, 120)).save(buffer, "JPEG", quality=80)
    thumbnail = buffer.getvalue()
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 1) + struct.pack("<I", 26)  # next IFD at 26
    ifd1_size = 2 + 2 * 12 + 4
    ifd1 = (struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 26 + ifd1_size)  # thumbnail offset
            + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0))
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + thumbnail


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Intact files of a real photo, by file name."""
    photo = load_sample_image("china.jpg")
    exif = exif_with_thumbnail(photo)

    def encode(fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, fmt, **options)
        return buffer.getvalue()

    baseline = encode("JPEG", quality=90, exif=exif)
    progressive = encode("JPEG", quality=90, progressive=True, exif=exif)
    png = encode("PNG")
    # Cut after the picture's end marker: a partial trailer, or (as in a phone's multi-picture file, whose second
    # picture follows the first) a partial second picture; the picture itself is whole.
    return {"exif.jpg": baseline, "progressive.jpg": progressive, "trailer.jpg": baseline + PHONE_TRAILER,
            "trailer_cut.jpg": baseline + PHONE_TRAILER[:20], "second_cut.jpg": baseline + progressive[:5000],
            "photo.png": png, "trailer.png": png + b"tEXt junk after IEND"}


def cut_files(photos: dict[str, bytes]) -> dict[str, bytes]:
    """Each of exif.jpg, progressive.jpg and photo.png cut at every fraction of CUTS, plus the PNG without its IEND
    chunk (all the pixels are there: Pillow reads it, but it is still a download cut short)."""
    cut = {f"{Path(name).stem}_cut{round(1000 * f)}{Path(name).suffix}": photos[name][: int(len(photos[name]) * f)]
           for name in ("exif.jpg", "progressive.jpg", "photo.png") for f in CUTS}
    cut["photo_no_iend.png"] = photos["photo.png"][:-12]
    return cut


def write(folder: Path, files: dict[str, bytes]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def test_the_test_photos_are_what_they_claim(photos):
    for name in ("exif.jpg", "progressive.jpg"):
        data = photos[name]
        header = read_jpeg_header(data)
        # The thumbnail's own end marker sits in the header, before the photo's first scan.
        assert 0 < data.index(b"\xff\xd9") < header.first_scan and (header.width, header.height) == (640, 427)
        with Image.open(io.BytesIO(data)) as image:
            assert image.getexif()[0x0112] == 1
            assert image.info.get("progressive", 0) == (name == "progressive.jpg")
    assert photos["progressive.jpg"].count(b"\xff\xda") > 2  # several scans


def test_intact_photos_decode_and_cut_ones_are_unreadable(photos, tmp_path):
    intact = write(tmp_path / "intact", photos)
    cut = write(tmp_path / "cut", cut_files(photos))
    for name, path in intact.items():
        with Image.open(io.BytesIO(photos[name])) as image:  # Pillow: another decoder, the same libjpeg and zlib
            reference = np.asarray(image.convert("RGB"), np.int16)
        assert np.abs(load_image(path) - reference).max() <= 2, name
        quarter = load_image(path, lambda width, height: width >= 100 and height >= 100)
        assert quarter.shape == ((107, 160, 3) if name.endswith(".jpg") else (427, 640, 3)), name
    cache = DecodedImageCache(tmp_path / "cache")
    for path in cut.values():
        with pytest.raises(UnreadableImage, match="truncated"):
            load_image(path)
        with pytest.raises(UnreadableImage, match="truncated"):
            load_image(path, lambda width, height: width >= 32 and height >= 32)
        with pytest.raises(UnreadableImage, match="truncated"):
            cache.load(path)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing cached for a cut file


def write_dataset(root: Path, photos: dict[str, bytes]) -> tuple[set[str], set[str]]:
    """A folder dataset (classes 'city' and 'temple') of intact and cut photos; (intact paths, cut paths)."""
    cut = cut_files(photos)
    names = sorted(photos) + sorted(cut)
    files = {**photos, **cut}
    intact_paths, cut_paths = set(), set()
    for i, name in enumerate(names):
        (path,) = write(root / ("city" if i % 2 else "temple"), {name: files[name]}).values()
        (cut_paths if name in cut else intact_paths).add(str(path))
    return intact_paths, cut_paths


def test_data_check_reports_every_cut_photo(photos, tmp_path):
    intact, cut = write_dataset(tmp_path / "photos", photos)
    recipe = recipe_from_dict({"model": {"name": "tresnet_m"}, "input_size": 32,
                               "data": {"name": "folder", "root": str(tmp_path / "photos"), "val_fraction": 0.3}})
    report = check_data(recipe)
    assert set(report["unreadable"]) == cut
    assert sum(split["images"] for split in report["splits"].values()) == len(intact)


def test_loaders_skip_cut_photos_or_stop_on_them(photos, tmp_path):
    intact, cut = write_dataset(tmp_path / "photos", photos)
    raw = {"model": {"name": "tresnet_m"}, "input_size": 32, "batch_size": 64, "workers": 0,
           "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}],
                          "val": [{"Resize": {"height": 32, "width": 32}}]},
           "data": {"name": "folder", "root": str(tmp_path / "photos"), "val_fraction": 0.3}}
    train_loader, val_loader, _ = build_loaders(recipe_from_dict(raw))
    train_loader.sampler.set_epoch(0)
    seen = sum(len(targets) for loader in (train_loader, val_loader) for _, targets in loader)
    assert seen == len(intact)
    assert set(train_loader.bad_images.paths) == cut
    assert all("truncated" in reason for reason in train_loader.bad_images.paths.values())

    raw["data"]["on_bad_image"] = "error"
    strict, _, _ = build_loaders(recipe_from_dict(raw))
    strict.sampler.set_epoch(0)
    with pytest.raises(UserError, match=r"cannot read image '.*_cut\d+\.(jpg|png)' \(truncated"):
        list(strict)


@pytest.mark.usefixtures("torch_one_thread")
def test_evaluate_and_predict_skip_cut_photos(photos, single_label_run, tmp_path):
    cut = write(tmp_path / "cut", cut_files(photos))
    intact = write(tmp_path / "cut", photos)
    result = predict([tmp_path / "cut"], checkpoint=single_label_run, batch_size=8)
    assert {Path(path).name for path, _ in result.unreadable} == set(cut)
    assert {Path(p.path).name for p in result.predictions} == set(intact)

    # The run's own colour data, with the cut photos added to one class: evaluate skips them and reports them.
    data = shutil.copytree(Path(load_trained_model(single_label_run).info.recipe["data"]["root"]), tmp_path / "data")
    added = {str(path) for path in write(data / "red", cut_files(photos)).values()}
    skipped = set()
    for split in ("train", "val"):
        report = evaluate(single_label_run, overrides=[f"data.root={data}"], split=split, plot=False,
                          workers=0).report
        skipped.update(report["skipped_unreadable"])
    assert skipped == added
