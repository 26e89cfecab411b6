"""Reading weights files of any supported layout and loading them into a TResNet, with clear errors.

Accepted: a known tag (downloaded once, see pretrained.py) or a local .pth/.pt/.bin/.safetensors file holding
- a plain state dict (timm's or the authors' key layout), possibly under 'model' (authors', ASL) or
  'state_dict' (ImageNet-21K), possibly with DataParallel's 'module.' prefix;
- a tresfinetune checkpoint ({'format': 'tresfinetune-checkpoint', 'model', 'ema', 'inference', ...}): the
  weights its 'inference' entry names (an EMA wrapper's 'module.' prefix is removed).
Pickles are read with weights_only=True: a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from tresfinetune.checkpoint import CHECKPOINT_FORMAT
from tresfinetune.errors import UserError
from tresfinetune.models.convert import detect_layout, guess_architecture, to_ours
from tresfinetune.models.norm import PLAIN_BN_KEY
from tresfinetune.models.pretrained import PRETRAINED, default_config, download
from tresfinetune.models.tresnet import V2_AUTHORS_SLOPE

logger = logging.getLogger("tresfinetune")

HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
WEIGHTS_HINT = "pass a local weights file with --set model.weights=PATH"


def resolve_source(source: str | Path) -> tuple[Path, str | None]:
    """(file path, tag or None) for a tag or a local path."""
    if isinstance(source, str) and source in PRETRAINED:
        return download(source), source
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights {str(source)!r} is neither a file nor a known tag; known tags: {', '.join(PRETRAINED)}"
        )
    return path, None


def read_file(path: Path) -> object:
    """The object in a .safetensors or torch file, unpickled with weights_only=True; UserError if unreadable."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: not a valid safetensors file ({e}); {WEIGHTS_HINT}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if code is None:
            raise UserError(f"cannot read {path}: the file is damaged or not a PyTorch weights file") from None
        raise UserError(
            f"refusing to load {path}: it would call {code[1]} when unpickled, and only tensors and plain "
            "containers are accepted; re-save just the state dict (torch.save(model.state_dict(), PATH))"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as e:
        detail = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path}: the file is damaged or not a PyTorch weights file ({detail})") from None


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict as stored, metadata) from a weights file; metadata holds what a tresfinetune checkpoint adds."""
    path = Path(path)
    return unwrap_state_dict(read_file(path), path)


def unwrap_state_dict(obj: object, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) from a loaded file's object: the inference weights of a tresfinetune checkpoint,
    the state dict inside the authors' / ASL / 21k wrappers, without DataParallel, DDP or EMA prefixes."""
    meta: dict = {}
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        which = obj.get("inference", "model")
        state_dict = obj.get(which)
        if state_dict is None:
            raise UserError(f"{path} names {which!r} weights for inference but holds none")
        meta = {k: obj[k] for k in ("model_name", "class_names", "task", "input_size", "mean", "std", "thresholds")
                if k in obj}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state_dict = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict = obj["state_dict"]
    else:
        state_dict = obj
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    wrapped = [k for k in state_dict if k.startswith("module.")]
    if wrapped and len(wrapped) >= len(state_dict) - 1:
        # DataParallel / DDP / EMA wrappers (AveragedModel adds its own `n_averaged` counter).
        state_dict = {k[len("module."):]: state_dict[k] for k in wrapped}
    return state_dict, meta


def _named(keys: list[str] | set[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def file_num_classes(path: str | Path) -> int | None:
    """Number of classes of the head stored in a weights file (None if it has no head)."""
    state_dict, _ = read_weights(path)
    head = state_dict.get("head.fc.weight")
    return None if head is None else int(head.shape[0])


def load_weights(model: torch.nn.Module, source: str | Path, strict_head: bool = False) -> None:
    """Load a tag's or a file's weights into `model` (a TResNet), converting the layout as needed.

    A head for a different number of classes is skipped (the model's head is re-initialised and a warning
    logged) unless `strict_head`, which makes it an error. Any other missing, unexpected or misshapen key is
    an error naming the keys. Sets `model.pretrained_cfg`.
    """
    path, tag = resolve_source(source)
    stored, meta = read_weights(path)
    try:
        state_dict = to_ours(stored)
    except ValueError as e:
        raise UserError(f"{path} does not contain TResNet weights ({e}); {WEIGHTS_HINT}") from None

    model_name = getattr(model, "model_name", None)
    file_arch = guess_architecture(state_dict)
    if file_arch is not None and model_name is not None and file_arch != model_name:
        raise UserError(f"{path} holds {file_arch} weights, but the model is {model_name}; "
                        f"create a {file_arch} model for this file")

    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("." + PLAIN_BN_KEY)}
    given = {k for k in state_dict if not k.endswith("." + PLAIN_BN_KEY)}
    file_head = state_dict.get("head.fc.weight")
    if file_head is None and not any(k in state_dict for k in HEAD_KEYS):
        logger.warning("%s has no classifier head: the model's head is freshly initialised", path.name)
        expected = {k: v for k, v in expected.items() if k not in HEAD_KEYS}
    elif file_head is not None and file_head.shape != expected["head.fc.weight"].shape:
        if strict_head:
            raise UserError(f"{path} has a {file_head.shape[0]}-class head, but the model has "
                            f"{model.num_classes} classes")
        for key in HEAD_KEYS:
            state_dict.pop(key, None)
            given.discard(key)
        logger.warning("%s has a %d-class head and the model has %d classes: the classifier head was "
                       "re-initialised and will be trained from scratch", path.name, file_head.shape[0],
                       model.num_classes)
        model.reset_classifier(model.num_classes)
        expected = {k: v for k, v in expected.items() if k not in HEAD_KEYS}

    missing, unexpected = set(expected) - given, given - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_named(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_named(unexpected)}")
        guess = f" (it looks like {file_arch})" if file_arch else ""
        raise UserError(f"{path} does not match {model_name or 'the model'}{guess}: {'; '.join(parts)}")
    misshapen = [k for k in given if state_dict[k].shape != expected[k].shape]
    if misshapen:
        raise UserError(f"{path} does not match {model_name or 'the model'}: wrong shapes for {_named(misshapen)}")

    model.load_state_dict(state_dict, strict=False)
    plain = sum(k.endswith("." + PLAIN_BN_KEY) for k in state_dict)
    if plain:
        logger.info("%d norm layers in %s have scales below 1e-5 or negative (plain BatchNorm); they keep "
                    "plain BatchNorm semantics and save no activation memory", plain, path.name)
    if detect_layout(stored) == "timm" and V2_AUTHORS_SLOPE in getattr(model, "slopes", ()):
        logger.debug("tresnet_v2_l runs the authors' leaky slope 1e-6; timm's port uses 1e-3/1e-2 "
                     "(logits differ ~3e-4 relative); create_model(..., slopes='timm') reproduces timm exactly")

    if tag is not None:
        cfg = PRETRAINED[tag].config()
    else:
        cfg = default_config(meta.get("input_size", 224))
        cfg.update({k: tuple(meta[k]) for k in ("mean", "std") if k in meta})
        cfg.update({k: meta[k] for k in ("class_names", "task", "thresholds") if k in meta})
        cfg["file"] = str(path)
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg
