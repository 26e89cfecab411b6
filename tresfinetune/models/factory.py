"""create_model and the model catalogue (what `tresfinetune models` shows)."""

from __future__ import annotations

import torch

from tresfinetune.errors import UserError
from tresfinetune.models.loading import file_num_classes, load_weights
from tresfinetune.models.norm import BACKENDS, _load_inplace_abn
from tresfinetune.models.pretrained import PRETRAINED, default_config, tags_for
from tresfinetune.models.tresnet import ARCHITECTURES, BLOCK_SLOPE, STEM_SLOPE, TResNet

# Multiply-adds per 224x224 image (the paper's "FLOPs"), from tresnet.conv_gflops(); a test keeps them in sync.
GFLOPS_224 = {"tresnet_m": 5.737, "tresnet_l": 10.878, "tresnet_xl": 15.167, "tresnet_v2_l": 8.814}

SLOPES = {"authors": None, "timm": (STEM_SLOPE, BLOCK_SLOPE)}
OPTIONS = {"slopes": tuple(SLOPES)}


def list_models() -> list[str]:
    return list(ARCHITECTURES)


def _no_weights(weights: object) -> bool:
    return weights is None or (isinstance(weights, str) and weights.strip().lower() in ("", "none"))


def create_model(
    name: str,
    num_classes: int | None = 1000,
    weights: str | None = None,
    norm: str = "native",
    **options,
) -> TResNet:
    """A TResNet by name, optionally with pretrained weights (a tag or a local file).

    name: tresnet_m, tresnet_l, tresnet_xl or tresnet_v2_l; `name.tag` (e.g. 'tresnet_m.miil_in1k') also
        selects those weights when `weights` is not given.
    num_classes: classes of the head; None takes the weights' head size (1000 without weights). When it
        differs from the weights' head, the head is re-initialised (with a warning).
    weights: None / 'none', a tag from `PRETRAINED`, or a path (.pth/.pt/.bin/.safetensors; authors', timm's
        or tresfinetune's own checkpoint layout).
    norm: 'native' (default) or 'inplace_abn' (needs the inplace_abn package).
    options: slopes='authors' (default) or 'timm'. Only tresnet_v2_l differs: the authors' code, which trained
        every released V2 weight, uses leaky slope 1e-6 everywhere; timm's port uses 1e-2 in the stem and 1e-3
        in blocks (~3e-4 relative logit difference). 'timm' reproduces timm's logits exactly.
    """
    if "." in name and _no_weights(weights):
        name, weights = name.split(".", 1)[0], name
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UserError(f"unknown model option(s) {', '.join(sorted(unknown))}; valid options: "
                        + ", ".join(f"{k} ({'/'.join(v)})" for k, v in OPTIONS.items()))
    slopes_choice = options.get("slopes", "authors")
    if slopes_choice not in SLOPES:
        raise UserError(f"unknown slopes {slopes_choice!r}; use one of: {', '.join(SLOPES)}")
    if norm not in BACKENDS:
        raise UserError(f"unknown norm backend {norm!r}; use one of: {', '.join(BACKENDS)}")
    if norm == "inplace_abn":
        _load_inplace_abn()  # fail before building a large model

    weights = None if _no_weights(weights) else weights
    if isinstance(weights, str) and weights in PRETRAINED and PRETRAINED[weights].model_name != name:
        raise UserError(f"weights {weights!r} are for {PRETRAINED[weights].model_name}, not {name}")
    if num_classes is None:
        if weights is None:
            num_classes = 1000
        elif isinstance(weights, str) and weights in PRETRAINED:
            num_classes = PRETRAINED[weights].num_classes
        else:
            num_classes = file_num_classes(weights) or 1000
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")

    model = TResNet(ARCHITECTURES[name], num_classes, SLOPES[slopes_choice], model_name=name)
    model.pretrained_cfg = default_config(num_classes=num_classes)
    if norm != "native":
        model.set_norm_backend(norm)
    if weights is not None:
        load_weights(model, weights)
    return model


def describe_models() -> list[dict]:
    """One row per architecture: name, params (1000 classes), GFLOPs at 224, default resolution, tags."""
    rows = []
    for name in ARCHITECTURES:
        with torch.device("meta"):
            params = sum(p.numel() for p in TResNet(ARCHITECTURES[name]).parameters())
        rows.append({
            "name": name,
            "params": params,
            "gflops_224": GFLOPS_224[name],
            "default_resolution": 224,
            "tags": [
                {"tag": w.tag, "top1": w.top1, "input_size": w.input_size, "num_classes": w.num_classes,
                 "note": w.note}
                for w in tags_for(name)
            ],
        })
    return rows
