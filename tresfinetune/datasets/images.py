"""Reading image files as RGB uint8 arrays, and finding the image files in a folder.

OpenCV decodes the common formats fastest and already handles what users' folders contain: it applies the EXIF
orientation, converts CMYK JPEGs, grayscale, palette and RGBA images, and scales 16-bit PNGs to 8 bits. Pillow is the
fallback for anything OpenCV cannot open.

A 12 MP phone photo takes tens of milliseconds to decode, only to be shrunk to 224 or 448 px. Told what the pipeline
needs (`fits`), JPEGs are decoded with DCT scaling at 1/8, 1/4 or 1/2 of each side: the largest reduction whose
result still fits, in either orientation. Other formats decode at full size.

A download cut short must not become a training image. OpenCV's file reader hands libjpeg a fake end of file, so a
truncated JPEG decodes "fine" with its missing part grey. JPEG and PNG files are therefore read into memory and
checked for their end marker before decoding (see `truncation`): a few microseconds next to a decode of a
millisecond or more. The other formats' decoders already reject a cut file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps

from tresfinetune.files import write_atomic

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

_cv2_quiet = False
# OpenCV's JPEG DCT scaling (each side divided by the factor, rounded up), with RGB output.
REDUCED_RGB_FLAGS = {
    factor: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2))
}
JPEG_FORMATS = {"JPEG", "MPO"}  # MPO: the multi-picture JPEGs many phones write
JPEG_SIGNATURE = b"\xff\xd8\xff"
JPEG_END_OF_IMAGE = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CUT_SHORT = "truncated file (it ends before the image does)"


class UnreadableImage(Exception):
    """An image file that neither OpenCV nor Pillow can decode."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(name: str) -> bool:
    """True for a visible file whose extension (any case) is an image format."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted; hidden files and folders and other files are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath, name) for name in sorted(filenames) if is_image_file(name))
    return found


class JpegHeader(NamedTuple):
    width: int
    height: int
    first_scan: int  # offset of the first start-of-scan marker; the compressed pixels follow it


# Markers that stand alone (no length field): restart markers, start and end of image, and TEM.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
# Start-of-frame markers, which carry the image size (0xC4, 0xC8 and 0xCC are other segments).
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame size and first scan of a JPEG file's bytes; None when they end before the first scan.

    Walks the header from segment to segment by their lengths, so an EXIF thumbnail (a whole JPEG, with its own
    scan and end marker, inside the APP1 segment) is stepped over, never mistaken for the photo.
    """
    width = height = 0
    position = 2  # after the start-of-image marker
    while True:
        position = data.find(b"\xff", position)  # libjpeg too skips stray bytes between segments
        if position < 0 or position + 4 > len(data):
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
        elif marker == 0xDA:
            return JpegHeader(width, height, position)
        elif marker in _STANDALONE_MARKERS:
            position += 2
        else:
            if marker in _FRAME_MARKERS and position + 9 <= len(data):
                height = int.from_bytes(data[position + 5:position + 7], "big")
                width = int.from_bytes(data[position + 7:position + 9], "big")
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")


def _jpeg_is_whole(data: bytes, header: JpegHeader | None) -> bool:
    # Compressed data never holds the bytes FF D9 (an FF there is followed by 00 or a restart marker), so an end
    # marker after the first scan means the file was written to its end. Searched from the end: found at once, or
    # after a phone's trailer (Samsung appends one after the end marker; an MPO's second picture follows the first).
    return header is not None and data.rfind(JPEG_END_OF_IMAGE, header.first_scan) >= 0


_PNG_END_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_is_whole(data: bytes) -> bool:
    """Whether a PNG file's bytes reach its IEND chunk (walking the chunks when something follows it)."""
    if data.endswith(_PNG_END_CHUNK):
        return True
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        if data[position + 4:position + 8] == b"IEND":
            return True
        position += 12 + int.from_bytes(data[position:position + 4], "big")  # length, type, data, CRC
    return False


def truncation(data: bytes) -> str | None:
    """Why a file's bytes are not a whole image, for the JPEGs and PNGs whose decoders would hide it; else None."""
    if data.startswith(JPEG_SIGNATURE):
        whole = _jpeg_is_whole(data, read_jpeg_header(data))
    elif data.startswith(PNG_SIGNATURE):
        whole = _png_is_whole(data)
    else:
        whole = True
    return None if whole else CUT_SHORT


