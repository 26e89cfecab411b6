"""Training losses chosen by the recipe: cross-entropy, BCE and the ASL paper's two asymmetric losses.

The asymmetric losses follow the ASL paper (arXiv 2009.14119) and give the same values as the authors'
reference code. Every loss takes logits; targets are class indices or (N, C) soft/one-hot rows for
single-label tasks and (N, C) multi-hot rows for multi-label tasks. `PartialLabelLoss` wraps ASL or BCE for
multi-label targets that also hold -1 (unknown), treating unknowns as negative, ignoring them, or the
class-aware selective way of the PartialLabelingCSL paper (SPEC.md section 10).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tresfinetune.errors import UserError

TASKS = ("single-label", "multi-label")  # the project's task names; underscores are accepted too
REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise UserError(f"Loss reduction must be one of {', '.join(REDUCTIONS)}, not {reduction!r}.")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise UserError(f"Loss option {name} must be >= 0, got {value}.")


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise UserError(f"Loss option {name} must be in [0, 1), got {value}.")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 logits (AMP) are upcast: eps=1e-8 underflows to 0 in half precision and log(0) = -inf.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _focusing_weight(base: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """base ** gamma. pow's gradient at base 0 is infinite for 0 < gamma < 1 and turns into NaN; clamping at
    the smallest normal float keeps the values (to ~1e-19, where log p is 0 anyway) and gives a zero gradient."""
    return torch.pow(base.clamp(min=torch.finfo(base.dtype).tiny), gamma)


def _target_distribution(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) float targets from class indices (N,) or from soft/one-hot rows (N, C)."""
    if targets.dim() == 1 and not targets.is_floating_point():
        if targets.shape[0] != logits.shape[0]:
            raise UserError(f"Got {targets.shape[0]} labels for a batch of {logits.shape[0]} predictions.")
        return F.one_hot(targets.long(), num_classes=logits.shape[-1]).to(logits.dtype)
    if targets.shape != logits.shape:
        raise UserError(
            f"Targets of shape {tuple(targets.shape)} do not match predictions of shape "
            f"{tuple(logits.shape)}; use class indices (N,) or one row of C target values per sample."
        )
    return targets.to(logits.dtype)


class AsymmetricLoss(nn.Module):
    """ASL for multi-label classification: sigmoid per class, asymmetric focusing and probability shifting.

    With p = sigmoid(logit) and p_neg = min(1, 1 - p + clip) (just 1 - p when clip is 0), each entry costs
    -y * (1 - p)**gamma_pos * log(p) - (1 - y) * (1 - p_neg)**gamma_neg * log(p_neg), both probabilities
    clamped below at eps inside the log. The reference sums over batch and classes ("sum", the default, which
    the paper's learning rates were tuned for); "mean" averages over all N * C entries; "none" keeps (N, C).

    disable_torch_grad_focal_loss computes the focusing weights without gradient, as the authors' training
    script does; the default (False) differentiates through them like the formula does.
    """

    def __init__(
        self,
        gamma_neg: float = 4,
        gamma_pos: float = 1,
        clip: float = 0.05,
        eps: float = 1e-8,
        disable_torch_grad_focal_loss: bool = False,
        reduction: str = "sum",
    ) -> None:
        super().__init__()
        _check_non_negative("gamma_neg", gamma_neg)
        _check_non_negative("gamma_pos", gamma_pos)
        _check_fraction("clip", clip or 0.0)
        if not 0 < eps < 1:
            raise UserError(f"Loss option eps must be in (0, 1), got {eps}.")
        _check_reduction(reduction)
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip or 0.0
        self.eps = eps
        self.disable_torch_grad_focal_loss = disable_torch_grad_focal_loss
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _float_logits(logits)
        if targets.shape != logits.shape:
            raise UserError(
                f"Multi-label targets of shape {tuple(targets.shape)} do not match predictions of shape "
                f"{tuple(logits.shape)}; give one 0/1 row per sample."
            )
        targets = targets.to(logits.dtype)
        prob_pos = torch.sigmoid(logits)
        prob_neg = 1 - prob_pos
        if self.clip > 0:
            # Probability shifting: easy negatives (p < clip) cost nothing at all.
            prob_neg = (prob_neg + self.clip).clamp(max=1)

        log_likelihood = targets * torch.log(prob_pos.clamp(min=self.eps)) + (1 - targets) * torch.log(
            prob_neg.clamp(min=self.eps)
        )

        if self.gamma_neg > 0 or self.gamma_pos > 0:
            grad_mode = torch.no_grad() if self.disable_torch_grad_focal_loss else contextlib.nullcontext()
            with grad_mode:
                # Written as a blend so that soft targets interpolate, like the reference does.
                prob_of_truth = prob_pos * targets + prob_neg * (1 - targets)
                gamma = self.gamma_pos * targets + self.gamma_neg * (1 - targets)
                focusing_weight = _focusing_weight(1 - prob_of_truth, gamma)
            log_likelihood = log_likelihood * focusing_weight

        return _reduce(-log_likelihood, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
            f"disable_torch_grad_focal_loss={self.disable_torch_grad_focal_loss}, "
            f"reduction={self.reduction!r}"
        )


