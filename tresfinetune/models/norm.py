"""Batch norm + activation with InPlaceABN semantics, in two backends that share parameter names.

TResNet was trained with mapillary's InPlaceABN, whose per-channel scale is `|weight| + eps` (eps 1e-5), not
`weight` as in BatchNorm. `NormAct` reproduces that exactly:

    y = act((x - mean) / sqrt(var + eps) * (|weight| + eps) + bias)

with `act` a leaky ReLU (slope given) or the identity. Its state is `weight`, `bias`, `running_mean`,
`running_var` (no `num_batches_tracked`), the key layout of the authors' checkpoints.

Backends:
- "native" (default): plain PyTorch. In training it runs `NormActFunction`, which keeps only the *output* of
  norm+activation for backward. The output is usually also the next conv's saved input, so the layer adds no
  saved activation of its own. Backward inverts the activation and the affine map to recover what it needs
  (InPlaceABN's idea). That inversion needs a scale that is never zero, which ABN semantics guarantee.
- "inplace_abn": mapillary's compiled kernels, opt-in, used only when the package can be imported.

Under 16-bit autocast the output is stored rounded to bf16/fp16, and rebuilding x_hat = (y - bias) / scale
multiplies that rounding by |bias| / scale: with a large bias and a small scale (a zero-initialised residual norm
whose bias has moved) the gradients become noise. So, for 16-bit inputs, each channel whose |bias| / scale exceeds
`KEEP_INPUT_RATIO` keeps its input for backward, as plain BatchNorm does, and only the other channels are rebuilt
from the output: the gradient error stays within 1.5x of plain BatchNorm's own autocast error (measured in
tests/test_norm.py) while channels with a modest bias keep the memory saving. Float32 and float64 inputs rebuild
every channel (rounding there is 65,000 times finer). Which channels keep their input is read from the weights
without waiting for the GPU: each training forward measures it and the next one uses it (`_KeepInputPlan`), so a
plan lags one optimizer step; the threshold (0.5, where plain's own error is reached only at about 1.5) leaves
room for that step. Under torch.compile the layer runs as plain batch norm + activation and the compiler decides
what to save.

Weight gradient of |w|: like inplace_abn (functions.py: `dweight[weight < 0] *= -1`), d|w|/dw is taken as -1 for
w < 0 and +1 for w >= 0. Note w == 0 gets +1, not torch.sign's 0: the zero-initialised last norm of each residual
block (scale 1e-5) must receive gradient, or it would stay at zero for ever.

Activation checkpointing (models/checkpointing.py) runs a segment's forward twice: once without saving anything,
once in backward to rebuild what backward needs. `replayable_forward()` gives the two contexts for one segment:
in the first, each layer notes the `keep` it chose; in the recomputation it takes that same choice back (so the
saved tensors and the gradients are those of the first run, and the keep-input plan is not advanced) and leaves
the running statistics alone (they were updated once already).

Per-layer "plain BatchNorm" semantics: files written by timm after fine-tuning with plain BatchNorm can hold norm
weights that are negative or below 1e-5, which no ABN weight can express. Such a layer is switched to
`plain_bn = True`: scale = weight, computed with PyTorch's ordinary batch_norm autograd (which saves its input, so
those layers don't get the memory saving). The switch travels with the weights: `state_dict()` adds a marker key
`<layer>.plain_bn` (a 0-dim float tensor) for such layers only, and loading a state dict sets or clears the switch
from that key. Layers in ordinary files have no marker, so the authors' key layout is unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tresfinetune.errors import UserError

logger = logging.getLogger("tresfinetune")

ABN_EPS = 1e-5
PLAIN_BN_KEY = "plain_bn"
BACKENDS = ("native", "inplace_abn")


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _sign_of_abs_grad(weight: torch.Tensor) -> torch.Tensor:
    """d|w|/dw as inplace_abn takes it: -1 where w < 0, else +1 (w == 0 included)."""
    return torch.where(weight < 0, -1.0, 1.0).to(weight.dtype)


KEEP_INPUT_RATIO = 0.5
ALL_CHANNELS = "all"  # `keep` value: every channel keeps its input (no channel is rebuilt from the output)


class NormActFunction(torch.autograd.Function):
    """ABN forward that saves its output; backward recovers the normalised input from it.

    Inputs: x (N, C, H, W), weight (raw ABN weight), bias, running stats (updated in place in training),
    training flag, momentum, eps, slope (None for the identity activation), and `keep`: the channels whose input is
    saved and used instead of the output (None for none, a LongTensor of channel indices, or ALL_CHANNELS).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, slope, keep=None):
        scale = weight.abs() + eps
        if training:
            # One fused kernel: batch statistics, normalisation and the running-stat update (unbiased var).
            out, mean, invstd = torch.native_batch_norm(x, scale, bias, running_mean, running_var, True, momentum, eps)
        else:
            mean, invstd = running_mean.clone(), torch.rsqrt(running_var + eps)
            out = F.batch_norm(x, running_mean, running_var, scale, bias, False, 0.0, eps)
        if slope is not None:
            F.leaky_relu_(out, slope)
        if keep is None:
            kept_input, channels = None, None
        elif isinstance(keep, str):
            kept_input, channels = x, None
        else:
            kept_input, channels = x.index_select(1, keep), keep
        keep_all = isinstance(keep, str)
        # With every input kept, the output is needed only for the leaky ReLU's sign: an identity layer whose
        # output nobody else saves (the last norm of a block feeds an addition) would otherwise hold it for nothing.
        saved_out = None if keep_all and slope is None else out
        ctx.save_for_backward(saved_out, weight, bias, scale, mean, invstd, kept_input, channels)
        ctx.training, ctx.eps, ctx.slope, ctx.keep_all = training, eps, slope, keep_all
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, weight, bias, scale, mean, invstd, kept_input, channels = ctx.saved_tensors
        # The leaky ReLU's gradient follows from the output's sign.
        grad_y = grad_out if ctx.slope is None else torch.ops.aten.leaky_relu_backward(grad_out, out, ctx.slope, True)
        needs = ctx.needs_input_grad[:3]
        if ctx.keep_all:
            grads = _grads_from_input(grad_y, kept_input, scale, mean, invstd, ctx.training, ctx.eps, needs)
        else:
            y = out if ctx.slope is None else F.leaky_relu(out, 1.0 / ctx.slope)  # undo the activation
            grads = _grads_from_output(grad_y, y, scale, bias, invstd, ctx.training, ctx.eps, needs)
            if channels is not None:
                exact = _grads_from_input(grad_y.index_select(1, channels), kept_input, scale[channels],
                                          mean[channels], invstd[channels], ctx.training, ctx.eps, needs)
                for full, part, dim in zip(grads, exact, (1, 0, 0), strict=True):
                    if full is not None:
                        full.index_copy_(dim, channels, part.to(full.dtype))
        grad_x, grad_scale, grad_bias = grads
        grad_w = grad_scale * _sign_of_abs_grad(weight) if needs[1] else None
        return grad_x, grad_w, grad_bias, None, None, None, None, None, None, None


