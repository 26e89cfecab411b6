"""fuse_for_inference: an eval-only copy of a TResNet with every norm folded into the convolution before it.

In eval mode a NormAct is a per-channel affine map, y = x * s + b with s = scale / sqrt(var + eps) and
b = bias - mean * s, so it can be folded into the preceding bias-free convolution: W' = W * s, bias' = b. What
is left of each conv-norm-act unit is one Conv2d with a bias and, where the unit has one, a leaky ReLU. The
anti-alias downsample becomes an ordinary depthwise Conv2d holding the fixed blur filter (reflect padding,
stride 2), so exporters see standard layers only. The result is for inference: it has no norm statistics left
to train.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tresfinetune.models.norm import NormAct
from tresfinetune.models.tresnet import AntiAliasDownsample, ConvNormAct


class ConvLeakyReLU(nn.Conv2d):
    """A Conv2d followed by an in-place leaky ReLU, as one module (one call instead of two per unit)."""

    def __init__(self, *args, slope: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slope = slope

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, leaky_relu({self.slope:g})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu_(super().forward(x), self.slope)


def fuse_conv_norm_act(unit: ConvNormAct) -> nn.Conv2d:
    """Conv2d + NormAct -> a Conv2d with bias, or a ConvLeakyReLU when the unit has an activation."""
    conv, norm = unit[0], unit[1]
    options = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
               "bias": True, "device": conv.weight.device, "dtype": conv.weight.dtype}
    if norm.slope is None:
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, **options)
    else:
        fused = ConvLeakyReLU(conv.in_channels, conv.out_channels, conv.kernel_size, slope=norm.slope, **options)
    weight, bias = unit.folded_weights()
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


def blur_downsample_conv(blur: AntiAliasDownsample) -> nn.Conv2d:
    """The anti-alias downsample as a fixed depthwise Conv2d: 3x3 blur, reflect padding 1, stride 2."""
    channels = blur.filter.shape[0]
    conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, padding_mode="reflect", groups=channels,
                     bias=False, device=blur.filter.device, dtype=blur.filter.dtype)
    with torch.no_grad():
        conv.weight.copy_(blur.filter)
    return conv


def _fuse_children(parent: nn.Module) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, ConvNormAct):
            child = fuse_conv_norm_act(child)
            setattr(parent, name, child)
        elif isinstance(child, AntiAliasDownsample):
            child = blur_downsample_conv(child)
            setattr(parent, name, child)
        else:
            _fuse_children(child)


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with norms folded into convs and the blur as a fixed conv.

    The original model is not changed. Outputs match the eval-mode original to float rounding.
    """
    fused = copy.deepcopy(model).eval()
    _fuse_children(fused)
    leftover = [name for name, m in fused.named_modules() if isinstance(m, NormAct | AntiAliasDownsample)]
    if leftover:
        raise ValueError(f"could not fuse {', '.join(leftover[:3])}: a norm that does not follow a convolution")
    fused.requires_grad_(False)
    fused.is_fused = True
    return fused
