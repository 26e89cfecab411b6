"""Decode + augment throughput on one worker: our albumentations pipeline vs the same with torchvision.transforms.v2.

    python benchmarks/data_pipeline.py [--photos small|phone|both|check|shards] [--images 48] [--phone-images 12]
                                       [--repeats 5]

Phone photos (--photos phone): 12 MP JPEGs (4032x3024, ~3 MB, made from scikit-learn's sample photos upscaled, with
noise), in an ImageFolder layout. Timed, interleaved, on one thread in this process (what one loader worker does),
in CPU seconds of this process, batches of 16 through a DataLoader:
  ours        ImageDataset + build_transforms (the defaults for a folder dataset): JPEGs decoded at the smallest DCT
              scale the pipeline allows, uint8 batches
  ours-full   the same with every image decoded at full size (the loader before reduced decoding)
  ours+cache  ours with data.decode_cache: "cache 1st" is the pass that decodes and fills it (timed before the
              others), "cache 2nd+" the later passes (epochs) that read the decoded pixels back
  tv2         torchvision's ImageFolder (PIL decoding) + the equivalent transforms.v2 pipeline, float batches
for training (RandomResizedCrop, scale 0.25-1, + flip) and evaluation (resize + centre crop at 224, squish at 448).

Small photos (--photos small):

Generates JPEG photos of realistic size (500x375, smooth colour fields plus texture, quality 90) in a temporary
folder, then times, interleaved in one run and on one thread (as one DataLoader worker has):
  ours        load_image (OpenCV decode, EXIF orientation) + build_transforms(recipe) -> uint8 HWC tensors, stacked:
              what a loader worker does (the float conversion happens per batch on the training device)
  ours+float  the same plus to_model_input on the CPU (uint8 NHWC batch -> float NCHW in [0, 1]): the worst case
  tv2         PIL open + EXIF transpose + convert RGB + the equivalent torchvision.transforms.v2 pipeline
  tv2-io      torchvision.io.decode_image (also EXIF-aware) + the same v2 pipeline on tensors
for training (RandomResizedCrop + flip) and evaluation (the default at each size) at 224 and 448, each including the
copy into batches of 16 that a DataLoader's collate does. The tv2 pipelines end in float tensors, as usually written.

The truncation check (--photos check, also part of "both"): load_image reads a JPEG into memory, walks its header to
the first scan and looks for the end-of-image marker after it, then decodes from memory. Timed, interleaved, against
the decode as it was before the check (OpenCV reading the file itself, Pillow reading the header for the DCT factor),
decode only (no augmentation: the worst case for the ratio), for small and phone photos, at full size and at the DCT
scale a 224 training pipeline allows; plus the check alone per file.

Shards (--photos shards): the same images as a folder (train/ and val/ holding the same files) and packed by
`tresfinetune data pack`, read by the training and validation loaders that `build_loaders` makes (one worker process,
224 px, batches of 16, the default transforms):
  folder      data.name: folder
  shards      data.name: webdataset, the images stored as they are
  max-side    data.name: webdataset packed with --max-side auto (images shrunk to what the 224 px pipelines need)
img/s per CPU second of the loader (this process plus its worker), median of interleaved passes; the pack time and
size are shown once. Small photos (500x375) and 12 MP phone photos.
"""

from __future__ import annotations

import argparse
import os
import resource
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
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from tresfinetune.datasets import SINGLE_LABEL, ImageDataset, Sample, build_transforms, load_image
from tresfinetune.datasets.images import REDUCED_RGB_FLAGS, DecodedImageCache, jpeg_reduction, list_images, truncation
from tresfinetune.datasets.loaders import collate_skipping_bad
from tresfinetune.datasets.transforms import CROP_FRACTION, DEFAULT_CROP_SCALE, SQUISH_FROM_SIZE, to_model_input
from tresfinetune.recipes import recipe_from_dict


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


PHONE_SIZE = (3024, 4032)  # a 12 MP phone photo, landscape