class ASLSingleLabel(nn.Module):
    """ASL for single-label classification: log-softmax, one-sided focusing and label smoothing.

    With p = softmax(logits), the target class is weighted by (1 - p)**gamma_pos and every other class by
    p**gamma_neg; the target distribution is smoothed to t * (1 - eps) + eps / C. The loss of a sample is
    -sum_c smoothed_c * weight_c * log p_c, averaged over the batch ("mean"), summed ("sum") or kept ("none").

    Targets are class indices (N,) or float rows (N, C) such as mixup/cutmix mixtures. For a soft row t the
    weight base t * (1 - p) + (1 - t) * p and exponent t * gamma_pos + (1 - t) * gamma_neg blend the two
    cases, as the reference's formula does; one-hot rows give exactly the index form.
    """

    def __init__(self, gamma_pos: float = 0, gamma_neg: float = 4, eps: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        _check_non_negative("gamma_pos", gamma_pos)
        _check_non_negative("gamma_neg", gamma_neg)
        _check_fraction("eps", eps)
        _check_reduction(reduction)
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.eps = eps
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _float_logits(logits)
        target_dist = _target_distribution(logits, targets)
        num_classes = logits.shape[-1]
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()

        # The reference's 1 - p*t - (1 - p)*(1 - t), rearranged so p stays exact for small p on non-targets.
        focusing_base = target_dist * (1 - probs) + (1 - target_dist) * probs
        gamma = self.gamma_pos * target_dist + self.gamma_neg * (1 - target_dist)
        weighted_log_probs = log_probs * _focusing_weight(focusing_base, gamma)

        smoothed = target_dist * (1 - self.eps) + self.eps / num_classes
        per_sample = -(smoothed * weighted_log_probs).sum(dim=-1)
        return _reduce(per_sample, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, eps={self.eps}, reduction={self.reduction!r}"


class BinaryCrossEntropy(nn.Module):
    """BCE with logits on (N, C) multi-hot or soft targets; class indices (N,) become one-hot rows."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _float_logits(logits)
        return F.binary_cross_entropy_with_logits(
            logits, _target_distribution(logits, targets), reduction=self.reduction
        )


PARTIAL_MODES = ("negative", "ignore", "selective")


class PartialLabelLoss(nn.Module):
    """A multi-label loss (ASL or BCE) on targets of 1 (positive), 0 (negative) and -1 (unknown).

    Every entry's loss is the wrapped loss's with unknown read as negative; `mode` says which unknown entries count:
    - "negative": all of them (exactly the wrapped loss on the targets with -1 replaced by 0);
    - "ignore": none; they add nothing to the loss or its gradient;
    - "selective" (class-aware selective loss, Ben-Baruch et al. 2022): unknowns of a class whose label prior is
      above `prior_threshold` are ignored (the class is likely present where nobody looked); of the rest, the
      `likelihood_topk` x batch-size unknowns the model finds most likely present are ignored too; the others
      count as negatives. Until `set_prior` gives a prior, every unknown is ignored.
    `gamma_unknown` (ASL only) focuses the unknowns that count as negatives with their own exponent, as the
    paper's loss does to weigh them less than annotated negatives; None keeps ASL's gamma_neg for them.
    Reduction as the wrapped loss's: "sum", "none" (ignored entries 0), or "mean" over the entries that count.
    """

    def __init__(self, loss: nn.Module, mode: str = "ignore", prior_threshold: float = 0.05,
                 likelihood_topk: int = 5, gamma_unknown: float | None = None) -> None:
        super().__init__()
        if mode not in PARTIAL_MODES:
            raise UserError(f"loss.partial must be one of {', '.join(PARTIAL_MODES)}, not {mode!r}.")
        if not isinstance(loss, (AsymmetricLoss, BinaryCrossEntropy)):
            raise UserError("Partial labels work with the multi-label losses asl and bce only.")
        if not 0 <= prior_threshold <= 1:
            raise UserError(f"loss.prior_threshold must be in [0, 1], got {prior_threshold}.")
        if likelihood_topk < 0:
            raise UserError(f"loss.likelihood_topk must be >= 0, got {likelihood_topk}.")
        self.reduction = loss.reduction
        loss.reduction = "none"  # the wrapper masks entries first, then reduces
        self.loss = loss
        self.unknown_loss = None
        if gamma_unknown is not None:
            if not isinstance(loss, AsymmetricLoss):
                raise UserError("loss.gamma_unknown is an ASL focusing exponent; use it with loss.name: asl")
            _check_non_negative("gamma_unknown", gamma_unknown)
            self.unknown_loss = copy.deepcopy(loss)
            self.unknown_loss.gamma_neg = gamma_unknown
        self.mode = mode
        self.prior_threshold = prior_threshold
        self.likelihood_topk = likelihood_topk
        self.register_buffer("prior", None)

    def set_prior(self, prior: torch.Tensor | np.ndarray | list[float] | None) -> None:
        """The label prior per class (C,): how often each class is present, for the selective mode."""
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)

    @torch.no_grad()
    def counted(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Boolean (N, C): the entries that contribute to the loss. Free of host syncs, so the GPU never waits."""
        unknown = targets == -1
        if self.mode == "negative":
            return torch.ones_like(unknown)
        if self.mode == "ignore" or self.prior is None:
            return ~unknown
        if self.prior.device != logits.device:
            self.prior = self.prior.to(logits.device)
        as_negative = unknown & (self.prior <= self.prior_threshold)
        top_k = min(self.likelihood_topk * logits.shape[0], logits.numel())
        if top_k > 0:
            # The batch's most likely unknowns, ranked among all its unknowns as in the authors' code; known
            # entries rank last at -inf, and a pick at -inf (fewer unknowns than top_k) is no unknown.
            likelihood = torch.where(unknown, logits.detach().float(), float("-inf")).flatten()
            values, picks = likelihood.topk(top_k)
            likely = torch.zeros_like(likelihood, dtype=torch.bool).scatter_(0, picks, values > float("-inf"))
            as_negative &= ~likely.view_as(unknown)
        return ~unknown | as_negative

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.shape != logits.shape:
            raise UserError(f"Multi-label targets of shape {tuple(targets.shape)} do not match predictions of shape "
                            f"{tuple(logits.shape)}; give one row of 1 / 0 / -1 per sample.")
        known_targets = targets.clamp(min=0)
        per_entry = self.loss(logits, known_targets)
        if self.unknown_loss is not None:
            per_entry = torch.where(targets == -1, self.unknown_loss(logits, known_targets), per_entry)
        counted = self.counted(logits, targets)
        # where() rather than a product: an ignored entry's gradient is exactly zero, whatever its loss.
        per_entry = torch.where(counted, per_entry, torch.zeros((), dtype=per_entry.dtype, device=per_entry.device))
        if self.reduction == "sum":
            return per_entry.sum()
        if self.reduction == "mean":
            return per_entry.sum() / counted.sum().clamp(min=1)
        return per_entry

    def extra_repr(self) -> str:
        gamma_unknown = None if self.unknown_loss is None else self.unknown_loss.gamma_neg
        return (f"mode={self.mode!r}, prior_threshold={self.prior_threshold}, likelihood_topk={self.likelihood_topk}, "
                f"gamma_unknown={gamma_unknown}, reduction={self.reduction!r}")


def _cross_entropy(label_smoothing: float = 0.1, reduction: str = "mean") -> nn.Module:
    # 0.1 smoothing as in the TResNet paper's ImageNet training.
    _check_fraction("label_smoothing", label_smoothing)
    _check_reduction(reduction)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction=reduction)


# name -> (constructor, tasks it fits). The constructor's keyword arguments are the recipe options it takes.
LOSSES: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "cross_entropy": (_cross_entropy, ("single-label",)),
    "bce": (BinaryCrossEntropy, ("single-label", "multi-label")),
    "asl": (AsymmetricLoss, ("multi-label",)),
    "asl_single": (ASLSingleLabel, ("single-label",)),
}