def _grads_from_output(grad_y, y, scale, bias, invstd, training, eps, needs):
    """(grad_x, grad_scale, grad_bias) of y = x_hat * scale + bias, with x_hat rebuilt from y."""
    need_x, need_w, need_b = needs
    if training:
        # x_hat = (y - bias) / scale. PyTorch's fused batch-norm backward computes x_hat = (input - save_mean) *
        # save_invstd and grad_x = (...) * save_invstd * weight: feed it input=y, save_mean=bias,
        # save_invstd=1/scale and weight=scale^2 * invstd to get the true grad_x.
        return torch.ops.aten.native_batch_norm_backward(
            grad_y, y, scale * scale * invstd, None, None, bias, scale.reciprocal(), True, eps, list(needs),
        )
    grad_x = grad_y * _per_channel(scale * invstd) if need_x else None
    grad_scale = ((y - _per_channel(bias)) * grad_y).sum((0, 2, 3)) / scale if need_w else None
    grad_bias = grad_y.sum((0, 2, 3)) if need_b else None
    return grad_x, grad_scale, grad_bias


def _grads_from_input(grad_y, x, scale, mean, invstd, training, eps, needs):
    """(grad_x, grad_scale, grad_bias) of y = (x - mean) * invstd * scale + bias, as plain batch norm computes them."""
    need_x, need_w, need_b = needs
    if training:
        return torch.ops.aten.native_batch_norm_backward(
            grad_y, x, scale, None, None, mean, invstd, True, eps, list(needs),
        )
    grad_x = grad_y * _per_channel(scale * invstd) if need_x else None
    grad_scale = (grad_y * (x - _per_channel(mean)) * _per_channel(invstd)).sum((0, 2, 3)) if need_w else None
    grad_bias = grad_y.sum((0, 2, 3)) if need_b else None
    return grad_x, grad_scale, grad_bias


