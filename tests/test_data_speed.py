"""`tresfinetune data speed`: the loader's own throughput as a table and JSON; clean errors."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import write_colour_folder

from tresfinetune.cli import cli


def test_data_speed_times_the_loader_and_writes_json(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_class=6)  # 18 images: 15 train, 3 val
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"input_size: 32\ndata: {{name: folder, root: '{root}'}}\nbatch_size: 4\nworkers: 1\n")
    result = CliRunner().invoke(cli, ["data", "speed", str(recipe_path), "--batches", "2", "--json",
                                      str(tmp_path / "speed.json")])
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output and "train" in result.output
    numbers = json.loads((tmp_path / "speed.json").read_text())
    assert set(numbers) == {"split", "images", "seconds", "img_per_s", "workers"}
    # 15 training images make 3 full batches (drop_last); the first is an untimed warm-up, 2 are timed
    assert (numbers["split"], numbers["images"], numbers["workers"]) == ("train", 8, 1)
    assert numbers["seconds"] > 0 and abs(numbers["img_per_s"] - 8 / numbers["seconds"]) < 0.01 * numbers["img_per_s"]

    result = CliRunner().invoke(cli, ["data", "speed", str(recipe_path), "--split", "val", "--set", "workers=0",
                                      "--json", str(tmp_path / "val.json")])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "val.json").read_text())
    assert (numbers["split"], numbers["images"], numbers["workers"]) == ("val", 3, 0)  # one batch: timed


def test_data_speed_errors_are_one_line(tmp_path):
    root = write_colour_folder(tmp_path / "colours", per_class=3)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"input_size: 32\ndata: {{name: folder, root: '{root}'}}\nworkers: 0\n")
    result = CliRunner().invoke(cli, ["data", "speed", str(recipe_path), "--batches", "0"])
    assert result.exit_code == 1 and "--batches must be at least 1" in result.output
    result = CliRunner().invoke(cli, ["data", "speed", str(recipe_path), "--set", "input_size=30"])
    assert result.exit_code == 1 and "multiple of 16" in result.output and "Traceback" not in result.output