def reduction_factor(width: int, height: int, fits: Callable[[int, int], bool] | None) -> int:
    """The largest DCT scale-down factor (8, 4 or 2) at which a JPEG of this size still fits in both orientations;
    1 when none does (or the size or `fits` is unknown)."""
    if fits is None or width <= 0 or height <= 0:
        return 1
    for factor in REDUCED_RGB_FLAGS:
        reduced_width, reduced_height = -(-width // factor), -(-height // factor)
        if fits(reduced_width, reduced_height) and fits(reduced_height, reduced_width):
            return factor
    return 1


def jpeg_reduction(path: str | BinaryIO, fits: Callable[[int, int], bool]) -> int:
    """reduction_factor for a JPEG file (1 for other files), reading the file's header only (`path` may be an
    in-memory file)."""
    try:
        with Image.open(path) as header:
            if header.format not in JPEG_FORMATS:
                return 1
            width, height = header.size
    except Exception:  # not an image Pillow knows: the full decode path reports it
        return 1
    return reduction_factor(width, height, fits)


def _quiet_opencv() -> None:
    global _cv2_quiet
    if not _cv2_quiet:
        # libjpeg's "Premature end of JPEG file" and similar go to stderr otherwise; we report bad files ourselves.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        _cv2_quiet = True


def load_image(path: str | os.PathLike, fits: Callable[[int, int], bool] | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (H, W, 3) in its EXIF orientation; UnreadableImage if it can't,
    including a truncated JPEG or PNG.

    `fits(width, height)`: whether an image of that size still holds every pixel the caller needs; JPEGs are then
    decoded at the smallest DCT scale that fits (see reduction_factor).
    """
    _quiet_opencv()
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(len(PNG_SIGNATURE))
            if data.startswith((JPEG_SIGNATURE, PNG_SIGNATURE)):
                f.seek(0)
                data = f.read()
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except OSError as e:
        raise UnreadableImage(path, e.strerror or str(e)) from None
    if data.startswith((JPEG_SIGNATURE, PNG_SIGNATURE)):
        return decode_image(data, path, fits)
    if not data:
        raise UnreadableImage(path, "empty file")
    # Other formats: OpenCV's decoders reject a cut file, and read these from the path faster than from memory.
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    return image if image is not None else _decode_with_pillow(path, path)


def decode_image(data: bytes, name: str, fits: Callable[[int, int], bool] | None = None) -> np.ndarray:
    """load_image for an encoded image already in memory (a file's bytes, a shard member); `name` is what errors
    report. Truncated JPEGs and PNGs are UnreadableImage here too."""
    if not data:
        raise UnreadableImage(name, "empty file")
    _quiet_opencv()
    factor = 1
    if data.startswith(JPEG_SIGNATURE):
        header = read_jpeg_header(data)
        if not _jpeg_is_whole(data, header):
            raise UnreadableImage(name, CUT_SHORT)
        factor = reduction_factor(header.width, header.height, fits)
    elif data.startswith(PNG_SIGNATURE) and not _png_is_whole(data):
        raise UnreadableImage(name, CUT_SHORT)
    buffer = np.frombuffer(data, np.uint8)
    if factor > 1:
        image = cv2.imdecode(buffer, REDUCED_RGB_FLAGS[factor])
        if image is not None:
            return image
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
    return image if image is not None else _decode_with_pillow(name, io.BytesIO(data))


def _decode_with_pillow(name: str, file: str | BinaryIO) -> np.ndarray:
    """Pillow, for the files OpenCV cannot open (in EXIF orientation, 16-bit greyscale scaled to 8 bits);
    UnreadableImage if it cannot either."""
    try:
        with Image.open(file) as pil_image:
            pil_image = ImageOps.exif_transpose(pil_image)
            if pil_image.mode == "I;16" or pil_image.mode == "I":
                pixels = np.asarray(pil_image, dtype=np.float32)
                pixels = (pixels / (65535.0 if pixels.max() > 255 else 255.0) * 255.0).round().astype(np.uint8)
                return np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
            return np.asarray(pil_image.convert("RGB"))
    except Exception as e:  # Pillow raises many types for broken files; all mean "unreadable"
        message = str(e) if isinstance(file, str) else str(e).replace(str(file), "image data")
        raise UnreadableImage(name, f"{type(e).__name__}: {message}") from None


class DecodedImageCache:
    """Decoded images kept in a folder as raw pixels (.npy, at the decoded size), so that later epochs skip the JPEG
    decode: a 12 MP photo costs ~70 ms to decode in full and ~30 ms at 1/8 scale, but a millisecond to read back.

    An entry is keyed by the file's absolute path, size, modification time and DCT reduction, so an edited photo or a
    pipeline needing another size decodes afresh. Entries are written atomically; loader workers share the folder.
    Disk use is width x height x 3 bytes per image at the decoded size (2.3 MB for a 12 MP photo at 1/4).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()

    def load(self, path: str | os.PathLike, fits: Callable[[int, int], bool] | None = None) -> np.ndarray:
        """load_image(path, fits), from the cache when this file was decoded the same way before."""
        path = os.path.abspath(os.fspath(path))
        try:
            stat = os.stat(path)
        except OSError:
            return load_image(path, fits)  # reports the missing file
        factor = jpeg_reduction(path, fits) if fits is not None else 1
        # "v2": entries from before truncated files were refused may hold one; they are decoded (and refused) afresh.
        key = hashlib.sha1(f"v2\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{factor}".encode()).hexdigest()
        entry = self.folder / key[:2] / f"{key}.npy"
        try:
            return np.load(entry)
        except (OSError, ValueError):  # not cached yet (or a damaged entry: decode and rewrite it)
            pass
        image = load_image(path, fits)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(entry, lambda f: np.save(f, image), durable=False)
        except OSError:  # a full or read-only disk only costs speed
            pass
        return image
