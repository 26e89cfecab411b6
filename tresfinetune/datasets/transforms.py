"""Augmentation pipelines built from recipes, with albumentations.

A recipe lists transforms by albumentations class name: `- RandomResizedCrop: {scale: [0.25, 1]}`, or just
`- HorizontalFlip` for the defaults. Size arguments left out are filled from input_size (see `fill_sizes`), so one
key switches the resolution; sizes written out win. Compositions nest: `- OneOf: {transforms: [...], p: 0.5}`.
Two extras are available by name: `Cutout` (ASL's half-size box of one random colour) and `RandAugment` (N ops from a
fixed list of albumentations ops, each at up to magnitude M). Every pipeline ends by converting to a float CHW tensor
in [0, 1], then (x - mean) / std with data.mean / data.std (TResNet's weights want neither, so both default to 0 / 1).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import albumentations as A
import numpy as np
import torch

from tresfinetune.errors import UserError
from tresfinetune.recipe import TransformsConfig

if TYPE_CHECKING:
    from tresfinetune.recipe import Recipe

# Single-label evaluation below this size resizes the shorter side to size / crop_pct and centre-crops (the
# ImageNet 224 protocol); at this size and above the authors squish-resize the whole image (their 448 protocol).
SQUISH_FROM_SIZE = 320
CROP_FRACTION = TransformsConfig.crop_pct  # the recipe's default
# Smallest crop area for the default RandomResizedCrop; ImageNet's 0.08 is harsh for small, low-resolution sets.
DEFAULT_CROP_SCALE = (0.25, 1.0)


# ---- custom transforms usable by name in recipes ----------------------------------------------------------------

FILL_CHOICES = ("random", "noise", "grey")


def Cutout(p: float = 0.5, size: float = 0.5, fill: str | float | list = "random") -> A.CoarseDropout:  # noqa: N802
    """ASL-style cutout: with probability p, one box of `size` times the image's height and width, filled with one
    random colour ("random"), per-pixel noise ("noise"), mid grey ("grey") or a given value / RGB triple."""
    if not 0 < size <= 1:
        raise ValueError(f"size must be a fraction of the image in (0, 1], got {size}")
    if isinstance(fill, str):
        if fill not in FILL_CHOICES:
            raise ValueError(f"fill must be one of {', '.join(FILL_CHOICES)} or a number / RGB list, got {fill!r}")
        fill_value = {"random": "random_uniform", "noise": "random", "grey": 128}[fill]
    else:
        fill_value = tuple(fill) if isinstance(fill, list) else fill
    return A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(size, size), hole_width_range=(size, size),
                           fill=fill_value, p=p)


def RandAugment(num_ops: int = 2, magnitude: float = 9, p: float = 1.0) -> A.SomeOf:  # noqa: N802
    """RandAugment-style policy: `num_ops` ops drawn (with replacement) from the list below, each with a strength
    drawn uniformly up to `magnitude` on a 0-10 scale (10 = the largest strength of the original policy)."""
    if not 0 <= magnitude <= 10:
        raise ValueError(f"magnitude must be between 0 and 10, got {magnitude}")
    if num_ops < 1:
        raise ValueError(f"num_ops must be at least 1, got {num_ops}")
    m = magnitude / 10
    grey = 128  # border fill of the geometric ops, as in the original policy
    ops = [
        A.NoOp(p=1),
        A.AutoContrast(p=1),
        A.Equalize(p=1),
        A.Rotate(limit=(-30 * m, 30 * m), fill=grey, p=1),
        A.Solarize(threshold_range=(1 - m, 1.0), p=1),
        A.Posterize(num_bits=(8 - int(4 * m), 8), p=1),
        A.ColorJitter(brightness=0, contrast=0, saturation=(1 - 0.9 * m, 1 + 0.9 * m), hue=0, p=1),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9 * m, p=1),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0, p=1),
        A.Sharpen(alpha=(0, 0.9 * m), lightness=(1, 1), p=1),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, fill=grey, p=1),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, fill=grey, p=1),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, fill=grey, p=1),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, fill=grey, p=1),
    ]
    return A.SomeOf(ops, n=num_ops, replace=True, p=p)


CUSTOM_TRANSFORMS: dict[str, Callable[..., Any]] = {"Cutout": Cutout, "RandAugment": RandAugment}
# Added by the pipeline itself from data.mean / data.std; listing them would apply them twice.
AUTOMATIC = {"Normalize", "ToTensorV2", "ToTensor"}


def _albumentations_names() -> list[str]:
    return [name for name, obj in vars(A).items()
            if inspect.isclass(obj) and issubclass(obj, (A.BasicTransform, A.BaseCompose)) and not name.startswith("_")]


def _resolve(name: str, where: str) -> Callable[..., Any]:
    if name in AUTOMATIC:
        raise UserError(f"{where}: remove '{name}'; the pipeline converts to a tensor and applies data.mean / data.std "
                        "itself")
    if name in CUSTOM_TRANSFORMS:
        return CUSTOM_TRANSFORMS[name]
    obj = getattr(A, name, None)
    if inspect.isclass(obj) and issubclass(obj, (A.BasicTransform, A.BaseCompose)):
        return obj
    known = _albumentations_names() + list(CUSTOM_TRANSFORMS)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else " (names are albumentations class names, e.g. HorizontalFlip)"
    raise UserError(f"{where}: unknown transform '{name}'{hint}")


def _explain(error: Exception) -> str:
    """albumentations' pydantic error text -> 'argument: problem' parts on one line."""
    text = str(error)
    lines = [line for line in text.splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    if lines and re.match(r"\d+ validation errors? for", lines[0]):
        parts = []
        for field_name, problem in zip(lines[1::2], lines[2::2], strict=False):
            if problem.strip().startswith("Field required"):
                parts.append(f"argument '{field_name.strip()}' is required")
                continue
            problem = re.sub(r"\s*\[type=.*?(input_value=(.*?), input_type.*)?\]$", r" (got \2)", problem.strip())
            problem = problem.replace(" (got )", "").removeprefix("Value error, ")
            parts.append(f"argument '{field_name.strip()}': {problem}")
        return "; ".join(parts)
    return " ".join(lines)


def _parse_entry(entry: Any, where: str) -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, args),) = entry.items()
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise UserError(f"{where}: the arguments of '{name}' must be a mapping like {{p: 0.5}}, got {args!r}")
        return str(name), dict(args)
    raise UserError(f"{where}: each transform must be a name or a one-key mapping like "
                    f"'- RandomResizedCrop: {{size: [224, 224]}}', got {entry!r}")


