"""What a recipe is: one YAML file describes model, data, augmentation and schedule.

The schema is the dataclasses below; their defaults are what an omitted key means. This module is a leaf that every
other one reads; recipes.py loads recipes and checks them against the models and data sources. Parsing checks every
key:
an unknown key names itself and the nearest valid key, a wrong type names the key and the type it wants.
`--set a.b=value` overrides are applied to the raw YAML before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from tresfinetune.errors import UserError
from tresfinetune.stopping import parse_checkpoint_every


@dataclass
class ModelConfig:
    name: str = "tresnet_m"
    # A pretrained tag (see `tresfinetune models`), a local file, or "none" for random initialisation.
    weights: str | None = "none"
    # "native" (memory-saving, pure PyTorch) or "inplace_abn" (needs the optional inplace-abn package).
    norm: str = "native"
    # "fc" (global pooling + linear) or "ml_decoder"; null: ml_decoder when the weights carry one, else fc.
    head: str | None = None
    # ml_decoder only: {groups: G (-1 or unset: 100, capped at the class count), embedding: E (768)}.
    head_options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    csv: str | None = None  # multilabel_csv: the label file, relative to root or absolute
    download: bool = False
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.2  # folder / multilabel_csv without an explicit val split
    # voc2007: objects marked difficult count as positives (true), are left out (false), or make their class unknown
    # for that image ("unknown"; a partial label, see loss.partial).
    use_difficult: bool | str = False
    csv_delimiter: str = ","  # multilabel_csv: between columns
    label_delimiter: str = " "  # multilabel_csv: between labels inside the label column
    # multilabel_csv (list form): a column of labels known absent; then labels in neither column are unknown.
    negative_column: str | None = None
    on_bad_image: str = "skip"  # skip | error
    limit: int | None = None  # use at most N images per split (a seeded subset) for quick trials
    # A folder for decoded images (raw pixels at the decoded size) so that epochs after the first skip decoding;
    # costs width x height x 3 bytes per image of disk (2.3 MB for a 12 MP photo trained at 224).
    decode_cache: str | None = None
    # TResNet weights expect inputs in [0, 1] without normalisation; set these only for other weights.
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # webdataset: shard URLs, brace lists allowed (paths, http(s)://, pipe:CMD); unset: those dataset.json in
    # data.root lists. classes: the class names in label order when there is no dataset.json.
    train_urls: str | list[str] | None = None
    val_urls: str | list[str] | None = None
    classes: list[str] | None = None
    shuffle_buffer: int = 1000  # webdataset: samples each loader worker holds for shuffling (memory: their bytes)
    pin_memory: bool = True  # used on CUDA only
    persistent_workers: bool = True


@dataclass
class TransformsConfig:
    # Each a list of {AlbumentationsClassName: {argument: value}}; None means the defaults for input_size. Size
    # arguments left out come from input_size.
    train: list | None = None
    val: list | None = None
    # A resize followed by a CenterCrop / RandomCrop resizes to input_size / crop_pct (224 -> 256 at 0.875).
    crop_pct: float = 0.875


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4  # never applied to norm weights and biases
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    head_lr_mult: float = 1.0  # learning rate of the classifier head relative to the backbone


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 0.0  # cosine / constant: linear warmup from warmup_start_factor * lr
    warmup_start_factor: float = 0.01
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of lr
    pct_start: float = 0.2  # onecycle: share of the schedule spent rising
    # Length of the schedule in epochs when it is longer than the run (the ASL COCO recipe runs 40 of 80).
    epochs: int | None = None


@dataclass
class LossConfig:
    name: str | None = None  # cross_entropy | bce | asl | asl_single; None: cross_entropy or asl by task
    options: dict = field(default_factory=dict)  # passed to the loss (gamma_neg, clip, label_smoothing, ...)
    # Unknown (-1) multi-label targets: negative | ignore | selective. None: ignore when the data has unknowns,
    # else negative.
    partial: str | None = None
    prior_threshold: float = 0.05  # selective: unknowns of classes with a larger prior are ignored
    likelihood_topk: int = 5  # selective: per image of the batch, this many of its most likely unknowns are ignored
    prior: str | None = None  # selective: a CSV of class,prior; None estimates it (see prior_epochs)
    prior_epochs: int = 1  # selective without loss.prior: epochs trained with unknowns ignored to estimate the prior
    gamma_unknown: float | None = None  # asl: focusing of unknowns counted as negatives; None: options.gamma_neg


@dataclass
class MixupConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # chance a batch is mixed at all
    switch_prob: float = 0.5  # with both alphas set: chance of cutmix instead of mixup


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    input_size: int = 224
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    epochs: int = 10
    batch_size: int = 32  # per process
    workers: int = 4
    seed: int = 0
    deterministic: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: float | None = None  # EMA decay of the weights (e.g. 0.9997); None: no EMA
    amp: str = "auto"  # auto (bf16 if supported else fp16 on CUDA, off on CPU) | bf16 | fp16 | none
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model
    # Recompute activations in backward instead of keeping them: about a third of the memory, 1.2-1.3x the step time.
    grad_checkpointing: bool = False
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    freeze_backbone_epochs: int = 0  # train only the head for the first N epochs
    early_stopping_patience: int | None = None  # epochs without improvement before stopping
    # last.pt inside epochs too: every N optimizer steps ("500") or every duration ("90s", "10m", "1h")
    checkpoint_every: str = "10m"
    sync_bn: bool = False  # torchrun: synchronise norm statistics across processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_every: int = 1  # validate every N epochs (and always after the last)

    @property
    def source_path(self) -> Path | None:
        return getattr(self, "_source_path", None)


# model.head_options keys -> create_model's arguments.
HEAD_OPTIONS = {"groups": "head_groups", "embedding": "head_embedding"}


def _type_name(tp: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a mapping", type(None): "null"}
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where numbers are wanted."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        # NoneType first, so that "none" / "null" strings mean None where None is allowed.
        for option in sorted(typing.get_args(tp), key=lambda t: t is not type(None)):
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        raise UserError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list or tp is list:
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp) or (Any,)
            if item_tp is Any:
                return list(value)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is dict and isinstance(value, dict):
        return dict(value)
    raise UserError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe key '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            candidates = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(candidates)}"
            raise UserError(f"unknown recipe key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, f"{full}.")
        else:
            values[key] = _coerce(value, tp, full)
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE (e.g. data.root=~/photos), got '{text}'")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set has an empty key in '{text}'")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    return key.split("."), value


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"recipe '{path}' does not exist; see recipes/ for examples")
    if path.is_dir():
        raise UserError(f"recipe '{path}' is a folder; pass a .yaml file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"recipe '{path}' is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe '{path}' is not a text file") from None
    if raw is None or raw == {}:  # the defaults alone would train on scikit-learn's digits: surely not the intent
        raise UserError(f"recipe '{path}' is empty; copy one from recipes/ (e.g. recipes/folder.yaml for a folder of "
                        "class folders) and edit it")
    if not isinstance(raw, dict):
        raise UserError(f"recipe '{path}' must be a YAML mapping of keys to values")
    return raw


def parse_recipe(raw: dict, overrides: typing.Iterable[str] = ()) -> Recipe:
    """A raw mapping (plus --set overrides) as a Recipe: keys, types and values checked, nothing else.
    recipes.recipe_from_dict also checks it against the tool's models, data sources and albumentations."""
    raw = apply_overrides(_deep_copy(raw), overrides)
    recipe = _build(Recipe, raw, "")
    check_values(recipe)
    return recipe


