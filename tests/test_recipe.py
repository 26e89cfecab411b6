from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.recipes import load_recipe, recipe_from_dict

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
REQUIRED = ["flowers", "cars", "cifar10", "cifar100", "coco", "voc", "folder", "multilabel_csv", "digits",
            "openimages"]


def test_every_required_recipe_is_shipped():
    assert {p.stem for p in RECIPES} >= set(REQUIRED)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_loads_and_starts_with_a_comment(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ")
    assert recipe.source_path == path


def test_documented_keys_exist():
    recipe = recipe_from_dict({})
    for dotted in ["model.name", "model.weights", "input_size", "data.name", "data.root", "data.csv", "epochs",
                   "batch_size", "workers", "seed", "deterministic"]:
        node = recipe
        for part in dotted.split("."):
            node = getattr(node, part)


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(UserError, match=r"unknown recipe key 'optimzer'; did you mean 'optimizer'\?"):
        recipe_from_dict({"optimzer": {"lr": 0.1}})
    with pytest.raises(UserError, match=r"'data.roots'.*'data.root'"):
        recipe_from_dict({"data": {"roots": "x"}})


def test_wrong_type_names_key_and_type():
    with pytest.raises(UserError, match=r"'epochs' must be an integer, got 'ten'"):
        recipe_from_dict({"epochs": "ten"})
    with pytest.raises(UserError, match=r"'optimizer.lr' must be a number"):
        recipe_from_dict({"optimizer": {"lr": [1]}})
    with pytest.raises(UserError, match=r"'data' must be a mapping"):
        recipe_from_dict({"data": 3})


def test_bad_values_are_named():
    with pytest.raises(UserError, match=r"'model.name' must be one of .*did you mean 'tresnet_m'"):
        recipe_from_dict({"model": {"name": "tresnet_n"}})
    with pytest.raises(UserError, match=r"'input_size' must be a multiple of 16"):
        recipe_from_dict({"input_size": 100})
    with pytest.raises(UserError, match=r"'ema'"):
        recipe_from_dict({"ema": 2})


def test_set_overrides_are_yaml_scalars_and_validated():
    recipe = recipe_from_dict(
        {"optimizer": {"lr": 0.1}},
        ["epochs=3", "optimizer.lr=1e-3", "data.root=~/photos", "model.weights=none", "ema=0.99", "amp=bf16"],
    )
    assert recipe.epochs == 3
    assert recipe.optimizer.lr == pytest.approx(1e-3)
    assert recipe.data.root == "~/photos"
    assert recipe.model.weights is None
    assert recipe.ema == 0.99 and recipe.amp == "bf16"
    with pytest.raises(UserError, match="unknown recipe key 'epoch'"):
        recipe_from_dict({}, ["epoch=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        recipe_from_dict({}, ["epochs"])


def test_unknown_transform_is_named_at_load():
    with pytest.raises(UserError, match=r"transforms.train\[0\]"):
        recipe_from_dict({"transforms": {"train": [{"RandomResizeCrop": {"size": [32, 32]}}]}})


def test_cli_reports_recipe_problems_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output

    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: 3\n  data: [\n")
    result = runner.invoke(cli, ["train", str(broken)])
    assert result.exit_code == 1
    assert "not valid YAML at line" in result.output

    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("batchsize: 3\n")
    result = runner.invoke(cli, ["train", str(misspelt)])
    assert result.exit_code == 1
    assert "did you mean 'batch_size'" in result.output

    result = runner.invoke(cli, ["train"])
    assert result.exit_code == 1
    assert "give a recipe" in result.output


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "{}\n"], ids=["blank", "comment", "no-keys"])
def test_an_empty_recipe_is_refused(tmp_path, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(UserError, match=r"recipe '.*empty.yaml' is empty; copy one from recipes/"):
        load_recipe(empty)
    result = CliRunner().invoke(cli, ["train", str(empty), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1 and "is empty" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_switches_resolution_with_one_key(path):
    from tresfinetune.datasets.transforms import SIZE_ARGUMENTS, build_transforms

    raw = yaml.safe_load(path.read_text())
    for split, spec in (raw.get("transforms") or {}).items():
        for entry in spec or []:
            name, args = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            written = set(args or {}) & set(SIZE_ARGUMENTS.get(name, ()))
            assert not written, f"{path.name} transforms.{split}: {name} repeats the size ({', '.join(written)})"
    for size in (64, 224, 448):
        recipe = load_recipe(path, [f"input_size={size}"])
        for train in (True, False):
            out = build_transforms(recipe, train=train)(np.zeros((300, 400, 3), np.uint8))
            assert tuple(out.shape) == (size, size, 3)
