"""The TResNet family (Ridnik et al. 2020): TResNet-M, -L, -XL, TResNet-L V2 and ML_Decoder's V2 XL.

Reads top to bottom: stem pieces, the conv-norm-act unit, squeeze-excite, the two residual blocks, then the
network assembled from a table of stage settings (`ARCHITECTURES`) and one of two heads: global pooling + fc
(`head.fc`) or ML-Decoder (`head.decoder.*`, see ml_decoder.py). Module names and nesting follow the authors'
checkpoints (`body.conv1.0.weight`, `body.layer2.0.conv1.0.1.running_var`, `head.fc.bias`, ...), so their files
load as they are. Pretrained weights and their loading live elsewhere (`pretrained.py`, `loading.py`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tresfinetune.errors import UserError
from tresfinetune.models.checkpointing import body_segments, checkpointed_forward
from tresfinetune.models.ml_decoder import DEFAULT_EMBEDDING, MLDecoderHead
from tresfinetune.models.norm import NormAct

STEM_SLOPE = 1e-2
BLOCK_SLOPE = 1e-3
V2_AUTHORS_SLOPE = 1e-6  # the authors' V2 code forces this slope in every conv-ABN, stem included


class SpaceToDepth(nn.Module):
    """(N, C, H, W) -> (N, 16C, H/4, W/4); channel index = (row offset * 4 + column offset) * C + c.

    The single copy writes the result in channels-last memory order, which the rest of the network keeps:
    PyTorch's CPU convolutions run faster on it (about 10-15% for this network).
    """

    block_size = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.block_size
        x = x.reshape(n, c, h // b, b, w // b, b).permute(0, 2, 4, 3, 5, 1)  # (N, H/4, W/4, 4, 4, C)
        return x.reshape(n, h // b, w // b, b * b * c).permute(0, 3, 1, 2)


def blur_filter(channels: int) -> torch.Tensor:
    """The fixed anti-alias filter outer([1, 2, 1], [1, 2, 1]) / 16, one per channel (depthwise), float32."""
    taps = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3).contiguous()


def reflect_pad_1(x: torch.Tensor) -> torch.Tensor:
    """F.pad(x, (1, 1, 1, 1), mode="reflect") built from slices and concatenation.

    Its backward is slicing and adding, deterministic on every device (CUDA's reflection-pad backward is not, so
    `deterministic: true` could not train), and the result keeps x's memory format (CUDA's reflection pad makes a
    contiguous copy, which would flip a channels-last network's layout at every downsampling).
    """
    x = torch.cat([x[:, :, 1:2], x, x[:, :, -2:-1]], dim=2)
    return torch.cat([x[:, :, :, 1:2], x, x[:, :, :, -2:-1]], dim=3)


class AntiAliasDownsample(nn.Module):
    """Blur then subsample by 2: reflect pad 1 and a fixed 3x3 depthwise filter at stride 2.

    The filter is a non-persistent buffer: it moves with the model, and stays out of the state dict (as in the
    authors' files).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filter", blur_filter(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.filter if self.filter.dtype == x.dtype else self.filter.to(x.dtype)
        return F.conv2d(reflect_pad_1(x), weight, stride=2, groups=x.shape[1])


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias, 'same' padding) then NormAct: keys `<name>.0.weight` and `<name>.1.*`.

    In inference (eval mode, autograd off) it runs as one conv with the norm folded into its weights and bias,
    kept in channels-last order and cached until one of the underlying tensors changes (any in-place update
    bumps a tensor's version). Switching to train mode drops the cache.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, slope: float | None) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            NormAct(out_channels, slope=slope),
        )
        self._folded: tuple | None = None

    def train(self, mode: bool = True) -> ConvNormAct:
        self._folded = None
        return super().train(mode)

    @torch.no_grad()
    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of a single conv equal to this conv followed by the eval-mode norm (no activation).

        Computed in float64: the scale can span many orders of magnitude (|w| + 1e-5 on zero-initialised norms).
        """
        conv, norm = self[0], self[1]
        scale = norm.effective_scale().double() * torch.rsqrt(norm.running_var.double() + norm.eps)
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = norm.bias.double() - norm.running_mean.double() * scale
        return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The cache keys on storage addresses, which torch.compile cannot trace without recompiling each call.
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self[1](self[0](x))
        conv, norm = self[0], self[1]
        tensors = (conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        key = (norm.plain_bn, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        if self._folded is None or self._folded[0] != key:
            weight, bias = self.folded_weights()
            self._folded = (key, weight.contiguous(memory_format=torch.channels_last), bias)
        out = F.conv2d(x, self._folded[1], self._folded[2], padding=conv.padding)
        return out if norm.slope is None else F.leaky_relu_(out, norm.slope)


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, slope: float | None,
                  stride: int = 1) -> nn.Module:
    """A conv-ABN unit; stride 2 runs the conv at stride 1 and then the anti-alias downsample."""
    unit = ConvNormAct(in_channels, out_channels, kernel_size, slope)
    return nn.Sequential(unit, AntiAliasDownsample(out_channels)) if stride == 2 else unit


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1)
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)), inplace=True))
        return x * gate.sigmoid()


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Identity (None) when shapes agree; else [AvgPool2d(2) when stride 2] then a 1x1 conv-ABN, no activation."""
    if stride == 1 and in_channels == out_channels:
        return None
    layers: list[nn.Module] = []
    if stride == 2:
        layers.append(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False))
    layers.append(ConvNormAct(in_channels, out_channels, 1, slope=None))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """3x3 conv-ABN (leaky) -> 3x3 conv-ABN (identity) -> SE -> + shortcut -> ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, use_se: bool, slope: float) -> None:
        super().__init__()
        self.conv1 = conv_norm_act(in_channels, planes, 3, slope, stride)
        self.conv2 = ConvNormAct(planes, planes, 3, slope=None)
        self.se = SqueezeExcite(planes, max(planes // 4, 64)) if use_se else None
        self.downsample = shortcut(in_channels, planes, stride)

    def last_norm(self) -> NormAct:
        return self.conv2[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return F.relu_(out + identity)  # not in place: `out` may be a tensor saved for backward


class Bottleneck(nn.Module):
    """1x1 conv-ABN -> 3x3 conv-ABN -> SE (on `planes` channels) -> 1x1 conv-ABN to 4x -> + shortcut -> ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, use_se: bool, slope: float) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = ConvNormAct(in_channels, planes, 1, slope)
        self.conv2 = conv_norm_act(planes, planes, 3, slope, stride)
        self.se = SqueezeExcite(planes, max(out_channels // 8, 64)) if use_se else None
        self.conv3 = ConvNormAct(planes, out_channels, 1, slope=None)
        self.downsample = shortcut(in_channels, out_channels, stride)

    def last_norm(self) -> NormAct:
        return self.conv3[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        out = self.conv3(out)
        return F.relu_(out + identity)  # not in place: `out` may be a tensor saved for backward


@dataclass(frozen=True)
class StageSettings:
    block: type[BasicBlock] | type[Bottleneck]
    num_blocks: int
    width_multiplier: int  # planes = base width * this
    stride: int
    use_se: bool


@dataclass(frozen=True)
class Architecture:
    base_width: int
    stages: tuple[StageSettings, ...]
    # Leaky slopes (stem, blocks) of the authors' code; V2 differs from timm's port here (see create_model).
    authors_slopes: tuple[float, float] = (STEM_SLOPE, BLOCK_SLOPE)


def _v1_stages(blocks: tuple[int, int, int, int]) -> tuple[StageSettings, ...]:
    return (
        StageSettings(BasicBlock, blocks[0], 1, 1, True),
        StageSettings(BasicBlock, blocks[1], 2, 2, True),
        StageSettings(Bottleneck, blocks[2], 4, 2, True),
        StageSettings(Bottleneck, blocks[3], 8, 2, False),
    )


def _v2_stages(blocks: tuple[int, int, int, int]) -> tuple[StageSettings, ...]:
    return (
        StageSettings(Bottleneck, blocks[0], 1, 1, True),
        StageSettings(Bottleneck, blocks[1], 2, 2, True),
        StageSettings(Bottleneck, blocks[2], 4, 2, True),
        StageSettings(Bottleneck, blocks[3], 8, 2, False),
    )


ARCHITECTURES: dict[str, Architecture] = {
    "tresnet_m": Architecture(64, _v1_stages((3, 4, 11, 3))),
    "tresnet_l": Architecture(int(64 * 1.2), _v1_stages((4, 5, 18, 3))),
    "tresnet_xl": Architecture(int(64 * 1.3), _v1_stages((4, 5, 24, 3))),
    "tresnet_v2_l": Architecture(64, _v2_stages((3, 4, 23, 3)), (V2_AUTHORS_SLOPE, V2_AUTHORS_SLOPE)),
    # Only in the ML_Decoder code (as its "tresnet_xl"), which uses the ordinary slopes.
    "tresnet_v2_xl": Architecture(64, _v2_stages((3, 8, 34, 5))),
}

HEADS = ("fc", "ml_decoder")
# inplace_abn's kernels overwrite their input and update the running statistics in every call, recomputation
# included.
_CHECKPOINTING_NEEDS_NATIVE = "grad_checkpointing works with norm 'native' only; set model.norm: native"


class ClassifierHead(nn.Module):
    """Global average pool then a linear classifier (`head.fc`)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean((2, 3)))


def _init_classifier(fc: nn.Linear) -> None:
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)


def make_head(kind: str, num_features: int, num_classes: int, groups: int | None = None,
              embedding: int = DEFAULT_EMBEDDING) -> nn.Module:
    """A head: 'fc' (pool + linear; see init_head) or 'ml_decoder' (groups / embedding apply to it only)."""
    if kind == "ml_decoder":
        return MLDecoderHead(num_features, num_classes, groups, embedding)
    return ClassifierHead(num_features, num_classes)


def init_head(head: nn.Module) -> None:
    """TResNet's init for the fc head; ML-Decoder initialises itself as the reference does."""
    if isinstance(head, ClassifierHead):
        _init_classifier(head.fc)


class TResNet(nn.Module):
    """TResNet: `body` (space-to-depth stem, conv1, layer1-4) and `head` (pool + `head.fc`, or ML-Decoder).

    head_groups (None: the reference's rule) and head_embedding apply to head='ml_decoder' only.
    """

    def __init__(self, arch: Architecture, num_classes: int = 1000,
                 slopes: tuple[float, float] | None = None, model_name: str = "", head: str = "fc",
                 head_groups: int | None = None, head_embedding: int = DEFAULT_EMBEDDING) -> None:
        super().__init__()
        self.model_name = model_name
        self.head_kind = head
        self.head_options = {"groups": head_groups, "embedding": head_embedding}
        self.slopes = slopes or arch.authors_slopes
        stem_slope, block_slope = self.slopes
        width = arch.base_width
        stages: list[tuple[str, nn.Module]] = []
        in_channels = width
        for index, stage in enumerate(arch.stages, start=1):
            planes = width * stage.width_multiplier
            blocks = []
            for block_index in range(stage.num_blocks):
                stride = stage.stride if block_index == 0 else 1
                blocks.append(stage.block(in_channels, planes, stride, stage.use_se, block_slope))
                in_channels = planes * stage.block.expansion
            stages.append((f"layer{index}", nn.Sequential(*blocks)))

        self.body = nn.Sequential(OrderedDict([
            ("s2d", SpaceToDepth()),
            ("conv1", ConvNormAct(3 * 16, width, 3, stem_slope)),
            *stages,
        ]))
        self.num_features = in_channels
        self.num_classes = num_classes
        self.head = make_head(head, self.num_features, num_classes, head_groups, head_embedding)
        self.pretrained_cfg: dict = {}
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, NormAct):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each residual branch starts near zero (ABN scale 1e-5), so every block starts close to identity.
        for module in self.modules():
            if isinstance(module, BasicBlock | Bottleneck):
                nn.init.zeros_(module.last_norm().weight)
        init_head(self.head)

    def norm_layers(self) -> list[NormAct]:
        return [m for m in self.modules() if isinstance(m, NormAct)]

    def set_norm_backend(self, backend: str) -> None:
        if backend != "native" and self.grad_checkpointing:
            raise UserError(_CHECKPOINTING_NEEDS_NATIVE)
        for layer in self.norm_layers():
            layer.set_backend(backend)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the body's activations in backward instead of keeping them (timm's name for the switch)."""
        if enable and any(layer.backend != "native" for layer in self.norm_layers()):
            raise UserError(_CHECKPOINTING_NEEDS_NATIVE)
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one of the same kind for `num_classes` classes."""
        like = next(self.head.parameters())
        self.head = make_head(self.head_kind, self.num_features, num_classes, **self.head_options).to(like)
        init_head(self.head)
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed_forward(body_segments(self.body), x)
        return self.body(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_gflops(name: str, resolution: int = 224) -> float:
    """Multiply-adds of one image through the network, in units of 1e9 (the paper's "FLOPs").

    Counted with torch.utils.flop_counter on the meta device (no memory, no compute); that counter reports
    2 FLOPs per multiply-add, hence the halving.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = TResNet(ARCHITECTURES[name]).eval()
        x = torch.empty(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9

