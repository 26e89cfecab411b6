"""Loading recipes: a YAML file or a mapping, plus --set overrides, parsed by recipe.py and then checked against
what this tool has (model names, data sources, the ML-Decoder's heads, albumentations' transforms), so a mistake
is one sentence before anything loads."""

from __future__ import annotations

import typing
from pathlib import Path

from tresfinetune.datasets import source_names
from tresfinetune.datasets.transforms import validate_pipeline
from tresfinetune.errors import UserError
from tresfinetune.models import list_models
from tresfinetune.models.ml_decoder import NUM_HEADS
from tresfinetune.recipe import Recipe, check_choice, parse_recipe, read_yaml


def recipe_from_dict(raw: dict, overrides: typing.Iterable[str] = ()) -> Recipe:
    """A checked Recipe from a raw mapping (plus overrides)."""
    recipe = parse_recipe(raw, overrides)
    check_against_tool(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read, override and check a recipe file."""
    recipe = recipe_from_dict(read_yaml(path), overrides)
    object.__setattr__(recipe, "_source_path", Path(path))
    return recipe


def check_against_tool(recipe: Recipe) -> None:
    check_choice(recipe.model.name, "model.name", list_models())
    embedding = recipe.model.head_options.get("embedding", NUM_HEADS)
    if embedding % NUM_HEADS:
        raise UserError(f"recipe key 'model.head_options.embedding' must be a multiple of {NUM_HEADS} (the decoder's "
                        f"attention heads), got {embedding}")
    check_choice(recipe.data.name, "data.name", source_names())
    for split in ("train", "val"):
        spec = getattr(recipe.transforms, split)
        if spec is not None:
            validate_pipeline(spec, f"transforms.{split}", recipe.input_size, recipe.transforms.crop_pct)
