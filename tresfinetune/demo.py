"""`make demo`'s helper: write a few digit scans as PNG files for `tresfinetune predict` to read.

    python -m tresfinetune.demo demo_out/digits
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from tresfinetune.datasets.local import digits_images


def write_digit_images(folder: str | Path, count: int = 8) -> list[Path]:
    """The last `count` scans of scikit-learn's digits, rendered as the digits dataset renders them, named by
    their true digit. (They may be among the training images: this shows the tool working, not the accuracy.)"""
    images, labels = digits_images()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(len(images) - count, len(images)):
        path = folder / f"digit_{index:04d}_is_{labels[index]}.png"
        Image.fromarray(images[index]).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_digit_images(sys.argv[1] if len(sys.argv) > 1 else "demo_out/digits"):
        print(written)
