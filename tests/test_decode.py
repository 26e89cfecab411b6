"""Reduced-size JPEG decoding: as small as the pipeline allows, never smaller, EXIF-aware, JPEG only."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tresfinetune.datasets import SINGLE_LABEL, ImageDataset, Sample, build_transforms
from tresfinetune.datasets.images import REDUCED_RGB_FLAGS, DecodedImageCache, jpeg_reduction, load_image
from tresfinetune.errors import UserError
from tresfinetune.predict import ImageFiles
from tresfinetune.recipes import recipe_from_dict

WIDTH, HEIGHT = 1200, 900


def photo_pixels(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth.astype(np.int16) + rng.integers(-10, 10, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "big.jpg"
    Image.fromarray(photo_pixels()).save(path, quality=90)
    return path


def pipeline(size: int, train: bool, dataset: str = "folder"):
    return build_transforms(recipe_from_dict({"input_size": size, "data": {"name": dataset}}), train=train)


def applied(transforms: list, image: np.ndarray, seed: int) -> list:
    """The parameters albumentations drew for each step of `transforms` on `image`."""
    traced = A.Compose(transforms, save_applied_params=True)
    traced.set_random_seed(seed)
    return traced(image=image)["applied_transforms"]


def crop_sides(step: tuple) -> tuple[int, int]:
    x_min, y_min, x_max, y_max = step[1]["crop_coords"]
    return x_max - x_min, y_max - y_min


@pytest.mark.parametrize("size, factor", [(64, 4), (224, 2), (448, 1)])
def test_random_crops_from_a_reduced_decode_are_never_smaller_than_the_output(big_jpeg, size, factor):
    train = pipeline(size, train=True)  # RandomResizedCrop(scale 0.25-1, ratio 3/4-4/3) + flip
    decoded = load_image(big_jpeg, train.decode_fits)
    assert decoded.shape == (-(-HEIGHT // factor), -(-WIDTH // factor), 3)
    smallest = min(min(crop_sides(applied(train.compose.transforms, decoded, seed)[0])) for seed in range(300))
    assert smallest >= size  # every output pixel comes from at least one decoded pixel: no upsampling
    if factor < 8:  # and the reduction is the largest possible: one more halving would upsample some crops
        halved = cv2.imread(str(big_jpeg), REDUCED_RGB_FLAGS[2 * factor])
        too_small = min(min(crop_sides(applied(train.compose.transforms, halved, seed)[0])) for seed in range(300))
        assert too_small < size


@pytest.mark.parametrize("size, dataset, factor", [(64, "folder", 8), (224, "folder", 2), (448, "folder", 2),
                                                   (224, "coco", 4)])
def test_eval_resizes_only_shrink_a_reduced_decode(big_jpeg, size, dataset, factor):
    val = pipeline(size, train=False, dataset=dataset)  # shorter side to size / 0.875 + centre crop, or a squish
    decoded = load_image(big_jpeg, val.decode_fits)
    assert decoded.shape == (-(-HEIGHT // factor), -(-WIDTH // factor), 3)
    first = applied(val.compose.transforms, decoded, 0)[0]
    resize_target = round(size / 0.875) if first[0] == "SmallestMaxSize" else size
    assert min(decoded.shape[:2]) >= resize_target
    assert min(decoded.shape[:2]) < 2 * resize_target or factor == 8  # the next halving would be too small
    assert tuple(val(decoded).shape) == (size, size, 3)


def test_reduced_decode_keeps_the_exif_orientation(tmp_path):
    pixels = photo_pixels()
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    decoded = load_image(tmp_path / "rotated.jpg", pipeline(64, train=True).decode_fits)
    expected = cv2.resize(np.rot90(pixels, k=-1), (HEIGHT // 4, WIDTH // 4), interpolation=cv2.INTER_AREA)
    assert decoded.shape == expected.shape == (WIDTH // 4, HEIGHT // 4, 3)
    assert np.abs(decoded.astype(int) - expected).mean() < 3


def test_other_formats_decode_at_full_size(tmp_path):
    pixels = photo_pixels(400, 300)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    Image.fromarray(pixels).save(tmp_path / "png_named.jpg", format="PNG")
    fits = pipeline(64, train=False).decode_fits
    for name in ("photo.png", "png_named.jpg"):
        assert jpeg_reduction(str(tmp_path / name), fits) == 1
        assert np.array_equal(load_image(tmp_path / name, fits), pixels)


def test_training_evaluation_and_prediction_inputs_use_it(big_jpeg):
    samples = [Sample(str(big_jpeg), 0)]
    for train in (True, False):
        transform = pipeline(64, train=train)
        reduced = load_image(big_jpeg, transform.decode_fits)
        assert reduced.shape[0] < HEIGHT
        assert np.array_equal(ImageDataset(samples, transform, SINGLE_LABEL).load(0), reduced)
    val = pipeline(64, train=False)
    index, tensor = ImageFiles([big_jpeg], val)[0]  # predict's dataset
    assert index == 0 and torch.equal(tensor, val(load_image(big_jpeg, val.decode_fits)))
    assert not torch.equal(tensor, val(load_image(big_jpeg)))


def test_decoded_image_cache_returns_the_same_pixels_and_notices_changes(big_jpeg, tmp_path):
    cache = DecodedImageCache(tmp_path / "cache")
    fits = pipeline(64, train=True).decode_fits
    expected = load_image(big_jpeg, fits)
    for _ in range(2):
        assert np.array_equal(cache.load(big_jpeg, fits), expected)
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 1 and np.array_equal(np.load(entries[0]), expected)
    other_size = pipeline(224, train=False).decode_fits  # another reduction: its own entry
    assert np.array_equal(cache.load(big_jpeg, other_size), load_image(big_jpeg, other_size))
    edited = tmp_path / "edited.jpg"
    Image.fromarray(photo_pixels()).save(edited, quality=90)
    cache.load(edited, fits)
    Image.fromarray(255 - photo_pixels()).save(edited, quality=90)  # same name, new content
    assert np.array_equal(cache.load(edited, fits), load_image(edited, fits))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_training_loaders_use_the_cache_folder(tmp_path, big_jpeg):
    from tresfinetune.datasets import build_loaders

    root = tmp_path / "photos"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(big_jpeg.read_bytes())
    recipe = recipe_from_dict({"input_size": 64, "data": {"name": "folder", "root": str(root),
                                                          "decode_cache": str(tmp_path / "cache")},
                               "batch_size": 2, "workers": 0})
    train_loader, val_loader, _ = build_loaders(recipe)
    first = [images for images, _ in val_loader]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2  # one per validation file
    assert all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in val_loader], strict=True))
    with pytest.raises(UserError, match="cannot create the data.decode_cache folder"):
        build_loaders(recipe_from_dict({"input_size": 64, "data": {
            "name": "folder", "root": str(root), "decode_cache": str(big_jpeg / "cache")}}))