class _KeepInputPlan:
    """Which channels of one layer keep their input for backward under 16-bit autocast, read without a host sync.

    `channels()` returns the plan measured at an earlier forward and starts measuring the current weights: on a GPU
    the channel mask comes back by a non-blocking copy, and the next forward adopts it once it has landed (it has
    by then: the training loop reads its loss once per step). Only the very first forward waits for its
    measurement. Indices are built on the device from the device mask, so no host-to-device copy is made.
    """

    def __init__(self) -> None:
        self.reset()

    # A copied or pickled layer (EMA, torch.save of a module) starts without a plan: a CUDA event does not copy.
    def __deepcopy__(self, memo: dict) -> _KeepInputPlan:
        return _KeepInputPlan()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.reset()

    def reset(self) -> None:
        self._keep: torch.Tensor | str | None = None
        self._adopted: np.ndarray | None = None  # host copy of the mask in use
        self._pending: tuple[torch.Tensor, torch.Tensor, object] | None = None  # (device mask, host mask, event)
        self._host_buffer: torch.Tensor | None = None

    def channels(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor | str | None:
        if self._pending is not None and self._pending[0].device != weight.device:
            self.reset()  # the layer moved to another device
        if self._pending is None:
            self._measure(weight, bias, eps)
        pending_event = self._pending[2]
        if self._adopted is None or pending_event is None or pending_event.query():
            self._adopt()
        self._measure(weight, bias, eps)
        return self._keep

    def _measure(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        with torch.no_grad():
            mask = bias.abs() > KEEP_INPUT_RATIO * (weight.abs() + eps)
        if mask.device.type != "cuda":
            self._pending = (mask, mask.cpu(), None)  # no copy on the CPU itself
            return
        if self._host_buffer is None:
            self._host_buffer = torch.empty(mask.shape, dtype=torch.bool, pin_memory=True)
        self._host_buffer.copy_(mask, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (mask, self._host_buffer, event)

    def _adopt(self) -> None:
        device_mask, host_mask, event = self._pending
        if event is not None:
            event.synchronize()  # returns at once unless this is the first forward
        mask = host_mask.numpy().copy()  # a host read: no tensor op, no sync
        if self._adopted is not None and np.array_equal(mask, self._adopted):
            return
        self._adopted = mask
        count = int(mask.sum())
        if count == 0:
            self._keep = None
        elif count == mask.size:
            self._keep = ALL_CHANNELS
        else:
            # The indices of the True entries, in order, computed on the device from its own copy of the mask.
            self._keep = torch.argsort((~device_mask).to(torch.uint8), stable=True)[:count]


class _SegmentRecord:
    """The `keep` choices of the NormAct layers of one checkpointed segment, in call order."""

    def __init__(self) -> None:
        self.keeps: list[torch.Tensor | str | None] = []
        self.replaying = False
        self.position = 0

    def replay_next(self) -> torch.Tensor | str | None:
        keep = self.keeps[self.position]
        self.position += 1
        return keep


# The segment whose forward (or recomputation) is running on this thread. Recomputation runs inside backward, on
# the autograd engine's thread for the device, which enters its own context there.
_segment = threading.local()


def _active_segment() -> _SegmentRecord | None:
    return getattr(_segment, "record", None)


@contextlib.contextmanager
def _segment_context(record: _SegmentRecord, replaying: bool) -> Iterator[None]:
    previous = _active_segment()
    _segment.record = record
    record.replaying, record.position = replaying, 0
    try:
        yield
    finally:
        _segment.record = previous


def replayable_forward() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward context, recomputation context) for one checkpointed segment: torch.utils.checkpoint's context_fn."""
    record = _SegmentRecord()
    return _segment_context(record, replaying=False), _segment_context(record, replaying=True)


def _batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, H, W), in float32 whatever x's dtype."""
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, 0.0)  # fp32 accumulation, no fp32 copy of x
        return mean, invstd.pow(-2)
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    return mean, var


