"""Losses against formulas written out independently from the ASL paper (SPEC.md section 6)."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tresfinetune.errors import UserError
from tresfinetune.losses import ASLSingleLabel, AsymmetricLoss, BinaryCrossEntropy, build_loss


def asl_reference_numpy(logits, targets, gamma_neg, gamma_pos, clip, eps):
    """SPEC section 6, entry by entry in float64, summed over batch and classes."""
    p = 1 / (1 + np.exp(-logits))
    p_neg = np.minimum(1.0, 1 - p + clip) if clip > 0 else 1 - p
    positive_term = targets * np.log(np.maximum(p, eps)) * (1 - p) ** gamma_pos
    negative_term = (1 - targets) * np.log(np.maximum(p_neg, eps)) * (1 - p_neg) ** gamma_neg
    return -(positive_term + negative_term).sum()


def asl_reference_torch(logits, targets, gamma_neg, gamma_pos, clip, eps, detach_weights=False):
    """The same formula with torch.where per entry, for autograd gradients to compare against."""
    p = torch.sigmoid(logits)
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    weight_pos = (1 - p) ** gamma_pos
    weight_neg = (1 - p_neg) ** gamma_neg
    if detach_weights:
        weight_pos, weight_neg = weight_pos.detach(), weight_neg.detach()
    entry = torch.where(
        targets > 0,
        torch.log(p.clamp(min=eps)) * weight_pos,
        torch.log(p_neg.clamp(min=eps)) * weight_neg,
    )
    return -entry.sum()


def asl_single_reference_numpy(logits, labels, gamma_pos, gamma_neg, eps):
    """Single-label ASL: softmax, (1-p)^gamma_pos on the target, p^gamma_neg elsewhere, smoothed targets."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    num_samples, num_classes = logits.shape
    losses = []
    for i in range(num_samples):
        total = 0.0
        for c in range(num_classes):
            is_target = c == labels[i]
            weight = (1 - p[i, c]) ** gamma_pos if is_target else p[i, c] ** gamma_neg
            smoothed = (1 - eps) * is_target + eps / num_classes
            total -= smoothed * weight * log_p[i, c]
        losses.append(total)
    return np.mean(losses)


def random_multilabel(seed, num_samples=6, num_classes=5, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=generator, dtype=torch.float64) * scale
    targets = (torch.rand(num_samples, num_classes, generator=generator) < 0.4).double()
    return logits, targets


ASL_SETTINGS = [
    # gamma_neg, gamma_pos, clip
    (4, 1, 0.05),  # the paper's defaults
    (4, 0, 0.05),  # the COCO recipe
    (4, 1, 0.0),  # no probability shifting
    (0, 0, 0.0),  # plain BCE
    (2, 3, 0.2),
    (0, 2, 0.1),
]


@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), ASL_SETTINGS)
def test_asymmetric_loss_matches_the_formula(gamma_neg, gamma_pos, clip):
    for seed in range(3):
        logits, targets = random_multilabel(seed)
        loss_fn = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
        expected = asl_reference_numpy(logits.numpy(), targets.numpy(), gamma_neg, gamma_pos, clip, 1e-8)
        assert loss_fn(logits, targets).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), ASL_SETTINGS)
@pytest.mark.parametrize("detach_weights", [False, True])
def test_asymmetric_loss_gradients(gamma_neg, gamma_pos, clip, detach_weights):
    logits, targets = random_multilabel(7)
    ours = logits.clone().requires_grad_()
    loss_fn = AsymmetricLoss(gamma_neg, gamma_pos, clip, disable_torch_grad_focal_loss=detach_weights)
    loss_fn(ours, targets).backward()
    theirs = logits.clone().requires_grad_()
    asl_reference_torch(theirs, targets, gamma_neg, gamma_pos, clip, 1e-8, detach_weights).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_asymmetric_loss_backward_agrees_with_finite_differences():
    logits, targets = random_multilabel(3, scale=2.0)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: AsymmetricLoss(clip=0.05)(x, targets), (logits,))


def test_detaching_the_focusing_weights_changes_the_gradient_but_not_the_value():
    logits, targets = random_multilabel(4)
    grads, values = [], []
    for detach in (False, True):
        x = logits.clone().requires_grad_()
        loss = AsymmetricLoss(disable_torch_grad_focal_loss=detach)(x, targets)
        loss.backward()
        grads.append(x.grad)
        values.append(loss.item())
    assert values[0] == values[1]
    assert not torch.allclose(grads[0], grads[1])


def test_asymmetric_loss_without_focusing_or_clip_is_bce():
    logits, targets = random_multilabel(5)
    x = logits.clone().requires_grad_()
    AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(x, targets).backward()
    # d/dx of BCE-with-logits summed is sigmoid(x) - y.
    torch.testing.assert_close(x.grad, torch.sigmoid(logits) - targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    assert AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets).item() == pytest.approx(expected.item())


