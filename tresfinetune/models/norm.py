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

Weight gradient of |w|: like inplace_abn (functions.py: `dweight[weight < 0] *= -1`), d|w|/dw is taken as -1 for
w < 0 and +1 for w >= 0. Note w == 0 gets +1, not torch.sign's 0: the zero-initialised last norm of each residual
block (scale 1e-5) must receive gradient, or it would stay at zero for ever.

Per-layer "plain BatchNorm" semantics: files written by timm after fine-tuning with plain BatchNorm can hold norm
weights that are negative or below 1e-5, which no ABN weight can express. Such a layer is switched to
`plain_bn = True`: scale = weight, computed with PyTorch's ordinary batch_norm autograd (which saves its input, so
those layers don't get the memory saving). The switch travels with the weights: `state_dict()` adds a marker key
`<layer>.plain_bn` (a 0-dim float tensor) for such layers only, and loading a state dict sets or clears the switch
from that key. Layers in ordinary files have no marker, so the authors' key layout is unchanged.
"""

from __future__ import annotations

import importlib
import logging

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


class NormActFunction(torch.autograd.Function):
    """ABN forward that saves its output; backward recovers the normalised input from it.

    Inputs: x (N, C, H, W), weight (raw ABN weight), bias, running stats (updated in place in training),
    training flag, momentum, eps, slope (None for the identity activation).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, slope):
        scale = weight.abs() + eps
        if training:
            # One fused kernel: batch statistics, normalisation and the running-stat update (unbiased var).
            out, _, invstd = torch.native_batch_norm(x, scale, bias, running_mean, running_var, True, momentum, eps)
        else:
            invstd = torch.rsqrt(running_var + eps)
            out = F.batch_norm(x, running_mean, running_var, scale, bias, False, 0.0, eps)
        if slope is not None:
            F.leaky_relu_(out, slope)
        ctx.save_for_backward(out, weight, bias, scale, invstd)
        ctx.training, ctx.eps, ctx.slope = training, eps, slope
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, weight, bias, scale, invstd = ctx.saved_tensors
        if ctx.slope is None:
            grad_y, y = grad_out, out
        else:
            # Undo the leaky ReLU: its gradient and its inverse both follow from the output's sign.
            grad_y = torch.ops.aten.leaky_relu_backward(grad_out, out, ctx.slope, True)
            y = F.leaky_relu(out, 1.0 / ctx.slope)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.training:
            # y = x_hat * scale + bias, so x_hat = (y - bias) / scale. PyTorch's fused batch-norm backward computes
            # x_hat = (input - save_mean) * save_invstd and grad_x = (...) * save_invstd * weight: feed it
            # input=y, save_mean=bias, save_invstd=1/scale and weight=scale^2 * invstd to get the true grad_x.
            grad_x, grad_scale, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_y, y, scale * scale * invstd, None, None, bias, scale.reciprocal(), True, ctx.eps,
                [need_x, need_w, need_b],
            )
        else:
            grad_x = grad_y * _per_channel(scale * invstd) if need_x else None
            grad_scale = ((y - _per_channel(bias)) * grad_y).sum((0, 2, 3)) / scale if need_w else None
            grad_bias = grad_y.sum((0, 2, 3)) if need_b else None
        grad_w = grad_scale * _sign_of_abs_grad(weight) if need_w else None
        return grad_x, grad_w, grad_bias, None, None, None, None, None, None


class SyncNormActFunction(torch.autograd.Function):
    """NormAct in training with batch statistics over all processes of a torch.distributed group.

    Each process reduces (count, sum, sum of squares) in float64; backward all-reduces sum(dy) and
    sum(dy * x_hat), as PyTorch's SyncBatchNorm does. Saves its input (no output-inversion trick here), which
    also covers plain-BatchNorm layers. `plain` selects scale = weight instead of |weight| + eps.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, slope, plain, group):
        import torch.distributed as dist

        scale = weight if plain else weight.abs() + eps
        local = x.detach().double()
        count = torch.tensor([local.numel() // local.shape[1]], dtype=torch.float64, device=x.device)
        stats = torch.cat([count, local.sum((0, 2, 3)), (local * local).sum((0, 2, 3))])
        dist.all_reduce(stats, group=group)
        total, channels = stats[0], x.shape[1]
        mean = stats[1:1 + channels] / total
        var = (stats[1 + channels:] / total - mean * mean).clamp_min(0)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype), alpha=momentum)
        mean, invstd = mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)
        out = F.batch_norm(x, mean, (var.to(x.dtype)), scale, bias, False, 0.0, eps)
        if slope is not None:
            F.leaky_relu_(out, slope)
        ctx.save_for_backward(x, weight, bias, scale, mean, invstd)
        ctx.total, ctx.slope, ctx.plain, ctx.group = float(total), slope, plain, group
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        import torch.distributed as dist

        x, weight, bias, scale, mean, invstd = ctx.saved_tensors
        x_hat = (x - _per_channel(mean)) * _per_channel(invstd)
        if ctx.slope is None:
            grad_y = grad_out
        else:
            pre_activation = x_hat * _per_channel(scale) + _per_channel(bias)
            grad_y = torch.where(pre_activation > 0, grad_out, grad_out * ctx.slope)
        sum_dy = grad_y.sum((0, 2, 3))
        sum_dy_xhat = (grad_y * x_hat).sum((0, 2, 3))
        reduced = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(reduced, group=ctx.group)
        mean_dy, mean_dy_xhat = (reduced / ctx.total).chunk(2)
        grad_x = (grad_y - _per_channel(mean_dy) - x_hat * _per_channel(mean_dy_xhat)) * _per_channel(scale * invstd)
        grad_w = sum_dy_xhat if ctx.plain else sum_dy_xhat * _sign_of_abs_grad(weight)
        return grad_x, grad_w, sum_dy, None, None, None, None, None, None, None


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
        if self.training and self.sync_group is not None and _world_size(self.sync_group) > 1:
            return SyncNormActFunction.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum, self.eps,
                self.slope, self.plain_bn, self.sync_group,
            )
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.plain_bn or not needs_grad:
            out = F.batch_norm(
                x, self.running_mean, self.running_var, self.effective_scale(), self.bias,
                self.training, self.momentum, self.eps,
            )
            return out if self.slope is None else F.leaky_relu_(out, self.slope)
        if self._inplace_abn is not None:
            activation = "identity" if self.slope is None else "leaky_relu"
            return self._inplace_abn.inplace_abn(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.training,
                self.momentum, self.eps, activation, 0.0 if self.slope is None else self.slope,
            )
        return NormActFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var,
            self.training, self.momentum, self.eps, self.slope,
        )

    # The plain-BatchNorm switch is stored as a marker key next to the weights, only where it is on.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.plain_bn:
            destination[prefix + PLAIN_BN_KEY] = torch.ones((), device=self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.plain_bn = state_dict.pop(prefix + PLAIN_BN_KEY, None) is not None
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
