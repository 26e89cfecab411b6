"""Optimizer, learning-rate schedule, weight EMA and mixup/cutmix, each built from the recipe."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from tresfinetune.recipe import MixupConfig, Recipe
from tresfinetune.runtime import unwrap_model


def parameter_groups(model: nn.Module, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """Split parameters so norm weights and biases (1-D) get no weight decay, and the head may get its own lr.

    Each group carries `lr_mult`; the scheduler multiplies the base lr by it.
    """
    head_ids = {id(p) for p in _head(model).parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        key = (id(param) in head_ids, param.ndim <= 1)
        groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_mult": head_lr_mult if is_head else 1.0,
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def _head(model: nn.Module) -> nn.Module:
    return unwrap_model(model).head


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    cfg = recipe.optimizer
    groups = parameter_groups(model, cfg.weight_decay, cfg.head_lr_mult)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mult"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    betas = tuple(cfg.betas)
    if cfg.name == "adam":
        # Adam's weight decay is L2 in the gradient, as in the ASL reference recipe.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


MIN_ONECYCLE_STEPS = 4  # a rise and a fall of two steps each


def build_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-optimizer-step schedule; `schedule.epochs` may be longer than the run (cut short on purpose)."""
    cfg = recipe.schedule
    total_steps = max(1, (cfg.epochs or recipe.epochs) * steps_per_epoch)
    if cfg.name == "onecycle" and total_steps < MIN_ONECYCLE_STEPS:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # no cycle in so few steps
    if cfg.name == "onecycle":
        # PyTorch's OneCycleLR divides by zero when a phase is a single step: each phase gets two at least.
        pct_start = min(max(cfg.pct_start, 2 / total_steps), 1 - 2 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=pct_start,
            cycle_momentum=recipe.optimizer.name == "sgd",
        )
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    factor = cfg.warmup_start_factor
    min_ratio = cfg.min_lr_ratio
    cosine = cfg.name == "cosine"

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return factor + (1.0 - factor) * step / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


class ModelEma(nn.Module):
    """Exponential moving average of a model's weights (buffers are copied, not averaged).

    The decay ramps up as (1 + n) / (10 + n) over the first updates so that short runs get a useful average.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        ema_params = list(self.module.parameters())
        model_params = list(model.parameters())
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)


class Mixup:
    """Mixup / CutMix on a batch of images with class-index targets; returns mixed one-hot (N, C) targets.

    Label smoothing is left to the loss, which applies it to soft targets too.
    """

    def __init__(self, cfg: MixupConfig, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes

    @property
    def enabled(self) -> bool:
        return self.cfg.mixup_alpha > 0 or self.cfg.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = torch.nn.functional.one_hot(targets, self.num_classes).float()
        if torch.rand(()) >= self.cfg.prob:
            return images, soft
        use_cutmix = self.cfg.cutmix_alpha > 0 and (
            self.cfg.mixup_alpha <= 0 or torch.rand(()) < self.cfg.switch_prob
        )
        alpha = self.cfg.cutmix_alpha if use_cutmix else self.cfg.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        images = images.clone()
        flipped = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            images.mul_(lam).add_(flipped, alpha=1 - lam)
        return images, soft * lam + soft.flip(0) * (1 - lam)
