"""Evaluation metrics: image AUROC, per-level AUROC, mean +- SEM across categories."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; labels are 1 for anomalous, 0 for normal."""
    labels = np.asarray(labels)
    if np.unique(labels).size != 2:
        raise ValueError("AUROC needs both normal (0) and anomalous (1) images")
    return float(roc_auc_score(labels, scores))


def level_aurocs(labels: np.ndarray, level_scores: np.ndarray) -> list[float]:
    """AUROC of each level's score column of an (n, L) array."""
    return [auroc(labels, column) for column in np.asarray(level_scores).T]


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean +- SEM of no values")
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), sem
