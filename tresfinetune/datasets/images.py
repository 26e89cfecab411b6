"""Reading image files as RGB uint8 arrays, and finding the image files in a folder.

OpenCV decodes the common formats fastest and already handles what users' folders contain: it applies the EXIF
orientation, converts CMYK JPEGs, grayscale, palette and RGBA images, and scales 16-bit PNGs to 8 bits. Pillow is the
fallback for anything OpenCV cannot open.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

_cv2_quiet = False


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


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an RGB uint8 array (H, W, 3) in its EXIF orientation; UnreadableImage if it can't."""
    global _cv2_quiet
    if not _cv2_quiet:
        # libjpeg's "Premature end of JPEG file" and similar go to stderr otherwise; we report bad files ourselves.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        _cv2_quiet = True
    path = os.fspath(path)
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    if image is not None:
        return image
    if not os.path.isfile(path):
        raise UnreadableImage(path, "file not found")
    try:
        with Image.open(path) as pil_image:
            pil_image = ImageOps.exif_transpose(pil_image)
            if pil_image.mode == "I;16" or pil_image.mode == "I":
                pixels = np.asarray(pil_image, dtype=np.float32)
                pixels = (pixels / (65535.0 if pixels.max() > 255 else 255.0) * 255.0).round().astype(np.uint8)
                return np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
            return np.asarray(pil_image.convert("RGB"))
    except Exception as e:  # Pillow raises many types for broken files; all mean "unreadable"
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None
