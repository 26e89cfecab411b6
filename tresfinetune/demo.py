"""`make demo`'s helper: write a few digit scans as PNG files for `tresfinetune predict` to read.

    python -m tresfinetune.demo demo_out/digits
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_images(folder: str | Path, count: int = 8, size: int = 64) -> list[Path]:
    """The last `count` scans of scikit-learn's digits, upscaled to `size` px, named by their true digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(len(digits.images) - count, len(digits.images)):
        grey = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        path = folder / f"digit_{index:04d}_is_{digits.target[index]}.png"
        image.save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_digit_images(sys.argv[1] if len(sys.argv) > 1 else "demo_out/digits"):
        print(written)
