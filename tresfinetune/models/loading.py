"""Reading weights files of any supported layout and loading them into a TResNet, with clear errors.

Accepted: a known tag (downloaded once, see pretrained.py) or a local .pth/.pt/.bin/.safetensors file holding
- a plain state dict (timm's or the authors' key layout), possibly under 'model' (authors', ASL) or
  'state_dict' (ImageNet-21K), possibly with DataParallel's 'module.' prefix;
- a tresfinetune checkpoint ({'format': 'tresfinetune-checkpoint', 'model', 'ema', 'inference', ...}): the
  weights its 'inference' entry names (an EMA wrapper's 'module.' prefix is removed).
Pickles are read with weights_only=True: a file that would run code when unpickled is refused.
The head may be pooling + fc (`head.fc.*`) or ML-Decoder (`head.decoder.*`, the ML_Decoder code's files).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from tresfinetune.checkpoint import RunCheckpoint, is_run_checkpoint
from tresfinetune.errors import UserError
from tresfinetune.files import WEIGHTS_HINT, read_tensor_file
from tresfinetune.models.convert import detect_layout, guess_architecture, to_ours
from tresfinetune.models.norm import PLAIN_BN_KEY
from tresfinetune.models.pretrained import PRETRAINED, default_config, download
from tresfinetune.models.tresnet import V2_AUTHORS_SLOPE

logger = logging.getLogger("tresfinetune")

# What the ML_Decoder code calls the backbones it trained (SPEC section 9).
ML_DECODER_NAMES = {"tresnet_m": "tresnet_m", "tresnet_v2_l": "tresnet_l", "tresnet_v2_xl": "tresnet_xl"}


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


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict as stored, metadata) from a weights file; metadata holds what a tresfinetune checkpoint adds."""
    path = Path(path)
    return unwrap_state_dict(read_tensor_file(path), path)


def unwrap_state_dict(obj: object, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) from a loaded file's object: the inference weights of a tresfinetune checkpoint,
    the state dict inside the authors' / ASL / 21k wrappers, without DataParallel, DDP or EMA prefixes."""
    meta: dict = {}
    if is_run_checkpoint(obj):
        checkpoint = RunCheckpoint.from_dict(obj, Path(path))
        state_dict = checkpoint.inference_state_dict()
        meta = {k: v for k, v in dataclasses.asdict(checkpoint.info).items() if k != "recipe"}
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


def describe_head(state_dict: dict[str, torch.Tensor]) -> dict | None:
    """The head a (our-layout) state dict holds: {'kind', 'num_classes'} plus 'groups' and 'embedding' for an
    ML-Decoder head; None when it holds no head."""
    if "head.decoder.query_embed.weight" in state_dict and "head.decoder.duplicate_pooling_bias" in state_dict:
        groups, embedding = state_dict["head.decoder.query_embed.weight"].shape
        return {"kind": "ml_decoder", "num_classes": int(state_dict["head.decoder.duplicate_pooling_bias"].shape[0]),
                "groups": int(groups), "embedding": int(embedding)}
    if "head.fc.weight" in state_dict:
        return {"kind": "fc", "num_classes": int(state_dict["head.fc.weight"].shape[0])}
    return None


def _head_words(head: dict) -> str:
    if head["kind"] == "fc":
        return f"a {head['num_classes']}-class head (pooling + fc)"
    return (f"a {head['num_classes']}-class ML-Decoder head ({head['groups']} groups, embedding "
            f"{head['embedding']})")


def _model_head(model: torch.nn.Module) -> dict:
    return describe_head(model.state_dict()) or {"kind": "none", "num_classes": model.num_classes}


def read_ours(source: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path, str | None, bool]:
    """(state dict in our layout, metadata, file path, tag or None, whether the file used timm's layout)."""
    path, tag = resolve_source(source)
    stored, meta = read_state_dict(path)
    try:
        state_dict = to_ours(stored)
    except ValueError as e:
        raise UserError(f"{path} does not contain TResNet weights ({e}); {WEIGHTS_HINT}") from None
    return state_dict, meta, path, tag, detect_layout(stored) == "timm"


def check_architecture(state_dict: dict[str, torch.Tensor], model_name: str | None, path: str | Path) -> None:
    """UserError naming the right architecture when the file's backbone is not `model_name`'s."""
    file_arch = guess_architecture(state_dict)
    if file_arch is None or model_name is None or file_arch == model_name:
        return
    head = describe_head(state_dict)
    ml_decoder = head is not None and head["kind"] == "ml_decoder"
    called = f" (the ML_Decoder code's {ML_DECODER_NAMES[file_arch]})" if ml_decoder else ""
    raise UserError(f"{path} holds {file_arch} weights{called}, but the model is {model_name}; "
                    f"create a {file_arch} model for this file")


def load_weights(model: torch.nn.Module, source: str | Path, strict_head: bool = False) -> None:
    """Load a tag's or a file's weights into `model` (a TResNet), converting the layout as needed."""
    state_dict, meta, path, tag, was_timm = read_ours(source)
    load_state(model, state_dict, meta, path, tag, strict_head, was_timm)


def load_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], meta: dict, path: Path,
               tag: str | None = None, strict_head: bool = False, was_timm: bool = False) -> None:
    """Load an our-layout state dict (from read_ours) into `model` (a TResNet).

    A head that does not fit (another number of classes, or an fc head for an ML-Decoder model and the other
    way round) is skipped, the model's head re-initialised and a warning logged, unless `strict_head`, which
    makes it an error. An ML-Decoder head for the same classes with other groups or embedding is an error. Any
    other missing, unexpected or misshapen key is an error naming the keys. Sets `model.pretrained_cfg`.
    """
    state_dict = dict(state_dict)
    model_name = getattr(model, "model_name", None)
    check_architecture(state_dict, model_name, path)
    file_arch = guess_architecture(state_dict)

    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("." + PLAIN_BN_KEY)}
    file_head, model_head = describe_head(state_dict), _model_head(model)
    head_keys = {k for k in state_dict if k.startswith("head.")}
    if file_head is None and not head_keys:
        logger.warning("%s has no classifier head: the model's head is freshly initialised", path.name)
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    elif file_head is not None and file_head != model_head:
        same_classes = file_head["num_classes"] == model_head["num_classes"]
        if strict_head or (same_classes and file_head["kind"] == model_head["kind"]):
            raise UserError(f"{path} has {_head_words(file_head)}, but the model has {_head_words(model_head)}")
        for key in head_keys:
            state_dict.pop(key)
        logger.warning("%s has %s and the model has %s: the head was re-initialised and will be trained from "
                       "scratch", path.name, _head_words(file_head), _head_words(model_head))
        model.reset_classifier(model.num_classes)
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    given = {k for k in state_dict if not k.endswith("." + PLAIN_BN_KEY)}

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
    if was_timm and V2_AUTHORS_SLOPE in getattr(model, "slopes", ()):
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
