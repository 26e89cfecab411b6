"""Metrics against hand-worked examples, brute force and scikit-learn."""

import json
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from tresfinetune.errors import UserError
from tresfinetune.metrics import (
    average_precision_per_class,
    mean_average_precision,
    multilabel_threshold_metrics,
    single_label_report,
    topk_accuracy,
    tune_thresholds,
)


def random_multilabel(seed, num_samples=60, num_classes=7, positive_rate=0.3):
    rng = np.random.default_rng(seed)
    targets = (rng.random((num_samples, num_classes)) < positive_rate).astype(np.int64)
    scores = rng.random((num_samples, num_classes)) * 0.7 + targets * 0.3  # informative but imperfect
    return scores, targets


# ---- top-k accuracy ----


def test_topk_accuracy_by_hand():
    scores = np.array(
        [
            [0.1, 0.5, 0.3, 0.1],  # label 1: top-1 hit
            [0.4, 0.3, 0.2, 0.1],  # label 1: rank 2
            [0.1, 0.2, 0.3, 0.4],  # label 0: rank 4
            [0.9, 0.0, 0.05, 0.05],  # label 3: rank 2 or 3 (tie), inside top 3
        ]
    )
    labels = np.array([1, 1, 0, 3])
    assert topk_accuracy(scores, labels, ks=(1, 2, 3, 4)) == {1: 25.0, 2: 50.0, 3: 75.0, 4: 100.0}


def test_topk_accuracy_clamps_k_and_takes_tensors():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    labels = torch.tensor([2, 2])
    assert topk_accuracy(logits, labels) == {1: 50.0, 5: 100.0}  # 3 classes: top-5 is everything
    assert topk_accuracy(logits.numpy(), labels.numpy()) == topk_accuracy(logits, labels)
    assert topk_accuracy(logits.to(torch.bfloat16), labels) == {1: 50.0, 5: 100.0}


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (np.zeros((2, 3)), np.array([0, 3]), "must lie in 0..2"),
        (np.zeros((2, 3)), np.array([0, 1, 2]), "Expected 2 integer class labels"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), "integer class labels"),
        (np.zeros(3), np.array([0]), "shape"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "at least one sample"),
        (np.array([[np.nan, 1.0]]), np.array([0]), "NaN"),
    ],
)
def test_topk_accuracy_rejects_bad_input(scores, labels, message):
    with pytest.raises(UserError, match=message):
        topk_accuracy(scores, labels)


# ---- average precision ----


