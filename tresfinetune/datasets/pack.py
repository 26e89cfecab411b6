"""`tresfinetune data pack`: any source this tool reads, written as WebDataset shards plus dataset.json.

    summary = pack(load_recipe("recipes/folder.yaml"), "shards/", shard_size="500MB", max_side="auto")

The recipe's training and validation splits become `train-000000.tar ...` and `val-000000.tar ...`, their samples in
a seeded random order (sources often list them class by class; readers shuffle only within a buffer). A sample is
`<key>.<ext>` (the image) with `<key>.cls` (single-label: the class index) or `<key>.json` (multi-label:
{"labels": [positive indices]}, plus "negatives": [...] when some labels are unknown: classes in neither list).
Images are stored as they are (their original bytes) unless `max_side` asks for smaller ones: a number caps the
longer side, "auto" shrinks each image to the smallest size from which the recipe's training and validation
pipelines still never enlarge a pixel. Unreadable images are reported and left out.

dataset.json: {"format", "version", "task", "class_names", "unknown_labels", "splits": {"train": {"images",
"shards": [{"name", "images", "bytes"}], "per_class": {...}, "skipped": [...]}, "val": {...}}, "source",
"max_side", "command", "augmentation": {"hflip", "crop_scale"}} (the source's default-augmentation hints).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from tresfinetune.datasets.images import REDUCED_RGB_FLAGS, UnreadableImage, decode_image, jpeg_reduction
from tresfinetune.datasets.shards import METADATA_FILE, ShardSource, webdataset_module
from tresfinetune.datasets.source import Sample, source_info
from tresfinetune.errors import UserError
from tresfinetune.files import cause_of, write_text
from tresfinetune.tasks import MULTI_LABEL

if TYPE_CHECKING:
    from tresfinetune.recipe import Recipe

log = logging.getLogger("tresfinetune")

FORMAT = "tresfinetune-shards"
JPEG_QUALITY = 95  # re-encoded photos: visually lossless, a fraction of the original's bytes at the smaller size
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
CHUNK = 256  # images encoded in parallel before they are written in order
TAR_BLOCK = 512


def parse_size(text: str | int) -> int:
    """'500MB', '1GiB', '2e8' or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    try:
        value = float(match.group(1)) * UNITS[match.group(2).lower()] if match else -1
    except (KeyError, ValueError):
        value = -1
    if value < 1:
        raise UserError(f"--shard-size must be a size such as 500MB or 1GiB, got {text!r}")
    return int(value)


def parse_max_side(text: str | int | None) -> int | str | None:
    if text is None or str(text).lower() == "auto":
        return None if text is None else "auto"
    if str(text).isdigit() and int(text) >= 16:
        return int(text)
    raise UserError(f"--max-side must be a number of pixels (16 or more) or auto, got {text!r}")


class RotatingTarWriter:
    """Samples into `<prefix>-000000.tar`, `-000001.tar`, ...: a new shard once the next sample would pass max_bytes."""

    def __init__(self, folder: Path, prefix: str, max_bytes: int):
        self.folder, self.prefix, self.max_bytes = folder, prefix, max_bytes
        self.shards: list[dict] = []
        self.writer = None

    def add(self, key: str, files: dict[str, bytes]) -> None:
        size = sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in files.values())
        current = self.shards[-1] if self.shards else None
        if current is None or (current["images"] and current["bytes"] + size > self.max_bytes):
            self._next()
        self.writer.write({"__key__": key, **files})
        self.shards[-1]["images"] += 1
        self.shards[-1]["bytes"] += size

    def _next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append({"name": name, "images": 0, "bytes": 0})
        self.writer = webdataset_module().TarWriter(str(self.folder / name), encoder=False, mtime=0)

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for shard in self.shards:  # the real size, tar padding included
            shard["bytes"] = (self.folder / shard["name"]).stat().st_size
        return self.shards


def _combined_fits(requirements: list[Callable[[int, int], bool]]) -> Callable[[int, int], bool]:
    def fits(width: int, height: int) -> bool:
        return all(requirement(width, height) for requirement in requirements)

    return fits


