"""`tresfinetune data check`: the JSON report, the table, the preview grid, and clean errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from tresfinetune.cli import cli
from tresfinetune.datasets.check import check_data
from tresfinetune.recipes import recipe_from_dict


def write_dataset(root: Path) -> None:
    """train/ and val/ class folders; one corrupt image, one image copied into val under another name."""
    for split, counts in (("train", {"apple": 4, "pear": 2}), ("val", {"apple": 1, "pear": 1})):
        for c, (name, count) in enumerate(counts.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.random.default_rng(100 * len(split) + 10 * c + i).integers(0, 256, (20, 28, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    (root / "train" / "pear" / "bad.jpg").write_bytes(b"GIF89a but not really")
    shutil.copy(root / "train" / "apple" / "0.png", root / "val" / "apple" / "copy.png")


def write_recipe(path: Path, root: Path) -> Path:
    path.write_text(f"model: {{name: tresnet_m}}\ninput_size: 32\ndata: {{name: folder, root: '{root}'}}\n")
    return path


def test_data_check_json_table_and_preview(tmp_path):
    write_dataset(tmp_path / "fruit")
    recipe_path = write_recipe(tmp_path / "r.yaml", tmp_path / "fruit")
    result = CliRunner().invoke(cli, ["data", "check", str(recipe_path), "--json", str(tmp_path / "report.json"),
                                      "--preview", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "1 unreadable" in result.output and "bad.jpg" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"task", "splits", "unreadable"}
    assert report["task"] == "single-label"
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert (train["images"], train["classes"], train["unreadable"]) == (6, 2, 1)
    assert train["per_class"] == {"apple": 4, "pear": 2}
    assert train["smallest_class"] == ["pear", 2] and train["largest_class"] == ["apple", 4]
    assert (val["images"], val["classes"]) == (3, 2)
    assert train["also_in"] == {"val": 1} and val["also_in"] == {"train": 1}
    assert report["unreadable"] == [str(tmp_path / "fruit" / "train" / "pear" / "bad.jpg")]
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.width > 100


def test_data_check_multilabel_counts(tmp_path):
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "y.csv").write_text("file,labels,split\n0.jpg,a b,train\n1.jpg,b,train\n2.jpg,,val\n")
    recipe = recipe_from_dict({"model": {"name": "tresnet_m"}, "input_size": 32,
                               "data": {"name": "multilabel_csv", "root": str(tmp_path), "csv": "y.csv"}})
    report = check_data(recipe, threads=2)
    assert report["task"] == "multi-label"
    assert report["splits"]["train"]["per_class"] == {"a": 1, "b": 2}
    assert report["splits"]["val"]["images_without_labels"] == 1 and report["splits"]["val"]["classes"] == 0


def test_data_check_errors_are_one_line(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml", tmp_path / "nowhere")
    result = CliRunner().invoke(cli, ["data", "check", str(recipe_path)])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["data", "check", str(recipe_path), "--set", "data.name=digits",
                                      "--set", "transforms.train=[{RandomCrop: {hieght: 8}}]"])
    assert result.exit_code == 1 and "unknown argument 'hieght' for RandomCrop; did you mean 'height'" in result.output