def model_head_arguments(recipe: Recipe) -> dict:
    """create_model's head arguments from the recipe's model.head and model.head_options."""
    return {"head": recipe.model.head, **{HEAD_OPTIONS[k]: v for k, v in recipe.model.head_options.items()}}


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _deep_copy(raw: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(raw)) if raw else {}


def check_choice(value: str | None, key: str, choices: typing.Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"recipe key '{key}' must be one of {', '.join(choices)}; got {value!r}{hint}")


def _positive(value: float | int, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"recipe key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_values(recipe: Recipe) -> None:
    """Value checks that need nothing but the recipe; recipes.py adds those against the models, data sources and
    albumentations."""
    check_choice(recipe.model.norm, "model.norm", ["native", "inplace_abn"])
    if recipe.grad_checkpointing and recipe.model.norm != "native":
        raise UserError("recipe key 'grad_checkpointing' works with model.norm: native only")
    if recipe.model.head is not None:
        check_choice(recipe.model.head, "model.head", ["fc", "ml_decoder"])
    for key, value in recipe.model.head_options.items():
        check_choice(key, "model.head_options", list(HEAD_OPTIONS))
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and (key, value) != ("groups", -1)):
            raise UserError(f"recipe key 'model.head_options.{key}' must be a positive integer"
                            f"{' (or -1)' if key == 'groups' else ''}, got {value!r}")
    if recipe.model.head_options and recipe.model.head == "fc":
        raise UserError("recipe key 'model.head_options' applies to model.head: ml_decoder only")
    check_choice(recipe.data.on_bad_image, "data.on_bad_image", ["skip", "error"])
    check_choice(recipe.optimizer.name, "optimizer.name", ["adamw", "adam", "sgd"])
    check_choice(recipe.schedule.name, "schedule.name", ["cosine", "onecycle", "constant"])
    if recipe.loss.name is not None:
        check_choice(recipe.loss.name, "loss.name", ["cross_entropy", "bce", "asl", "asl_single"])
    check_choice(recipe.amp, "amp", ["auto", "bf16", "fp16", "none"])
    if recipe.loss.partial is not None:
        check_choice(recipe.loss.partial, "loss.partial", ["negative", "ignore", "selective"])
    if not 0 <= recipe.loss.prior_threshold <= 1:
        raise UserError(f"recipe key 'loss.prior_threshold' must be in [0, 1], got {recipe.loss.prior_threshold}")
    _positive(recipe.loss.likelihood_topk, "loss.likelihood_topk", allow_zero=True)
    _positive(recipe.loss.prior_epochs, "loss.prior_epochs")
    if recipe.loss.prior is not None and recipe.loss.partial != "selective":
        raise UserError("recipe key 'loss.prior' (a label prior file) is used by loss.partial: selective only; set "
                        "loss.partial: selective or remove loss.prior")
    if isinstance(recipe.data.use_difficult, str) and recipe.data.use_difficult != "unknown":
        raise UserError(f"recipe key 'data.use_difficult' must be true, false or unknown, got "
                        f"{recipe.data.use_difficult!r}")
    if recipe.input_size % 16 or recipe.input_size < 32:
        raise UserError(
            f"recipe key 'input_size' must be a multiple of 16 from 32 up (e.g. 224, 368, 448), got {recipe.input_size}"
        )
    for key in ("epochs", "batch_size", "grad_accum_steps", "val_every"):
        _positive(getattr(recipe, key), key)
    _positive(recipe.workers, "workers", allow_zero=True)
    if recipe.data.limit is not None:
        _positive(recipe.data.limit, "data.limit")
    _positive(recipe.data.shuffle_buffer, "data.shuffle_buffer", allow_zero=True)
    _positive(recipe.optimizer.lr, "optimizer.lr")
    _positive(recipe.optimizer.weight_decay, "optimizer.weight_decay", allow_zero=True)
    _positive(recipe.freeze_backbone_epochs, "freeze_backbone_epochs", allow_zero=True)
    if not 0 < recipe.data.val_fraction < 1:
        raise UserError(f"recipe key 'data.val_fraction' must be between 0 and 1, got {recipe.data.val_fraction}")
    if len(recipe.data.mean) != 3 or len(recipe.data.std) != 3 or min(recipe.data.std) <= 0:
        raise UserError("recipe keys 'data.mean' and 'data.std' must be three numbers each (std > 0)")
    if recipe.ema is not None and not 0 < recipe.ema < 1:
        raise UserError(f"recipe key 'ema' must be a decay between 0 and 1 (e.g. 0.9997) or null, got {recipe.ema}")
    if recipe.schedule.epochs is not None and recipe.schedule.epochs < recipe.epochs:
        raise UserError(
            f"recipe key 'schedule.epochs' ({recipe.schedule.epochs}) must be at least 'epochs' ({recipe.epochs})"
        )
    if not recipe.device.startswith(("auto", "cpu", "cuda")):
        raise UserError(f"recipe key 'device' must be auto, cpu, cuda or cuda:N, got {recipe.device!r}")
    if not 0 < recipe.schedule.pct_start < 1:
        raise UserError(f"recipe key 'schedule.pct_start' must be between 0 and 1 (the share of the schedule spent "
                        f"rising), got {recipe.schedule.pct_start}")
    try:
        parse_checkpoint_every(recipe.checkpoint_every)
    except ValueError:
        raise UserError(f"recipe key 'checkpoint_every' must be a number of optimizer steps (e.g. 500) or a duration "
                        f"(90s, 10m, 1h), got {recipe.checkpoint_every!r}") from None
    if not 0 < recipe.transforms.crop_pct <= 1:
        raise UserError(f"recipe key 'transforms.crop_pct' must be in (0, 1] (e.g. 0.875: resize 224 / 0.875 = 256, "
                        f"then crop 224), got {recipe.transforms.crop_pct}")