def loss_options(name: str) -> dict[str, object]:
    """The recipe options loss `name` takes, with their defaults."""
    constructor, _ = LOSSES[name]
    return {p.name: p.default for p in inspect.signature(constructor).parameters.values()}


def build_loss(name: str, task: str, **options: object) -> nn.Module:
    """The loss `name` for `task` ("single-label" or "multi-label"), configured by the recipe's loss options.

    Options left out, or given as None, keep the loss's default (the paper's values). Unknown names, a loss
    that does not fit the task, or an option the loss does not take raise UserError.
    """
    task = task.replace("_", "-").lower()
    if task not in TASKS:
        raise UserError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"Unknown loss {name!r}; choose one of {', '.join(LOSSES)}.{hint}")
    constructor, tasks = LOSSES[name]
    if task not in tasks:
        fitting = [n for n, (_, t) in LOSSES.items() if task in t]
        raise UserError(f"Loss {name!r} does not fit a {task} task; use one of {', '.join(fitting)}.")

    accepted = loss_options(name)
    options = {key: value for key, value in options.items() if value is not None}
    for key, value in options.items():
        if key not in accepted:
            takes = ", ".join(accepted) or "no options"
            raise UserError(f"Loss {name!r} has no option {key!r}; it takes {takes}.")
        _check_option_type(name, key, value, accepted[key])
    return constructor(**options)


def _check_option_type(loss_name: str, key: str, value: object, default: object) -> None:
    # The default's type says what the option is; bool is checked first because bool is an int subclass.
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise UserError(f"Loss {loss_name!r} option {key!r} must be {expected}, got {value!r}.")