def test_clip_makes_easy_negatives_free():
    # p = sigmoid(-4) ~ 0.018 < clip: the shifted negative probability is 1, so the loss and gradient are 0.
    logits = torch.full((1, 3), -4.0, requires_grad=True)
    loss = AsymmetricLoss(clip=0.05)(logits, torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0
    assert torch.all(logits.grad == 0)


def test_asymmetric_loss_defaults_are_the_papers():
    loss_fn = AsymmetricLoss()
    assert (loss_fn.gamma_neg, loss_fn.gamma_pos, loss_fn.clip, loss_fn.eps) == (4, 1, 0.05, 1e-8)
    assert loss_fn.reduction == "sum"
    assert loss_fn.disable_torch_grad_focal_loss is False
    single = ASLSingleLabel()
    assert (single.gamma_pos, single.gamma_neg, single.eps, single.reduction) == (0, 4, 0.1, "mean")


def test_asymmetric_loss_reductions():
    logits, targets = random_multilabel(8)
    per_entry = AsymmetricLoss(reduction="none")(logits, targets)
    assert per_entry.shape == logits.shape
    assert AsymmetricLoss()(logits, targets).item() == pytest.approx(per_entry.sum().item())
    assert AsymmetricLoss(reduction="mean")(logits, targets).item() == pytest.approx(per_entry.mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [30.0, 100.0, 1e4])
def test_losses_stay_finite_for_large_logits(dtype, magnitude):
    logits = torch.tensor([[magnitude, -magnitude, magnitude], [-magnitude, magnitude, 0.0]], dtype=dtype)
    multi_hot = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # confident right and confident wrong
    labels = torch.tensor([1, 0])
    losses = [
        (AsymmetricLoss(), multi_hot),
        (AsymmetricLoss(clip=0, gamma_pos=0), multi_hot),
        (AsymmetricLoss(disable_torch_grad_focal_loss=True), multi_hot),
        (ASLSingleLabel(), labels),
        (ASLSingleLabel(gamma_pos=1), labels),
        (build_loss("bce", "multi-label"), multi_hot),
        (build_loss("cross_entropy", "single-label"), labels),
    ]
    for loss_fn, targets in losses:
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, targets)
        loss.backward()
        assert torch.isfinite(loss), loss_fn
        assert torch.isfinite(x.grad).all(), loss_fn
        assert loss.item() > 0, loss_fn  # the confident mistakes cost something


def test_fractional_gammas_give_finite_gradients_at_saturation():
    # pow(0, gamma) with 0 < gamma < 1 has an infinite derivative; saturated and clipped entries must not NaN.
    logits = torch.tensor([[-6.0, 0.5, 30.0], [-60.0, 0.5, 30.0]], requires_grad=True)
    multi_hot = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    AsymmetricLoss(gamma_neg=0.5, gamma_pos=0.5)(logits, multi_hot).backward()
    assert torch.isfinite(logits.grad).all()
    logits.grad = None
    ASLSingleLabel(gamma_pos=0.5, gamma_neg=0.5)(logits, torch.tensor([2, 1])).backward()
    assert torch.isfinite(logits.grad).all()


def test_asl_single_label_without_focusing_or_smoothing_is_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 6, (8,), generator=generator)
    x = logits.clone().requires_grad_()
    loss = ASLSingleLabel(gamma_pos=0, gamma_neg=0, eps=0)(x, labels)
    loss.backward()
    y = logits.clone().requires_grad_()
    expected = F.cross_entropy(y, labels)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(x.grad, y.grad)
    # Smoothing alone is torch's label smoothing: the same t * (1 - eps) + eps / C.
    smoothed = ASLSingleLabel(gamma_pos=0, gamma_neg=0, eps=0.1)(logits, labels)
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())


@pytest.mark.parametrize(("gamma_pos", "gamma_neg", "eps"), [(0, 4, 0.1), (1, 2, 0.0), (2, 0, 0.3)])
def test_asl_single_label_matches_the_formula(gamma_pos, gamma_neg, eps):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, 4, (5,), generator=generator)
    expected = asl_single_reference_numpy(logits.numpy(), labels.numpy(), gamma_pos, gamma_neg, eps)
    loss_fn = ASLSingleLabel(gamma_pos=gamma_pos, gamma_neg=gamma_neg, eps=eps)
    assert loss_fn(logits, labels).item() == pytest.approx(expected, rel=1e-10)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (x,))


def test_asl_single_label_soft_targets():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,), generator=generator)
    one_hot = F.one_hot(labels, 5).double()
    loss_fn = ASLSingleLabel()
    assert loss_fn(logits, one_hot).item() == pytest.approx(loss_fn(logits, labels).item(), rel=1e-12)

    # Without focusing the loss is linear in the target row, so a mixup row mixes the two losses.
    other = labels.roll(1)
    lam = 0.3
    mixed = lam * one_hot + (1 - lam) * F.one_hot(other, 5).double()
    plain = ASLSingleLabel(gamma_neg=0, eps=0.1)
    expected = lam * plain(logits, labels) + (1 - lam) * plain(logits, other)
    assert plain(logits, mixed).item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.isfinite(loss_fn(logits, mixed))


