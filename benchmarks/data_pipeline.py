"""Decode + augment throughput on one worker: our albumentations pipeline vs the same with torchvision.transforms.v2.

    python benchmarks/data_pipeline.py [--images 48] [--repeats 5]

Generates JPEG photos of realistic size (500x375, smooth colour fields plus texture, quality 90) in a temporary
folder, then times, interleaved in one run and on one thread (as one DataLoader worker has):
  ours        load_image (OpenCV decode, EXIF orientation) + build_transforms(recipe) -> uint8 HWC tensors, stacked:
              what a loader worker does (the float conversion happens per batch on the training device)
  ours+float  the same plus to_model_input on the CPU (uint8 NHWC batch -> float NCHW in [0, 1]): the worst case
  tv2         PIL open + EXIF transpose + convert RGB + the equivalent torchvision.transforms.v2 pipeline
  tv2-io      torchvision.io.decode_image (also EXIF-aware) + the same v2 pipeline on tensors
for training (RandomResizedCrop + flip) and evaluation (the default at each size) at 224 and 448, each including the
copy into batches of 16 that a DataLoader's collate does. The tv2 pipelines end in float tensors, as usually written.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torchvision.transforms import v2

from tresfinetune.datasets import build_transforms, load_image
from tresfinetune.datasets.transforms import CROP_FRACTION, DEFAULT_CROP_SCALE, SQUISH_FROM_SIZE, to_model_input
from tresfinetune.recipe import recipe_from_dict


def make_photos(folder: Path, count: int, size: tuple[int, int] = (375, 500)) -> list[Path]:
    """Photo-like JPEGs: a smooth, upsampled colour field with fine noise, so the JPEG has realistic entropy."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = cv2.resize(field, (size[1], size[0]), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        texture = rng.normal(0, 12, (*size, 3)).astype(np.int16)
        pixels = np.clip(smooth + texture, 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def ours(size: int, train: bool) -> Callable[[Path], torch.Tensor]:
    recipe = recipe_from_dict({"model": {"name": "tresnet_m"}, "input_size": size, "data": {"name": "folder"}})
    pipeline = build_transforms(recipe, train=train)
    return lambda path: pipeline(load_image(path))  # uint8; made float per batch by to_model_input (timed too)


def tv2_transform(size: int, train: bool) -> v2.Compose:
    if train:
        geometry = [v2.RandomResizedCrop(size, scale=DEFAULT_CROP_SCALE, antialias=True), v2.RandomHorizontalFlip()]
    elif size >= SQUISH_FROM_SIZE:
        geometry = [v2.Resize((size, size), antialias=True)]
    else:
        geometry = [v2.Resize(round(size / CROP_FRACTION), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True)])


def tv2_pil(size: int, train: bool) -> Callable[[Path], torch.Tensor]:
    transform = tv2_transform(size, train)

    def run(path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return transform(ImageOps.exif_transpose(image).convert("RGB"))

    return run


def tv2_io(size: int, train: bool) -> Callable[[Path], torch.Tensor]:
    transform = tv2_transform(size, train)
    mode = torchvision.io.ImageReadMode.RGB
    return lambda path: transform(torchvision.io.decode_image(str(path), mode=mode, apply_exif_orientation=True))


def images_per_second(run: Callable[[Path], torch.Tensor], paths: list[Path], convert: bool = False,
                      batch: int = 16) -> float:
    """Until a batch exists, including the copy into it that a DataLoader's collate does; with `convert`, also
    the conversion of our uint8 NHWC batch to a float NCHW one (done on the training device in real runs; timed
    here on the CPU, the worst case).

    The batch buffer is reused: allocating a fresh one costs both paths the same and mostly measures page faults.
    """
    buffer = None
    cpu = torch.device("cpu")
    start = time.perf_counter()
    for first in range(0, len(paths), batch):
        images = [run(path) for path in paths[first:first + batch]]
        if buffer is None:
            buffer = torch.empty((batch, *images[0].shape), dtype=images[0].dtype)
        stacked = torch.stack(images, out=buffer[: len(images)])
        if convert:
            to_model_input(stacked, cpu, [0.0] * 3, [1.0] * 3)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.images)
        print(f"{len(paths)} JPEGs of 500x375 (quality 90, ~{paths[0].stat().st_size // 1024} KiB), one thread, "
              f"median of {args.repeats} interleaved passes; torch {torch.__version__}, OpenCV {cv2.__version__}")
        header = (f"{'size':>4} {'mode':<5} {'ours':>6} {'ours+float':>10} {'tv2':>6} {'tv2-io':>6}   "
                  f"{'ours/tv2':>8} {'ours+float/tv2':>14} {'ours/tv2-io':>11}")
        print(header)
        print("-" * len(header))
        for size in (224, 448):
            for train in (True, False):
                runners = {"ours": (ours(size, train), False), "ours+float": (ours(size, train), True),
                           "tv2": (tv2_pil(size, train), False), "tv2-io": (tv2_io(size, train), False)}
                for run, _ in runners.values():  # warm-up: caches, lazy imports, the files in the page cache
                    run(paths[0])
                rates: dict[str, list[float]] = {name: [] for name in runners}
                for _ in range(args.repeats):
                    for name, (run, convert) in runners.items():
                        rates[name].append(images_per_second(run, paths, convert))
                med = {name: statistics.median(r) for name, r in rates.items()}
                print(f"{size:>4} {'train' if train else 'eval':<5} {med['ours']:>6.0f} {med['ours+float']:>10.0f} "
                      f"{med['tv2']:>6.0f} {med['tv2-io']:>6.0f}   {med['ours'] / med['tv2']:>7.2f}x "
                      f"{med['ours+float'] / med['tv2']:>13.2f}x {med['ours'] / med['tv2-io']:>10.2f}x")


if __name__ == "__main__":
    main()