def smallest_side(width: int, height: int, fits: Callable[[int, int], bool]) -> int:
    """The smallest longer side (aspect kept) at which the image still fits the pipelines in both orientations."""
    longer, shorter = max(width, height), min(width, height)

    def ok(side: int) -> bool:
        other = max(1, round(shorter * side / longer))
        return fits(side, other) and fits(other, side)

    if not ok(longer):
        return longer
    low, high = 1, longer  # ok(high) holds; find the smallest such side
    while low < high:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle + 1
    return high


class ImageEncoder:
    """A sample's image as (bytes, extension) for a shard: the original file when it is small enough, else
    re-encoded no larger than needed. UnreadableImage for a file that cannot be decoded."""

    def __init__(self, max_side: int | str | None, fits: Callable[[int, int], bool] | None):
        self.max_side, self.fits = max_side, fits

    def target_side(self, width: int, height: int) -> int:
        if self.max_side is None:
            return max(width, height)
        if self.max_side == "auto":
            return smallest_side(width, height, self.fits) if self.fits else max(width, height)
        return min(self.max_side, max(width, height))

    def __call__(self, image: Any) -> tuple[bytes, str]:
        if not isinstance(image, str):  # in-memory sources (digits, CIFAR): lossless
            pixels = self._shrink(np.ascontiguousarray(image))
            return _encode(pixels, ".png"), "png"
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UnreadableImage(image, e.strerror or str(e)) from None
        extension = os.path.splitext(image)[1].lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Exception:  # not something Pillow reads: decode it to find out (UnreadableImage for a broken file)
            pixels = decode_image(data, image)
            shrunk = self._shrink(pixels)
            return (data, extension) if shrunk is pixels else (_encode(shrunk, ".jpg"), "jpg")
        side = self.target_side(width, height)
        if side >= max(width, height):
            # Stored as it is: check it decodes (a reduced decode still walks all of a JPEG's data).
            if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_4) is None:
                decode_image(data, image)
            return data, extension
        needed = (side, max(1, round(min(width, height) * side / max(width, height))))

        def fits(w: int, h: int) -> bool:  # either orientation, since the header's size is before EXIF rotation
            return max(w, h) >= needed[0] and min(w, h) >= needed[1]

        factor = jpeg_reduction(io.BytesIO(data), fits)
        pixels = None
        if factor > 1:
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED_RGB_FLAGS[factor])
        if pixels is None:
            pixels = decode_image(data, image)
        return _encode(self._shrink(pixels, side), ".jpg"), "jpg"

    def _shrink(self, pixels: np.ndarray, side: int | None = None) -> np.ndarray:
        height, width = pixels.shape[:2]
        side = side if side is not None else self.target_side(width, height)
        if side >= max(width, height):
            return pixels
        scale = side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _encode(pixels: np.ndarray, extension: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if extension == ".jpg" else []
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise UnreadableImage("(in memory)", f"could not encode as {extension}")
    return encoded.tobytes()


def _label_file(target: Any, multi_label: bool) -> tuple[str, bytes]:
    if not multi_label:
        return "cls", str(int(target)).encode()
    dense = np.asarray(target, dtype=np.float32)
    labels: dict[str, list[int]] = {"labels": np.flatnonzero(dense == 1).tolist()}
    if (dense < 0).any():
        labels["negatives"] = np.flatnonzero(dense == 0).tolist()
    return "json", json.dumps(labels).encode()


def _encoded(samples: list[Sample], encoder: ImageEncoder, pool: ThreadPoolExecutor) -> Iterator[tuple]:
    """(sample, (bytes, extension) or UnreadableImage) in order, encoding CHUNK images at a time in parallel."""
    def safe(sample: Sample) -> tuple[bytes, str] | UnreadableImage:
        try:
            return encoder(sample.image)
        except UnreadableImage as e:
            return e

    for start in range(0, len(samples), CHUNK):
        chunk = samples[start: start + CHUNK]
        yield from zip(chunk, pool.map(safe, chunk), strict=True)


def pack(recipe: Recipe, out: str | os.PathLike, shard_size: str | int = "500MB", max_side: str | int | None = None,
         command: str = "", threads: int | None = None, progress: Callable[[str, int], None] | None = None) -> dict:
    """Write the recipe's train and val splits as shards in `out`; returns dataset.json's content.

    `progress(split, images_done)` is called as images are written (for a progress bar)."""
    from tresfinetune.datasets import build_source

    max_bytes = parse_size(shard_size)
    max_side = parse_max_side(max_side)
    webdataset_module()
    source = build_source(recipe.data)
    if isinstance(source, ShardSource):
        raise UserError("the recipe's data are shards already (data.name: webdataset); pack the source they came from")
    folder = Path(out).expanduser()
    if (folder / METADATA_FILE).exists() or any(folder.glob("*.tar")):
        raise UserError(f"'{folder}' already holds shards; pick another --out or delete them")
    splits = {"train": source.split(recipe.data.train_split), "val": source.split(recipe.data.val_split)}
    # Sources often list samples class by class; a shard must mix them, since readers shuffle within a bounded buffer.
    splits = {name: [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
              for name, samples in splits.items()}
    fits = _auto_fits(recipe) if max_side == "auto" else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out folder '{folder}': {cause_of(e, folder.parent)}") from None
    info = source_info(recipe.data.name)
    encoder = ImageEncoder(max_side, fits)
    metadata: dict[str, Any] = {
        "format": FORMAT, "version": 1, "task": source.task, "class_names": list(source.class_names),
        "unknown_labels": False, "splits": {}, "source": recipe.data.name, "max_side": max_side, "command": command,
        # the source's default-augmentation hints, so training from the shards augments as from the source
        "augmentation": {"hflip": info.hflip, "crop_scale": list(info.crop_scale) if info.crop_scale else None},
    }
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:  # OpenCV codecs release the GIL
        for split, samples in splits.items():
            entry = _pack_split(samples, source, RotatingTarWriter(folder, split, max_bytes), encoder, pool,
                                lambda done, split=split: progress(split, done) if progress else None)
            metadata["unknown_labels"] |= entry.pop("has_unknowns")
            metadata["splits"][split] = entry
            if entry["skipped"]:
                shown = ", ".join(entry["skipped"][:5]) + (", ..." if len(entry["skipped"]) > 5 else "")
                log.warning("%s: left out %d unreadable image(s): %s", split, len(entry["skipped"]), shown)
    write_text(folder / METADATA_FILE, json.dumps(metadata, indent=1))  # last: a folder with it is complete
    return metadata


def _auto_fits(recipe: Recipe) -> Callable[[int, int], bool] | None:
    """--max-side auto: whether a stored size still serves both of the recipe's pipelines (None: keep sizes)."""
    from tresfinetune.datasets.transforms import build_transforms

    requirements = [build_transforms(recipe, train=train).decode_fits for train in (True, False)]
    if None in requirements:
        log.warning("--max-side auto: the recipe's transforms start without a resize, so they need whole images; "
                    "images are stored at their size")
        return None
    return _combined_fits(requirements)


def _pack_split(samples: list, source: Any, writer: RotatingTarWriter, encoder: ImageEncoder,
                pool: ThreadPoolExecutor, progress: Callable[[int], None]) -> dict:
    """Write one split's samples; its dataset.json entry (plus `has_unknowns`, for the caller to pop)."""
    multi_label = source.task == MULTI_LABEL
    positives = np.zeros(source.num_classes, np.int64)
    negatives = np.zeros(source.num_classes, np.int64)
    skipped: list[str] = []
    written = 0
    try:
        for index, (sample, result) in enumerate(_encoded(samples, encoder, pool)):
            if isinstance(result, UnreadableImage):
                skipped.append(f"{result.path} ({result.reason})")
                continue
            data, extension = result
            label_extension, label = _label_file(sample.target, multi_label)
            writer.add(f"{index:09d}", {extension: data, label_extension: label})
            written += 1
            if multi_label:
                dense = np.asarray(sample.target, dtype=np.float32)
                positives += dense == 1
                negatives += dense == 0
            else:
                positives[int(sample.target)] += 1
            progress(written)
    finally:
        shards = writer.close()
    entry: dict[str, Any] = {"images": written, "shards": shards,
                             "per_class": dict(zip(source.class_names, positives.tolist(), strict=True)),
                             "skipped": skipped, "has_unknowns": False}
    if multi_label:
        unknowns = written - positives - negatives
        entry["labels"] = {name: {"positives": int(p), "negatives": int(n), "unknowns": int(u)}
                           for name, p, n, u in zip(source.class_names, positives, negatives, unknowns, strict=True)}
        entry["has_unknowns"] = bool(unknowns.any())
    return entry