class SyncNormActFunction(torch.autograd.Function):
    """NormAct in training with batch statistics over all processes of a torch.distributed group.

    Each process all-reduces (count, count * mean, count * (var + mean^2)) per channel, C-sized and in float64;
    backward all-reduces sum(dy) and sum(dy * x_hat), as PyTorch's SyncBatchNorm does. Nothing is read back to
    the host. Saves its input (no output-inversion trick here, so 16-bit inputs lose nothing to rounding), which
    also covers plain-BatchNorm layers. `plain` selects scale = weight instead of |weight| + eps.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, slope, plain, group):
        import torch.distributed as dist

        scale = weight if plain else weight.abs() + eps
        channels = x.shape[1]
        local_mean, local_var = (t.double() for t in _batch_mean_var(x))
        count = local_mean.new_full((1,), x.numel() // channels)  # a fill on the device, not a host copy
        stats = torch.cat([count, local_mean * count, (local_var + local_mean * local_mean) * count])
        dist.all_reduce(stats, group=group)
        total = stats[:1]
        mean = stats[1:1 + channels] / total
        var = (stats[1 + channels:] / total - mean * mean).clamp_min(0)
        if running_mean is not None:  # None: a checkpoint recomputation, which must not update them again
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype), alpha=momentum)
        # Statistics in the weights' dtype: cuDNN wants one dtype for weight, bias, mean and var.
        mean, var = mean.to(scale.dtype), var.to(scale.dtype)
        invstd = torch.rsqrt(var + eps)
        out = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        if slope is not None:
            F.leaky_relu_(out, slope)
        ctx.save_for_backward(x, weight, bias, scale, mean, invstd, total.to(scale.dtype))
        ctx.slope, ctx.plain, ctx.group = slope, plain, group
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        import torch.distributed as dist

        x, weight, bias, scale, mean, invstd, total = ctx.saved_tensors
        x_hat = (x - _per_channel(mean)) * _per_channel(invstd)
        if ctx.slope is None:
            grad_y = grad_out
        else:
            pre_activation = x_hat * _per_channel(scale) + _per_channel(bias)
            grad_y = torch.where(pre_activation > 0, grad_out, grad_out * ctx.slope)
        sum_dy = grad_y.sum((0, 2, 3), dtype=scale.dtype)
        sum_dy_xhat = (grad_y * x_hat).sum((0, 2, 3), dtype=scale.dtype)
        reduced = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(reduced, group=ctx.group)
        mean_dy, mean_dy_xhat = (reduced / total).chunk(2)
        grad_x = (grad_y - _per_channel(mean_dy) - x_hat * _per_channel(mean_dy_xhat)) * _per_channel(scale * invstd)
        grad_w = sum_dy_xhat if ctx.plain else sum_dy_xhat * _sign_of_abs_grad(weight)
        return grad_x.to(x.dtype), grad_w, sum_dy, None, None, None, None, None, None, None


def _load_inplace_abn():
    try:
        return importlib.import_module("inplace_abn.functions")
    except ImportError as e:
        raise UserError(
            f"norm 'inplace_abn' needs the inplace_abn package, which cannot be imported ({e}); install it "
            "(pip install inplace-abn, built from source against your torch) or use norm='native'"
        ) from None


class NormAct(nn.Module):
    """Batch norm with InPlaceABN scale (|weight| + eps) followed by leaky ReLU or nothing.

    `slope=None` means no activation (the last conv of a block, shortcut convs).
    """

    def __init__(
        self,
        num_features: int,
        slope: float | None = None,
        eps: float = ABN_EPS,
        momentum: float = 0.1,
        backend: str = "native",
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.slope = slope
        self.eps = eps
        self.momentum = momentum
        self.plain_bn = False
        self.sync_group = None  # set by convert_sync_norm: a torch.distributed group to share statistics with
        self._keep_input_plan = _KeepInputPlan()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise UserError(f"unknown norm backend {backend!r}; use one of: {', '.join(BACKENDS)}")
        self._inplace_abn = _load_inplace_abn() if backend == "inplace_abn" else None
        self.backend = backend

    def extra_repr(self) -> str:
        act = "identity" if self.slope is None else f"leaky_relu({self.slope:g})"
        semantics = "plain BatchNorm scale" if self.plain_bn else "ABN scale |w|+eps"
        return f"{self.num_features}, {act}, {semantics}, eps={self.eps:g}, backend={self.backend}"

    def effective_scale(self) -> torch.Tensor:
        """The per-channel multiplier applied to the normalised input."""
        return self.weight if self.plain_bn else self.weight.abs() + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() // x.shape[1] <= 1:
            raise ValueError(f"batch norm in training mode needs more than 1 value per channel, got {list(x.shape)}")
        segment = _active_segment()
        replaying = segment is not None and segment.replaying
        # A checkpoint recomputation normalises with the same batch statistics but must not count them again.
        counted = replaying and self.training
        running_mean, running_var = (None, None) if counted else (self.running_mean, self.running_var)
        if self.training and self.sync_group is not None and _world_size(self.sync_group) > 1:
            return SyncNormActFunction.apply(
                x, self.weight, self.bias, running_mean, running_var, self.momentum, self.eps,
                self.slope, self.plain_bn, self.sync_group,
            )
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.plain_bn or not needs_grad or torch.compiler.is_compiling():
            out = F.batch_norm(
                x, running_mean, running_var, self.effective_scale(), self.bias, self.training, self.momentum,
                self.eps,
            )
            return out if self.slope is None else F.leaky_relu_(out, self.slope)
        if self._inplace_abn is not None:
            activation = "identity" if self.slope is None else "leaky_relu"
            return self._inplace_abn.inplace_abn(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.training,
                self.momentum, self.eps, activation, 0.0 if self.slope is None else self.slope,
            )
        if replaying:
            keep = segment.replay_next()  # the first run's choice: same saved tensors, same gradients
        else:
            keep = None
            if x.dtype in (torch.float16, torch.bfloat16):
                keep = self._keep_input_plan.channels(self.weight, self.bias, self.eps)
            if segment is not None:
                segment.keeps.append(keep)
        return NormActFunction.apply(
            x, self.weight, self.bias, running_mean, running_var,
            self.training, self.momentum, self.eps, self.slope, keep,
        )

    # The plain-BatchNorm switch is stored as a marker key next to the weights, only where it is on.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.plain_bn:
            destination[prefix + PLAIN_BN_KEY] = torch.ones((), device=self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.plain_bn = state_dict.pop(prefix + PLAIN_BN_KEY, None) is not None
        self._keep_input_plan.reset()  # measured on the old weights
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def convert_sync_norm(model: nn.Module, process_group=None) -> nn.Module:
    """Make every NormAct of `model` compute training statistics over all processes (torch.distributed).

    In place; returns the model. `process_group` None means the default (world) group. Outside a distributed
    run (or with one process) the layers behave as before.
    """
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    for module in model.modules():
        if isinstance(module, NormAct):
            module.sync_group = group
    return model


def reference_norm_act(
    x: torch.Tensor, layer: NormAct, training: bool | None = None
) -> torch.Tensor:
    """Plain BatchNorm(|w|+eps) + LeakyReLU through PyTorch's own autograd, for tests and comparisons.

    Does not touch the layer's running statistics.
    """
    training = layer.training if training is None else training
    out = F.batch_norm(
        x, layer.running_mean.clone(), layer.running_var.clone(), layer.effective_scale(), layer.bias,
        training, layer.momentum, layer.eps,
    )
    return out if layer.slope is None else F.leaky_relu(out, layer.slope)