def test_asl_single_label_reductions():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    per_sample = ASLSingleLabel(reduction="none")(logits, labels)
    assert per_sample.shape == (4,)
    assert ASLSingleLabel(reduction="sum")(logits, labels).item() == pytest.approx(per_sample.sum().item())
    assert ASLSingleLabel()(logits, labels).item() == pytest.approx(per_sample.mean().item())


def test_build_loss_makes_each_loss_for_its_tasks():
    assert isinstance(build_loss("asl", "multi-label"), AsymmetricLoss)
    assert isinstance(build_loss("asl", "multi_label"), AsymmetricLoss)  # underscores work too
    assert isinstance(build_loss("asl_single", "single-label"), ASLSingleLabel)
    assert isinstance(build_loss("bce", "multi-label"), BinaryCrossEntropy)
    assert isinstance(build_loss("bce", "single-label"), BinaryCrossEntropy)
    assert isinstance(build_loss("cross_entropy", "single-label"), torch.nn.CrossEntropyLoss)


def test_build_loss_passes_options_and_keeps_the_papers_defaults():
    asl = build_loss("asl", "multi-label", gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=True)
    assert (asl.gamma_neg, asl.gamma_pos, asl.clip, asl.eps) == (4, 0, 0.05, 1e-8)
    assert asl.disable_torch_grad_focal_loss is True
    single = build_loss("asl_single", "single-label", eps=0.2, gamma_neg=None)  # None keeps the default
    assert (single.gamma_pos, single.gamma_neg, single.eps) == (0, 4, 0.2)
    assert build_loss("cross_entropy", "single-label").label_smoothing == 0.1
    assert build_loss("cross_entropy", "single-label", label_smoothing=0.0).label_smoothing == 0.0
    assert build_loss("bce", "multi-label", reduction="sum").reduction == "sum"
    # The builder's defaults are the classes' defaults (one source of truth).
    defaults = {n: p.default for n, p in inspect.signature(AsymmetricLoss).parameters.items()}
    assert defaults == {
        "gamma_neg": 4,
        "gamma_pos": 1,
        "clip": 0.05,
        "eps": 1e-8,
        "disable_torch_grad_focal_loss": False,
        "reduction": "sum",
    }


def test_cross_entropy_accepts_indices_and_soft_targets():
    loss_fn = build_loss("cross_entropy", "single-label", label_smoothing=0.0)
    logits = torch.randn(4, 3)
    labels = torch.tensor([2, 0, 1, 2])
    assert loss_fn(logits, F.one_hot(labels, 3).float()).item() == pytest.approx(loss_fn(logits, labels).item())


def test_bce_single_label_uses_one_hot_targets():
    loss_fn = build_loss("bce", "single-label")
    logits = torch.randn(4, 3)
    labels = torch.tensor([2, 0, 1, 2])
    expected = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 3).float())
    assert loss_fn(logits, labels).item() == pytest.approx(expected.item())
    assert loss_fn(logits, F.one_hot(labels, 3)).item() == pytest.approx(expected.item())  # int multi-hot


@pytest.mark.parametrize(
    ("name", "task", "options", "message"),
    [
        ("focal", "single-label", {}, "Unknown loss 'focal'"),
        ("asl_singel", "single-label", {}, "Did you mean 'asl_single'"),
        ("asl", "single-label", {}, "does not fit a single-label task"),
        ("asl_single", "multi-label", {}, "does not fit a multi-label task"),
        ("cross_entropy", "multi-label", {}, "does not fit"),
        ("asl", "detection", {}, "Unknown task"),
        ("asl", "multi-label", {"label_smoothing": 0.1}, "no option 'label_smoothing'"),
        ("cross_entropy", "single-label", {"gamma_neg": 4}, "no option 'gamma_neg'"),
        ("bce", "multi-label", {"clip": 0.05}, "no option 'clip'"),
        ("asl", "multi-label", {"gamma_neg": "four"}, "'gamma_neg' must be a number"),
        ("asl", "multi-label", {"disable_torch_grad_focal_loss": "yes"}, "must be true or false"),
        ("asl", "multi-label", {"gamma_neg": -1}, "gamma_neg must be >= 0"),
        ("asl", "multi-label", {"clip": 1.5}, "clip must be in [0, 1)"),
        ("asl", "multi-label", {"reduction": "avg"}, "reduction must be one of"),
        ("asl_single", "single-label", {"eps": 1.0}, "eps must be in [0, 1)"),
        ("cross_entropy", "single-label", {"label_smoothing": -0.1}, "label_smoothing must be in"),
    ],
)
def test_build_loss_rejects_bad_recipes(name, task, options, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_loss(name, task, **options)


def test_losses_reject_mismatched_targets():
    with pytest.raises(UserError, match="do not match"):
        AsymmetricLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UserError, match="do not match"):
        ASLSingleLabel()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(UserError, match="3 labels for a batch of 2"):
        ASLSingleLabel()(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