def _build_one(entry: Any, where: str) -> Any:
    name, args = _parse_entry(entry, where)
    factory = _resolve(name, where)
    if inspect.isclass(factory) and issubclass(factory, A.BaseCompose):
        children = args.get("transforms")
        if not isinstance(children, list):
            raise UserError(f"{where}: {name} needs 'transforms': a list of transforms")
        args["transforms"] = [_build_one(child, f"{where}.transforms[{i}]") for i, child in enumerate(children)]
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = [n for n in parameters if n not in ("self", "args", "kwargs", "strict")]
    for arg in args:
        if not takes_any and arg not in valid or arg == "strict":
            close = difflib.get_close_matches(arg, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid arguments: {', '.join(valid)}"
            raise UserError(f"{where}: unknown argument '{arg}' for {name}{hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory(**args)
    except UserError:
        raise
    except Exception as e:  # albumentations reports bad values as ValueError / TypeError / pydantic errors
        raise UserError(f"{where}: bad arguments for {name}: {_explain(e)}") from None


def build_pipeline_list(spec: list, where: str) -> list:
    """Construct the albumentations objects of a recipe list; UserError naming the entry at the first problem."""
    if not isinstance(spec, list):
        raise UserError(f"{where} must be a list of transforms, got {spec!r}")
    return [_build_one(entry, f"{where}[{i}]") for i, entry in enumerate(spec)]


def validate_pipeline(spec: list, where: str, input_size: int = 224, crop_pct: float = CROP_FRACTION) -> None:
    """Check a recipe's transform list (its sizes filled) by constructing it; UserError naming the bad entry."""
    if not isinstance(spec, list):
        raise UserError(f"{where} must be a list of transforms, got {spec!r}")
    build_pipeline_list(fill_sizes(spec, input_size, crop_pct, where), where)


# ---- sizes from input_size ----------------------------------------------------------------------------------------

# The size arguments each transform can take from input_size, when the recipe leaves them out.
SIZE_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "RandomResizedCrop": ("size",),
    "CenterCrop": ("height", "width"),
    "RandomCrop": ("height", "width"),
    "PadIfNeeded": ("min_height", "min_width"),
    "LongestMaxSize": ("max_size",),
    "Resize": ("height", "width"),
    "SmallestMaxSize": ("max_size",),
}
RESIZES = {"Resize", "SmallestMaxSize"}  # input_size / crop_pct when a fixed-size crop follows, else input_size
FIXED_CROPS = {"CenterCrop", "RandomCrop"}


def _next_sized(spec: list, start: int = 0) -> str | None:
    """Name of the first size-taking transform in spec[start:] (looking inside OneOf and the like), if any."""
    for entry in spec[start:]:
        if isinstance(entry, str):
            name, args = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            ((name, args),) = entry.items()
        else:
            continue
        if isinstance(args, dict) and isinstance(args.get("transforms"), list):
            found = _next_sized(args["transforms"])
        else:
            found = name if name in SIZE_ARGUMENTS else None
        if found:
            return found
    return None


def fill_sizes(spec: list, input_size: int, crop_pct: float = CROP_FRACTION, where: str = "transforms") -> list:
    """A copy of a recipe transform list with the size arguments it leaves out filled from input_size.

    Crops and pads get input_size. A resize gets input_size, or round(input_size / crop_pct) when the next sized
    step is a CenterCrop / RandomCrop (`SmallestMaxSize: {}, CenterCrop: {}` is the ImageNet evaluation protocol,
    `Resize: {}` alone a squish). Arguments written out are kept; nested lists (OneOf, ...) are filled the same way.
    """
    if not isinstance(spec, list):
        return spec  # build_pipeline_list names the problem
    filled = []
    for i, entry in enumerate(spec):
        try:
            name, args = _parse_entry(entry, f"{where}[{i}]")
        except UserError:
            filled.append(entry)  # reported by build_pipeline_list, with the rest of the checks
            continue
        if isinstance(args.get("transforms"), list):
            args["transforms"] = fill_sizes(args["transforms"], input_size, crop_pct, f"{where}[{i}].transforms")
        value = input_size
        if name in RESIZES and _next_sized(spec, i + 1) in FIXED_CROPS:
            value = round(input_size / crop_pct)
        missing = [] if "max_size_hw" in args else [a for a in SIZE_ARGUMENTS.get(name, ()) if a not in args]
        for argument in missing:
            args[argument] = [value, value] if argument == "size" else value
        filled.append(entry if isinstance(entry, str) and not missing else {name: args})
    return filled


# ---- defaults -----------------------------------------------------------------------------------------------------


def default_spec(input_size: int, train: bool, multi_label: bool = False, hflip: bool = True,
                 crop_scale: tuple[float, float] | None = None) -> list:
    """The recipe-format transform list used when the recipe gives none (sizes left to `fill_sizes`)."""
    if not train:
        if multi_label or input_size >= SQUISH_FROM_SIZE:
            return [{"Resize": {}}]
        return [{"SmallestMaxSize": {}}, {"CenterCrop": {}}]
    flip = [{"HorizontalFlip": {"p": 0.5}}] if hflip else []
    if multi_label:  # ASL: whole image squished, so no labelled object is cropped away
        return [{"Resize": {}}, *flip, {"Cutout": {"p": 0.5}}]
    return [{"RandomResizedCrop": {"scale": list(crop_scale or DEFAULT_CROP_SCALE)}}, *flip]


# ---- how small an image the pipeline can start from -----------------------------------------------------------------


@dataclass(frozen=True)
class ShorterSideAtLeast:
    """A decoded image fits a first step that resizes to `side` (squish or shorter side) if it is no smaller."""

    side: int

    def __call__(self, width: int, height: int) -> bool:
        return min(width, height) >= self.side


@dataclass(frozen=True)
class CropsAtLeast:
    """A decoded image fits a first RandomResizedCrop to `side` if every crop it can draw is at least that large.

    Mirrors albumentations' draw: accepted crops have an area of at least scale_min * W * H and an aspect ratio in
    `ratio`, so both sides are at least sqrt(scale_min * W * H * min(ratio_min, 1 / ratio_max)); after ten failed
    draws it falls back to the central crop of the clamped ratio.
    """

    side: int
    scale_min: float
    ratio: tuple[float, float]

    def __call__(self, width: int, height: int) -> bool:
        low, high = self.ratio
        smallest_drawn = math.sqrt(self.scale_min * width * height * min(low, 1 / high))
        if width / height < low:
            fallback = min(width, round(width / low))
        elif width / height > high:
            fallback = min(height, round(height * high))
        else:
            fallback = min(width, height)
        return min(smallest_drawn, fallback) >= self.side


def decode_requirement(transforms: list) -> Callable[[int, int], bool] | None:
    """What a decoded image must satisfy so that the pipeline never enlarges the pixels it keeps, when its first
    step resizes (Resize, SmallestMaxSize, RandomResizedCrop, always applied); None: the full image is needed."""
    first = transforms[0] if transforms else None
    if first is None or getattr(first, "p", 1) < 1:
        return None
    if isinstance(first, A.RandomResizedCrop):
        return CropsAtLeast(max(first.size), first.scale[0], tuple(first.ratio))
    if isinstance(first, A.Resize):
        return ShorterSideAtLeast(max(first.height, first.width))
    if isinstance(first, A.SmallestMaxSize) and first.max_size is not None:
        sizes = first.max_size if isinstance(first.max_size, (list, tuple)) else [first.max_size]
        return ShorterSideAtLeast(max(sizes))
    return None


# ---- the callable pipeline ----------------------------------------------------------------------------------------


class Pipeline:
    """numpy HWC uint8 RGB -> torch HWC uint8 (the augmented pixels, no copy).

    The loader workers only decode, augment and stack: batches are (N, H, W, 3) uint8, a plain memory copy per
    image. The relayout to NCHW, scaling to [0, 1] and mean/std happen per batch on the training device
    (`to_model_input`): the batch travels at a quarter of the float size, and with channels_last (the CUDA default)
    the relayout is free, since NHWC is exactly channels-last memory.
    """

    def __init__(self, transforms: list):
        self.compose = A.Compose(transforms)
        # Passed to load_image: JPEGs are decoded at the smallest DCT scale that still satisfies it.
        self.decode_fits = decode_requirement(transforms)

    def reseed(self, *keys: int) -> None:
        """Make the random draws of the next calls a function of `keys` only (e.g. seed, epoch, sample index)."""
        generator = np.random.default_rng([k & 0xFFFFFFFF for k in keys])
        self.compose.set_random_state(generator, random.Random(int(generator.integers(2**63))))

    def augment(self, image: np.ndarray) -> np.ndarray:
        """The albumentations part only: HWC uint8 in, HWC out (for previews)."""
        return self.compose(image=image)["image"]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        out = self.augment(image)
        if out.ndim == 2:
            out = out[:, :, None].repeat(3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(out))

    def __repr__(self) -> str:
        return f"Pipeline({self.compose.transforms})"


def transform_spec(recipe: Recipe, train: bool) -> list:
    """The recipe's transform list for train / val (or the default for its dataset), sizes filled from input_size."""
    from tresfinetune.datasets.source import source_defaults
    from tresfinetune.tasks import MULTI_LABEL

    spec = recipe.transforms.train if train else recipe.transforms.val
    if spec is None:
        info = source_defaults(recipe.data)
        spec = default_spec(recipe.input_size, train, multi_label=info.task == MULTI_LABEL, hflip=info.hflip,
                            crop_scale=info.crop_scale)
    return fill_sizes(spec, recipe.input_size, recipe.transforms.crop_pct, f"transforms.{'train' if train else 'val'}")


def build_transforms(recipe: Recipe, train: bool) -> Pipeline:
    """The training or evaluation pipeline of a recipe; UserError if it does not produce input_size squares."""
    where = f"transforms.{'train' if train else 'val'}"
    pipeline = Pipeline(build_pipeline_list(transform_spec(recipe, train), where))
    # Batches need one size; check on an odd-shaped image that the list ends at input_size x input_size.
    size = recipe.input_size
    probe = np.random.default_rng(0).integers(0, 256, (size + 37, size * 5 // 4 + 11, 3), dtype=np.uint8)
    pipeline.reseed(0)
    try:
        out = pipeline(probe)
    except Exception as e:
        raise UserError(f"{where} failed on a test image: {_explain(e)}") from None
    if out.dtype != torch.uint8:
        raise UserError(f"{where} turns images into {out.dtype} pixels; keep them uint8 (scaling and mean/std are "
                        "applied later, from data.mean and data.std)")
    shape = tuple(out.shape)
    expected = (recipe.input_size, recipe.input_size, 3)
    if shape != expected:
        raise UserError(f"{where} makes {shape[0]}x{shape[1]} images but input_size is {recipe.input_size}; end the "
                        f"list with a resize or crop to {recipe.input_size}x{recipe.input_size}")
    return pipeline


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    mean: list[float],
    std: list[float],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """A batch from the loaders (N, H, W, 3 uint8) as the model's input (N, 3, H, W float): moved to `device`
    first, then scaled to [0, 1] and normalised with mean/std (TResNet weights use none: mean 0, std 1)."""
    images = images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    x.copy_(images)  # one pass: relayout (none for channels_last) and conversion together
    if images.dtype == torch.uint8:
        x.mul_(1.0 / 255.0)
    if any(m != 0 for m in mean) or any(v != 1 for v in std):
        mean_tensor, std_tensor = _normalisation_tensors(tuple(mean), tuple(std), x.device)
        x.sub_(mean_tensor).div_(std_tensor)
    return x


@functools.lru_cache(maxsize=16)
def _normalisation_tensors(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, 3, 1, 1) tensors on `device`, made once: a host-to-device copy per batch would stall."""
    shape = (1, -1, 1, 1)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)
