"""The confusion matrix at a threshold: counts, rates, the strict decision rule."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from gaussian_ad.stats.metrics import Confusion, confusion
from gaussian_ad.stats.thresholds import observed_rate


def test_counts_match_sklearn_and_rates_match_observed_rate():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=200)
    scores = rng.normal(size=200) + labels
    threshold = 0.4
    result = confusion(labels, scores, threshold)
    (tn, fp), (fn, tp) = confusion_matrix(labels, scores > threshold)
    assert (result.tp, result.fp, result.tn, result.fn) == (tp, fp, tn, fn)
    assert result.fpr == pytest.approx(observed_rate(scores[labels == 0], threshold))
    assert result.recall == pytest.approx(observed_rate(scores[labels == 1], threshold))


def test_a_score_equal_to_the_threshold_is_normal():
    result = confusion(np.array([0, 1, 1]), np.array([2.0, 2.0, 2.5]), 2.0)
    assert result == Confusion(tp=1, fp=0, tn=1, fn=1)


def test_rates_without_a_class_are_nan():
    only_normals = confusion(np.zeros(3, int), np.array([1.0, 2.0, 3.0]), 1.5)
    assert only_normals.fpr == pytest.approx(2 / 3) and np.isnan(only_normals.recall)
    assert np.isnan(confusion(np.ones(2, int), np.array([0.0, 1.0]), 0.5).fpr)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        confusion(np.array([0, 1]), np.array([1.0]), 0.0)
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        confusion(np.array([0, 2]), np.array([1.0, 2.0]), 0.0)


def test_best_recall_is_the_best_over_every_threshold():
    from gaussian_ad.stats.metrics import best_recall

    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, size=40)
        scores = rng.integers(0, 12, size=40).astype(float)  # ties on purpose
        for max_fpr in (0.0, 0.05, 0.2, 1.0):
            brute = max(
                confusion(labels, scores, t).recall
                for t in np.concatenate([scores, [-np.inf]])
                if confusion(labels, scores, t).fpr <= max_fpr
            )
            assert best_recall(labels, scores, max_fpr) == brute
