"""create_model and the model catalogue (what `tresfinetune models` shows)."""

from __future__ import annotations

import torch

from tresfinetune.errors import UserError
from tresfinetune.models.loading import check_architecture, describe_head, load_state, read_ours
from tresfinetune.models.ml_decoder import DEFAULT_EMBEDDING, NUM_HEADS, num_groups
from tresfinetune.models.norm import BACKENDS, _load_inplace_abn
from tresfinetune.models.pretrained import PRETRAINED, default_config, tags_for
from tresfinetune.models.tresnet import ARCHITECTURES, BLOCK_SLOPE, HEADS, STEM_SLOPE, TResNet

# Multiply-adds per 224x224 image (the paper's "FLOPs"), from tresnet.conv_gflops(); a test keeps them in sync.
GFLOPS_224 = {"tresnet_m": 5.737, "tresnet_l": 10.878, "tresnet_xl": 15.167, "tresnet_v2_l": 8.814,
              "tresnet_v2_xl": 12.527}

SLOPES = {"authors": None, "timm": (STEM_SLOPE, BLOCK_SLOPE)}
OPTIONS = {"slopes": "authors/timm", "head_groups": "an integer, -1 for the default", "head_embedding": "an integer"}


def list_models() -> list[str]:
    return list(ARCHITECTURES)


def _no_weights(weights: object) -> bool:
    return weights is None or (isinstance(weights, str) and weights.strip().lower() in ("", "none"))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _head_settings(head: str | None, options: dict, num_classes: int, file_head: dict | None,
                   source: object) -> tuple[str, int | None, int]:
    """(head kind, groups or None, embedding): the options, else the file's ML-Decoder head, else the defaults."""
    groups, embedding = options.get("head_groups"), options.get("head_embedding")
    if groups is not None and groups != -1 and not _positive_int(groups):
        raise UserError(f"head_groups must be a positive integer (or -1 for the default rule), got {groups!r}")
    if embedding is not None and not (_positive_int(embedding) and embedding % NUM_HEADS == 0):
        raise UserError(f"head_embedding must be a positive multiple of {NUM_HEADS} (the decoder's attention "
                        f"heads), got {embedding!r}")
    groups = None if groups == -1 else groups
    file_decoder = file_head if file_head is not None and file_head["kind"] == "ml_decoder" else None
    kind = head or ("ml_decoder" if file_decoder else "fc")
    if kind == "fc":
        if groups is not None or embedding is not None:
            raise UserError("head_groups and head_embedding (model.head_options in a recipe) apply to the "
                            "ml_decoder head only, and this model's head is fc")
        return kind, None, DEFAULT_EMBEDDING
    if file_decoder is not None and file_decoder["num_classes"] == num_classes:
        # The file's head will be loaded: its shapes decide, and options may only repeat them.
        effective_groups = None if groups is None else num_groups(num_classes, groups)
        for option, value, in_file in (("head_groups", effective_groups, file_decoder["groups"]),
                                       ("head_embedding", embedding, file_decoder["embedding"])):
            if value is not None and value != in_file:
                raise UserError(f"{option}={value} contradicts {source}, whose ML-Decoder head has "
                                f"{option.removeprefix('head_')} {in_file}; leave {option} unset to use the file's")
        return kind, file_decoder["groups"], file_decoder["embedding"]
    return kind, groups, embedding or DEFAULT_EMBEDDING


def create_model(
    name: str,
    num_classes: int | None = 1000,
    weights: str | None = None,
    norm: str = "native",
    head: str | None = None,
    **options,
) -> TResNet:
    """A TResNet by name, optionally with pretrained weights (a tag or a local file).

    name: tresnet_m, tresnet_l, tresnet_xl, tresnet_v2_l or tresnet_v2_xl; `name.tag` (e.g.
        'tresnet_m.miil_in1k') also selects those weights when `weights` is not given.
    num_classes: classes of the head; None takes the weights' head size (1000 without weights). When it
        differs from the weights' head, the head is re-initialised (with a warning).
    weights: None / 'none', a tag from `PRETRAINED`, or a path (.pth/.pt/.bin/.safetensors; authors', timm's
        or tresfinetune's own checkpoint layout).
    norm: 'native' (default) or 'inplace_abn' (needs the inplace_abn package).
    head: 'fc' (global pooling + linear) or 'ml_decoder'; None (default) means 'ml_decoder' when the weights
        carry an ML-Decoder head, else 'fc'. Weights with the other kind of head load with a fresh head (warning).
    options:
        slopes='authors' (default) or 'timm': the leaky slopes of the code that trained the model. Only the V2
            layout differs: the TResNet code, which trained every released V2 weight with an fc head, uses 1e-6
            everywhere; timm's port and the ML_Decoder code use 1e-2 in the stem and 1e-3 in blocks (~3e-4
            relative logit difference). So 'authors' means 1e-6 for tresnet_v2_l with an fc head and 1e-2/1e-3
            with an ML-Decoder head; 'timm' is always 1e-2/1e-3.
        head_groups: ML-Decoder queries; unset or -1: 100, capped at num_classes (the reference's rule).
        head_embedding: ML-Decoder width (768). Both default to the weights' own ML-Decoder head when it is for
            the same number of classes; values contradicting it are an error.
    """
    if "." in name and _no_weights(weights):
        name, weights = name.split(".", 1)[0], name
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UserError(f"unknown model option(s) {', '.join(sorted(unknown))}; valid options: "
                        + ", ".join(f"{k} ({v})" for k, v in OPTIONS.items()))
    if head is not None and head not in HEADS:
        raise UserError(f"unknown head {head!r}; use one of: {', '.join(HEADS)}")
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
    loaded = None if weights is None else read_ours(weights)  # (state dict, meta, path, tag, was_timm)
    file_head = None if loaded is None else describe_head(loaded[0])
    if loaded is not None:
        check_architecture(loaded[0], name, loaded[2])  # before building a model of the wrong size
    if num_classes is None:
        if weights is None:
            num_classes = 1000
        elif isinstance(weights, str) and weights in PRETRAINED:
            num_classes = PRETRAINED[weights].num_classes
        else:
            num_classes = 1000 if file_head is None else file_head["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    kind, groups, embedding = _head_settings(head, options, num_classes, file_head,
                                             None if loaded is None else loaded[2])

    slopes = SLOPES[slopes_choice]
    if slopes is None and kind == "ml_decoder":
        slopes = (STEM_SLOPE, BLOCK_SLOPE)  # every ML-Decoder weight comes from the ML_Decoder code
    model = TResNet(ARCHITECTURES[name], num_classes, slopes, model_name=name, head=kind, head_groups=groups,
                    head_embedding=embedding)
    model.pretrained_cfg = default_config(num_classes=num_classes)
    if norm != "native":
        model.set_norm_backend(norm)
    if loaded is not None:
        state_dict, meta, path, tag, was_timm = loaded
        load_state(model, state_dict, meta, path, tag, was_timm=was_timm)
    return model


def head_arguments(state_dict: dict[str, torch.Tensor]) -> dict:
    """create_model's head arguments that rebuild the head a state dict of ours holds (fc when it has none)."""
    head = describe_head(state_dict)
    if head is None or head["kind"] == "fc":
        return {"head": "fc"}
    return {"head": "ml_decoder", "head_groups": head["groups"], "head_embedding": head["embedding"]}


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
