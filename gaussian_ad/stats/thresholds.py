"""Decision thresholds: chi-square under the Gaussian assumption, and empirical quantiles."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def sigma_to_fpr(sigma: float) -> float:
    """False-positive rate of the sigma rule: 1 - erf(sigma / sqrt 2)."""
    return math.erfc(sigma / math.sqrt(2.0))


def _target_fpr(fpr: float | None, sigma: float | None) -> float:
    if (fpr is None) == (sigma is None):
        raise ValueError("give exactly one of fpr= or sigma=")
    if sigma is not None:
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        return sigma_to_fpr(sigma)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    return float(fpr)


def chi2_thresholds(
    dims: Sequence[int], fpr: float | None = None, sigma: float | None = None
) -> np.ndarray:
    """Per-level thresholds on the unsquared Mahalanobis distance.

    M^2 of a normal d-dimensional Gaussian sample is chi-square with d degrees of
    freedom, so t = sqrt(chi2.ppf(1 - fpr, d)) flags a fraction ``fpr`` of normal data.
    """
    # scipy.stats.chi2.ppf(q, d) is 2 * gammaincinv(d / 2, q); scipy.special alone is
    # imported here, not scipy.stats (about 1 s of CPU more), and only when called.
    from scipy.special import gammaincinv

    alpha = _target_fpr(fpr, sigma)
    return np.sqrt(2.0 * gammaincinv(np.asarray(dims, dtype=np.float64) / 2.0, 1.0 - alpha))


def empirical_threshold(normal_scores: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile of held-out normal scores."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no held-out normal scores to take a quantile of")
    alpha = _target_fpr(fpr, None)
    return float(np.quantile(scores, 1.0 - alpha))


def observed_rate(scores: np.ndarray, threshold: float) -> float:
    """Fraction of scores strictly above the threshold (FPR on normals, TPR on anomalies)."""
    scores = np.asarray(scores)
    return float(np.mean(scores > threshold)) if scores.size else float("nan")