def test_average_precision_by_hand():
    # Class 0 ranked: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3 -> AP 83.33%.
    # Class 1 ranked: neg, pos, neg, neg -> 1/2 -> AP 50%. Class 2 has no positive -> NaN, skipped.
    scores = np.array([[0.9, 0.95, 0.1], [0.7, 0.9, 0.2], [0.5, 0.3, 0.3], [0.2, 0.1, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    per_class = average_precision_per_class(scores, targets)
    assert per_class[0] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert per_class[1] == pytest.approx(50.0)
    assert np.isnan(per_class[2])
    assert mean_average_precision(scores, targets) == pytest.approx((250 / 3 + 50) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_equals_sklearn_without_ties(seed):
    scores, targets = random_multilabel(seed)
    targets[:, 3] = 0  # a class without positives is skipped
    expected = [100 * average_precision_score(targets[:, c], scores[:, c]) for c in range(7) if c != 3]
    per_class = average_precision_per_class(scores, targets)
    np.testing.assert_allclose(np.delete(per_class, 3), expected, rtol=1e-12)
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(expected), rel=1e-12)
    assert mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(
        np.mean(expected), rel=1e-12
    )


def test_average_precision_with_ties_is_order_independent_and_equals_sklearn():
    scores, targets = random_multilabel(11, num_samples=80)
    scores = np.round(scores, 1)  # many ties
    expected = 100 * average_precision_score(targets, scores, average=None)
    np.testing.assert_allclose(average_precision_per_class(scores, targets), expected, rtol=1e-12)
    shuffled = np.random.default_rng(0).permutation(len(scores))
    np.testing.assert_allclose(average_precision_per_class(scores[shuffled], targets[shuffled]), expected, rtol=1e-12)


def test_perfect_and_reversed_rankings():
    targets = np.array([[1], [1], [0], [0], [0]])
    assert mean_average_precision(np.array([[5.0], [4.0], [3.0], [2.0], [1.0]]), targets) == 100.0
    # Positives ranked last of five: precision 1/4 and 2/5.
    reversed_ap = mean_average_precision(np.array([[1.0], [2.0], [3.0], [4.0], [5.0]]), targets)
    assert reversed_ap == pytest.approx(100 * (1 / 4 + 2 / 5) / 2)


def test_mean_average_precision_rejects_bad_input():
    with pytest.raises(UserError, match="mAP is undefined"):
        mean_average_precision(np.random.rand(4, 3), np.zeros((4, 3)))
    with pytest.raises(UserError, match="do not match"):
        mean_average_precision(np.random.rand(4, 3), np.zeros((4, 2)))
    with pytest.raises(UserError, match=r"0 \(negative\) or -1 \(unknown\)"):
        mean_average_precision(np.random.rand(2, 2), np.array([[0.5, 1], [0, 1]]))
    with pytest.raises(UserError, match="mAP is undefined"):  # the only positive is unknown
        mean_average_precision(np.random.rand(2, 2), np.array([[-1, 0], [0, 0]]))


def test_mean_average_precision_is_fast_on_coco_sized_input():
    rng = np.random.default_rng(0)
    targets = rng.random((40_000, 80)) < 0.04
    scores = rng.random((40_000, 80)).astype(np.float32) + targets * 0.5
    start = time.perf_counter()
    value = mean_average_precision(scores, targets)
    elapsed = time.perf_counter() - start
    assert 50 < value < 100
    assert elapsed < 5, f"mAP of 40k x 80 took {elapsed:.1f} s; it is meant to be vectorised (~0.5 s)"


# ---- threshold metrics ----


def test_threshold_metrics_by_hand():
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.8], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    # At 0.5: class 0 predicts rows 0,1 (1 correct of 2, 1 of 2 positives); class 1 predicts rows 1,2 (2/2, 2/2).
    metrics = multilabel_threshold_metrics(scores, targets, 0.5)
    assert metrics["CP"] == pytest.approx(75.0)
    assert metrics["CR"] == pytest.approx(75.0)
    assert metrics["CF1"] == pytest.approx(75.0)
    assert metrics["OP"] == pytest.approx(75.0)  # 3 correct of 4 predicted
    assert metrics["OR"] == pytest.approx(75.0)  # 3 of 4 positives
    assert metrics["OF1"] == pytest.approx(75.0)
    # Per-class thresholds: class 0 at 0.3 predicts rows 0,1,2 (2/3 precision, 2/2 recall).
    per_class = multilabel_threshold_metrics(scores, targets, np.array([0.3, 0.5]))
    assert per_class["CP"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert per_class["CR"] == pytest.approx(100.0)
    cp, cr = per_class["CP"], per_class["CR"]
    assert per_class["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert per_class["OP"] == pytest.approx(80.0)  # 4 correct of 5 predicted


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8, 2.0])
def test_threshold_metrics_match_sklearn(threshold):
    scores, targets = random_multilabel(3)
    targets[:, 2] = 0  # no positives: left out of CP and CR
    predicted = (scores >= threshold).astype(int)
    with_positives = [c for c in range(targets.shape[1]) if targets[:, c].any()]
    metrics = multilabel_threshold_metrics(scores, targets, threshold)
    kwargs = {"labels": with_positives, "zero_division": 0}
    assert metrics["CP"] == pytest.approx(100 * precision_score(targets, predicted, average="macro", **kwargs))
    assert metrics["CR"] == pytest.approx(100 * recall_score(targets, predicted, average="macro", **kwargs))
    assert metrics["OP"] == pytest.approx(100 * precision_score(targets, predicted, average="micro", zero_division=0))
    assert metrics["OR"] == pytest.approx(100 * recall_score(targets, predicted, average="micro"))
    assert metrics["OF1"] == pytest.approx(100 * f1_score(targets, predicted, average="micro", zero_division=0))


def test_a_score_equal_to_its_threshold_is_predicted():
    scores = np.array([[0.6], [0.4]])
    targets = np.array([[1], [0]])
    assert multilabel_threshold_metrics(scores, targets, 0.6)["OR"] == 100.0
    assert multilabel_threshold_metrics(scores, targets, 0.61)["OR"] == 0.0


def test_threshold_metrics_reject_wrong_threshold_count():
    scores, targets = random_multilabel(0)
    with pytest.raises(UserError, match="one per class"):
        multilabel_threshold_metrics(scores, targets, np.full(3, 0.5))


# ---- threshold tuning ----


def brute_force_best_f1(scores, targets):
    """Best F1 over every cut between distinct scores, with sklearn's f1_score."""
    candidates = np.unique(scores)
    return max(f1_score(targets, scores >= t, zero_division=0) for t in candidates)


@pytest.mark.parametrize("seed", range(3))
def test_tuned_thresholds_maximise_each_class_f1(seed):
    scores, targets = random_multilabel(seed, num_samples=40)
    scores = np.round(scores, 2)  # with some ties
    thresholds = tune_thresholds(scores, targets)
    assert thresholds.shape == (7,)
    for c in range(7):
        best = brute_force_best_f1(scores[:, c], targets[:, c])
        assert f1_score(targets[:, c], scores[:, c] >= thresholds[c]) == pytest.approx(best)
        # The threshold lies strictly between scores, so `>` predicts the same.
        assert not np.any(scores[:, c] == thresholds[c])


def test_classes_without_positives_get_the_global_threshold():
    scores, targets = random_multilabel(5, num_samples=40)
    targets[:, 1] = 0
    thresholds = tune_thresholds(torch.from_numpy(scores), torch.from_numpy(targets))
    best_overall = brute_force_best_f1(scores.ravel(), targets.ravel())
    assert f1_score(targets.ravel(), scores.ravel() >= thresholds[1]) == pytest.approx(best_overall)
    assert tune_thresholds(scores, targets, fallback=0.25)[1] == 0.25
    # Classes with positives ignore the fallback.
    np.testing.assert_array_equal(np.delete(tune_thresholds(scores, targets, 0.25), 1), np.delete(thresholds, 1))


def test_tuning_needs_positives_or_a_fallback():
    scores = np.random.default_rng(0).random((5, 3))
    with pytest.raises(UserError, match="fallback"):
        tune_thresholds(scores, np.zeros((5, 3)))
    np.testing.assert_array_equal(tune_thresholds(scores, np.zeros((5, 3)), fallback=0.5), [0.5, 0.5, 0.5])


def test_tuned_thresholds_improve_f1_over_one_half():
    scores, targets = random_multilabel(8, num_samples=200)
    tuned = multilabel_threshold_metrics(scores, targets, tune_thresholds(scores, targets))
    assert tuned["CF1"] >= multilabel_threshold_metrics(scores, targets, 0.5)["CF1"]


# ---- single-label report ----


def test_single_label_report_by_hand():
    names = ["cat", "dog", "fox", "owl"]
    scores = np.array(
        [
            [0.8, 0.1, 0.1, 0.0],  # cat -> cat
            [0.6, 0.3, 0.1, 0.0],  # cat -> cat
            [0.5, 0.4, 0.1, 0.0],  # dog -> cat
            [0.1, 0.8, 0.1, 0.0],  # dog -> dog
            [0.1, 0.2, 0.7, 0.0],  # fox -> fox
        ]
    )
    labels = np.array([0, 0, 1, 1, 2])
    report = single_label_report(torch.from_numpy(scores), torch.from_numpy(labels), names)
    assert report["top1"] == pytest.approx(80.0)
    assert report["top5"] == 100.0
    assert report["num_samples"] == 5
    assert report["confusion_matrix"] == [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    by_name = {row["name"]: row for row in report["per_class"]}
    assert [row["name"] for row in report["per_class"]] == names
    assert by_name["cat"]["precision"] == pytest.approx(200 / 3)
    assert by_name["cat"]["recall"] == pytest.approx(100.0)
    assert by_name["cat"]["f1"] == pytest.approx(80.0)
    assert by_name["dog"] == {
        "name": "dog",
        "precision": 100.0,
        "recall": 50.0,
        "f1": pytest.approx(200 / 3),
        "support": 2,
    }
    assert by_name["owl"] == {"name": "owl", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["macro_recall"] == pytest.approx((100 + 50 + 100 + 0) / 4)
    json.dumps(report)  # plain Python values, ready for --json


def test_single_label_report_needs_one_name_per_class():
    with pytest.raises(UserError, match="2 class names for scores over 3 classes"):
        single_label_report(np.random.rand(4, 3), np.array([0, 1, 2, 0]), ["a", "b"])
