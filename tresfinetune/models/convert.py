"""Pure state-dict conversions between checkpoint layouts (state_dict -> state_dict, no model needed).

Layouts (SPEC section 3):
- "authors": the MIIL code's nesting (`body.conv1.0.weight`, `body.conv1.1.*`, stride-2 units one level deeper,
  `downsample.1.0` / `.1.1`), raw InPlaceABN norm weights. This is also our own layout.
- "timm": `.conv.` / `.bn.` names, stride-2 units flat, norm weights already turned into plain BatchNorm scales
  (|w| + 1e-5 for converted files, any value after fine-tuning with plain BatchNorm), `num_batches_tracked`.

Norm weights from timm become raw ABN weights `w - 1e-5` when every weight of the layer is >= 1e-5 (then
|w - 1e-5| + 1e-5 == w up to one rounding); otherwise the layer keeps plain BatchNorm semantics, recorded with the
`<layer>.plain_bn` marker key (see norm.py).
"""

from __future__ import annotations

import re

import torch

from tresfinetune.models.norm import ABN_EPS, PLAIN_BN_KEY

Tensors = dict[str, torch.Tensor]

_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def detect_layout(state_dict: Tensors) -> str | None:
    """'timm', 'authors' or None (not a TResNet state dict), from the stem conv's key."""
    if "body.conv1.conv.weight" in state_dict:
        return "timm"
    if "body.conv1.0.weight" in state_dict:
        return "authors"
    return None


def _is_extra_key(key: str) -> bool:
    # Buffers some writers add and our model recomputes or doesn't track.
    return key.endswith(".num_batches_tracked") or key.endswith(".filt")


def authors_to_ours(state_dict: Tensors) -> Tensors:
    """The authors' layout is ours: only drop `num_batches_tracked` and anti-alias filter buffers."""
    return {k: v for k, v in state_dict.items() if not _is_extra_key(k)}


def ours_to_authors(state_dict: Tensors) -> Tensors:
    """Our state dict as the authors' code would hold it (raw ABN weights, no markers).

    Layers with plain-BatchNorm semantics cannot be expressed as ABN weights; this raises ValueError for them.
    """
    plain = [k for k in state_dict if k.endswith("." + PLAIN_BN_KEY)]
    if plain:
        raise ValueError(f"{len(plain)} norm layers use plain BatchNorm scales (e.g. {plain[0]}); "
                         "the authors' ABN layout cannot represent them")
    return dict(state_dict)


def _aa_units(keys: set[str]) -> set[str]:
    """Prefixes (e.g. 'body.layer2.0.conv1') of the stride-2 conv units in a timm state dict.

    Stride 2 happens in block 0 of layers 2-4: in conv1 of a BasicBlock, in conv2 of a Bottleneck (which is the
    block type that has a conv3).
    """
    units = set()
    for layer in (2, 3, 4):
        block = f"body.layer{layer}.0"
        if f"{block}.conv3.conv.weight" in keys:
            units.add(f"{block}.conv2")
        elif f"{block}.conv1.conv.weight" in keys:
            units.add(f"{block}.conv1")
    return units


def _timm_key_to_ours(key: str, aa_units: set[str]) -> str:
    match = re.fullmatch(r"(.*?)\.(conv|bn)\.(.+)", key)
    if match is None:  # SE convs, head
        return key
    unit, part, rest = match.groups()
    index = "0" if part == "conv" else "1"
    if unit in aa_units:
        return f"{unit}.0.{index}.{rest}"
    return f"{unit}.{index}.{rest}"


def _our_key_to_timm(key: str) -> str:
    key = re.sub(r"\.(conv\d|downsample\.\d)\.0\.([01])\.", r".\1.\2.", key)  # stride-2 units are one level deeper
    return re.sub(r"\.(conv\d|downsample\.\d)\.([01])\.", lambda m: f".{m[1]}.{'conv' if m[2] == '0' else 'bn'}.",
                  key)


def _norm_prefixes(state_dict: Tensors, suffix: str) -> list[str]:
    return [k[: -len(".running_var")] for k in state_dict if k.endswith(".running_var") and suffix in k]


def timm_to_ours(state_dict: Tensors) -> Tensors:
    """timm's TResNet state dict -> ours (renamed keys, ABN weights or plain-BN markers)."""
    keys = set(state_dict)
    aa_units = _aa_units(keys)
    out: Tensors = {}
    for key, value in state_dict.items():
        if _is_extra_key(key):
            continue
        out[_timm_key_to_ours(key, aa_units)] = value
    for norm in _norm_prefixes(out, ""):
        weight = out[f"{norm}.weight"]
        if bool((weight >= ABN_EPS).all()):
            out[f"{norm}.weight"] = weight - ABN_EPS
        else:
            out[f"{norm}.{PLAIN_BN_KEY}"] = torch.ones((), dtype=weight.dtype)
    return out


def ours_to_timm(state_dict: Tensors) -> Tensors:
    """Our state dict -> one timm's `TResNet.load_state_dict` accepts (scales |w| + 1e-5, num_batches_tracked)."""
    plain = {k[: -len(PLAIN_BN_KEY) - 1] for k in state_dict if k.endswith("." + PLAIN_BN_KEY)}
    out: Tensors = {}
    for key, value in state_dict.items():
        if key.endswith("." + PLAIN_BN_KEY):
            continue
        norm = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and f"{norm}.running_var" in state_dict and norm not in plain:
            value = value.abs() + ABN_EPS
        out[_our_key_to_timm(key)] = value
        if key.endswith(".running_var"):
            out[_our_key_to_timm(f"{norm}.num_batches_tracked")] = torch.zeros((), dtype=torch.long)
    return out


def to_ours(state_dict: Tensors) -> Tensors:
    """Any known layout -> ours; ValueError when the keys are not a TResNet's."""
    layout = detect_layout(state_dict)
    if layout == "timm":
        return timm_to_ours(state_dict)
    if layout == "authors":
        return authors_to_ours(state_dict)
    raise ValueError("no TResNet stem conv key (body.conv1.0.weight or body.conv1.conv.weight)")


def guess_architecture(state_dict: Tensors) -> str | None:
    """Name of the TResNet variant whose shapes match this (our-layout) state dict, or None."""
    from tresfinetune.models.tresnet import ARCHITECTURES

    stem = state_dict.get("body.conv1.0.weight")
    if stem is None:
        return None
    blocks = []
    for layer in (1, 2, 3, 4):
        indices = {int(m[1]) for k in state_dict if (m := re.match(rf"body\.layer{layer}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck_first = "body.layer1.0.conv3.0.weight" in state_dict
    for name, arch in ARCHITECTURES.items():
        if (
            arch.base_width == stem.shape[0]
            and tuple(s.num_blocks for s in arch.stages) == tuple(blocks)
            and (arch.stages[0].block.expansion == 4) == bottleneck_first
        ):
            return name
    return None
