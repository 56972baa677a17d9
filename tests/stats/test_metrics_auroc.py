"""Image AUROC in numpy against scikit-learn's roc_auc_score."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gaussian_ad.stats.metrics import auroc, level_aurocs


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_roc_auc_score(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.normal(size=60) + labels
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    tied = np.round(scores, 0)  # many ties, also across the classes
    assert auroc(labels, tied) == pytest.approx(roc_auc_score(labels, tied), abs=1e-12)


def test_auroc_of_extreme_rankings():
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(labels, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    assert auroc(labels, [0.5, 0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc(labels, np.ones(5)) == 0.5
    assert auroc(labels.astype(bool), [1, 2, 3, 4, 5]) == 1.0


def test_level_aurocs_are_column_aurocs():
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(20, int), np.ones(10, int)]
    columns = rng.normal(size=(30, 4)) + labels[:, None] * np.arange(4)
    expected = [roc_auc_score(labels, c) for c in columns.T]
    assert level_aurocs(labels, columns) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [1.0, 2.0, 3.0], "both normal"),
        ([0, 1, 1], [1.0, 2.0], "differ in length"),
        ([0, 1, 1], [1.0, np.nan, 3.0], "not all finite"),
        ([0, 1, 1], [1.0, np.inf, 3.0], "not all finite"),
    ],
)
def test_auroc_refuses_what_it_cannot_rank(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        auroc(np.array(labels), np.array(scores))