def make_phone_photos(folder: Path, count: int) -> list[Path]:
    """12 MP JPEGs in an ImageFolder layout (folder/photos/photo/*.jpg): real photos upscaled, with noise so that the
    file holds phone-like detail (~3 MB at quality 92)."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(0)
    sources = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    (folder / "photos" / "photo").mkdir(parents=True)
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        top, left = rng.integers(0, 40), rng.integers(0, 60)  # a different framing of the same scene each time
        crop = source[top:top + 380, left:left + 507]
        upscaled = cv2.resize(crop, PHONE_SIZE[::-1], interpolation=cv2.INTER_CUBIC).astype(np.int16)
        pixels = np.clip(upscaled + rng.normal(0, 6, upscaled.shape), 0, 255).astype(np.uint8)
        path = folder / "photos" / "photo" / f"photo_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def phone_loaders(root: Path, size: int, train: bool, batch: int, cache: Path) -> dict[str, DataLoader]:
    recipe = recipe_from_dict({"model": {"name": "tresnet_m"}, "input_size": size, "data": {"name": "folder"}})
    pipeline = build_transforms(recipe, train=train)
    samples = [Sample(str(path), 0) for path in list_images(root)]
    full = build_transforms(recipe, train=train)
    full.decode_fits = None  # decode every image at full size, as before reduced decoding
    common = {"batch_size": batch, "num_workers": 0}
    return {
        "ours": DataLoader(ImageDataset(samples, pipeline, SINGLE_LABEL), collate_fn=collate_skipping_bad, **common),
        "ours+cache": DataLoader(ImageDataset(samples, pipeline, SINGLE_LABEL, cache=DecodedImageCache(cache)),
                                 collate_fn=collate_skipping_bad, **common),
        "ours-full": DataLoader(ImageDataset(samples, full, SINGLE_LABEL), collate_fn=collate_skipping_bad, **common),
        "tv2": DataLoader(ImageFolder(str(root), transform=tv2_transform(size, train)), **common),
    }


def loader_images_per_second(loader: DataLoader) -> float:
    """Images per second of this process's CPU time (everything runs on one thread here, so on an idle machine it
    equals wall time; on a shared one it leaves out the time other jobs hold the core)."""
    start = time.process_time()
    images = sum(len(batch[0]) for batch in loader)
    return images / (time.process_time() - start)


def phone_benchmark(count: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_phone_photos(Path(tmp), count)
        start = time.perf_counter()
        cv2.imread(str(paths[0]), cv2.IMREAD_COLOR_RGB)
        full_ms = (time.perf_counter() - start) * 1000
        print(f"{count} JPEGs of {PHONE_SIZE[1]}x{PHONE_SIZE[0]} (quality 92, ~{paths[0].stat().st_size // 1024} KiB, "
              f"full OpenCV decode ~{full_ms:.0f} ms), one thread, batches of 16, median of {repeats} interleaved "
              f"passes; torch {torch.__version__}, OpenCV {cv2.__version__}")
        header = (f"{'size':>4} {'mode':<5} {'ours':>6} {'ours-full':>9} {'tv2':>6}   {'ours/tv2':>8} "
                  f"{'ours-full/tv2':>13} {'ours/ours-full':>14}   {'cache 1st':>9} {'cache 2nd+':>10} "
                  f"{'2nd+/tv2':>8}")
        print(header)
        print("-" * len(header))
        for size in (224, 448):
            for train in (True, False):
                cache = Path(tmp) / f"cache-{size}-{train}"
                loaders = phone_loaders(Path(tmp) / "photos", size, train, batch=16, cache=cache)
                first_epoch = loader_images_per_second(loaders["ours+cache"])  # decodes and fills the cache
                for loader in loaders.values():  # warm-up: lazy imports, the files in the page cache
                    next(iter(loader))
                rates: dict[str, list[float]] = {name: [] for name in loaders}
                for _ in range(repeats):
                    for name, loader in loaders.items():
                        rates[name].append(loader_images_per_second(loader))
                med = {name: statistics.median(r) for name, r in rates.items()}
                print(f"{size:>4} {'train' if train else 'eval':<5} {med['ours']:>6.1f} {med['ours-full']:>9.1f} "
                      f"{med['tv2']:>6.1f}   {med['ours'] / med['tv2']:>7.2f}x {med['ours-full'] / med['tv2']:>12.2f}x "
                      f"{med['ours'] / med['ours-full']:>13.2f}x   {first_epoch:>9.1f} {med['ours+cache']:>10.1f} "
                      f"{med['ours+cache'] / med['tv2']:>7.2f}x")


def unchecked_load(path: Path, fits: Callable[[int, int], bool] | None) -> np.ndarray:
    """The decode before truncated files were refused: OpenCV reads the file (and hides a cut end), Pillow reads the
    header for the DCT factor."""
    factor = jpeg_reduction(str(path), fits) if fits is not None else 1
    return cv2.imread(str(path), REDUCED_RGB_FLAGS[factor] if factor > 1 else cv2.IMREAD_COLOR_RGB)


def decodes_per_second(decode: Callable[[Path], np.ndarray], paths: list[Path]) -> float:
    start = time.process_time()
    for path in paths:
        decode(path)
    return len(paths) / (time.process_time() - start)


def check_benchmark(small: int, phone: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        photo_sets = {"500x375": make_photos(Path(tmp), small), "12 MP": make_phone_photos(Path(tmp), phone)}
        recipe = recipe_from_dict({"model": {"name": "tresnet_m"}, "input_size": 224, "data": {"name": "folder"}})
        train_fits = build_transforms(recipe, train=True).decode_fits
        print(f"truncation check: decodes per CPU second, one thread, median of {repeats} interleaved passes; "
              f"OpenCV {cv2.__version__}")
        header = (f"{'photos':<8} {'decode':<9} {'before':>8} {'checked':>8} {'checked/before':>14}   "
                  f"{'check alone':>11}")
        print(header)
        print("-" * len(header))
        for kind, paths in photo_sets.items():
            contents = [path.read_bytes() for path in paths]
            start = time.perf_counter()
            for _ in range(20):
                assert all(truncation(data) is None for data in contents)
            check_us = (time.perf_counter() - start) / (20 * len(contents)) * 1e6
            for label, fits in (("full", None), ("224 train", train_fits)):
                runners = {"before": lambda path, fits=fits: unchecked_load(path, fits),
                           "checked": lambda path, fits=fits: load_image(path, fits)}
                for run in runners.values():  # warm-up
                    run(paths[0])
                rates: dict[str, list[float]] = {name: [] for name in runners}
                for _ in range(repeats):
                    for name, run in runners.items():
                        rates[name].append(decodes_per_second(run, paths))
                med = {name: statistics.median(r) for name, r in rates.items()}
                print(f"{kind:<8} {label:<9} {med['before']:>8.1f} {med['checked']:>8.1f} "
                      f"{med['checked'] / med['before']:>13.3f}x   {check_us:>8.1f} us")
def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader's worker exits after each pass)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def loader_pass(loader: DataLoader, epoch: int = 0) -> float:
    """Images per CPU second over one epoch of a tresfinetune loader. Each pass is another epoch, so the loaders
    compared average over many random crops (a crop's size sets the cost of its resize) instead of one fixed draw."""
    for part in (loader.sampler, loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
    start = cpu_seconds()
    images = sum(len(batch) for batch, _ in loader)
    return images / (cpu_seconds() - start)


def as_folder(paths: list[Path], root: Path) -> Path:
    """root/train/photo/ and root/val/photo/ holding the same files (hard links), so both loaders read them all."""
    for split in ("train", "val"):
        (root / split / "photo").mkdir(parents=True)
        for path in paths:
            os.link(path, root / split / "photo" / path.name)
    return root


def shard_benchmark(small: int, phone: int, repeats: int) -> None:
    from tresfinetune.datasets.loaders import build_loaders
    from tresfinetune.datasets.pack import pack

    print(f"loader img/s per CPU second (main process + 1 worker), 224 px, batches of 16, median of {repeats} "
          f"interleaved passes; torch {torch.__version__}, OpenCV {cv2.__version__}")
    header = (f"{'photos':<8} {'mode':<5} {'folder':>7} {'shards':>7} {'max-side':>8}   {'shards/folder':>13} "
              f"{'max-side/folder':>15}")
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, count in (("500x375", small), ("12 MP", phone)):
            made = Path(tmp) / f"made-{count}-{label[:3]}"
            made.mkdir()
            paths = make_photos(made, count) if label == "500x375" else make_phone_photos(made, count)
            root = as_folder(paths, Path(tmp) / f"folder-{label[:3]}")
            base = {"model": {"name": "tresnet_m"}, "input_size": 224, "workers": 1, "batch_size": 16}
            folder_recipe = recipe_from_dict({**base, "data": {"name": "folder", "root": str(root),
                                                               "persistent_workers": False}})
            recipes = {"folder": folder_recipe}
            for name, max_side in (("shards", None), ("max-side", "auto")):
                out = Path(tmp) / f"{name}-{label[:3]}"
                start = time.perf_counter()
                pack(folder_recipe, out, max_side=max_side)
                seconds = time.perf_counter() - start
                size = sum(p.stat().st_size for p in out.glob("train-*.tar"))
                notes.append(f"{label}: packing {count} images ({name}) took {seconds:.1f} s, "
                             f"{size / count / 1024:.0f} KiB per image")
                recipes[name] = recipe_from_dict({**base, "data": {"name": "webdataset", "root": str(out)}})
            for mode, which in (("train", 0), ("eval", 1)):
                loaders = {name: build_loaders(recipe)[which] for name, recipe in recipes.items()}
                for loader in loaders.values():  # warm-up: lazy imports, the files in the page cache
                    loader_pass(loader)
                rates: dict[str, list[float]] = {name: [] for name in loaders}
                for epoch in range(1, repeats + 1):
                    for name, loader in loaders.items():
                        rates[name].append(loader_pass(loader, epoch))
                med = {name: statistics.median(r) for name, r in rates.items()}
                rows.append(f"{label:<8} {mode:<5} {med['folder']:>7.1f} {med['shards']:>7.1f} {med['max-side']:>8.1f}"
                            f"   {med['shards'] / med['folder']:>12.2f}x {med['max-side'] / med['folder']:>14.2f}x")
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    print("\n".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", choices=["small", "phone", "both", "check", "shards"], default="both")
    parser.add_argument("--images", type=int, default=48, help="small photos")
    parser.add_argument("--phone-images", type=int, default=12, help="12 MP photos")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.photos in ("phone", "both"):
        phone_benchmark(args.phone_images, args.repeats)
    if args.photos in ("small", "both"):
        small_benchmark(args.images, args.repeats)
    if args.photos in ("check", "both"):
        check_benchmark(args.images, args.phone_images, args.repeats)
    if args.photos == "shards":
        shard_benchmark(args.images, args.phone_images, args.repeats)


def small_benchmark(count: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), count)
        print(f"{len(paths)} JPEGs of 500x375 (quality 90, ~{paths[0].stat().st_size // 1024} KiB), one thread, "
              f"median of {repeats} interleaved passes; torch {torch.__version__}, OpenCV {cv2.__version__}")
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
                for _ in range(repeats):
                    for name, (run, convert) in runners.items():
                        rates[name].append(images_per_second(run, paths, convert))
                med = {name: statistics.median(r) for name, r in rates.items()}
                print(f"{size:>4} {'train' if train else 'eval':<5} {med['ours']:>6.0f} {med['ours+float']:>10.0f} "
                      f"{med['tv2']:>6.0f} {med['tv2-io']:>6.0f}   {med['ours'] / med['tv2']:>7.2f}x "
                      f"{med['ours+float'] / med['tv2']:>13.2f}x {med['ours'] / med['tv2-io']:>10.2f}x")


if __name__ == "__main__":
    main()
