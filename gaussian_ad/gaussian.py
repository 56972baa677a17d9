"""GaussianAD: per-level multivariate Gaussian with Ledoit-Wolf shrinkage, Mahalanobis score.

The estimator follows scikit-learn's conventions: parameters in ``__init__``, learned
state in attributes ending in ``_``. Input is a sequence of feature arrays, one per
level, each of shape (n, d_l).

PCA / NPCA follow the paper's reference exactly: per level, the components of
``sklearn.decomposition.PCA(n_components=None)`` (there are min(n, d) of them, so with
fewer images than dimensions the null space is absent); with c the cumulative
explained-variance ratio and k the first index where c > t, PCA keeps components
0..k and NPCA keeps components k-1..end (for k = 0 that is only the last component).
Features are projected without whitening, then modelled as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
from scipy.linalg import pinvh

from gaussian_ad.arrayfile import read_arrays, write_arrays
from gaussian_ad.moments import Moments, ledoit_wolf
from gaussian_ad.thresholds import chi2_thresholds

REDUCTIONS = (None, "pca", "npca")
FORMAT_VERSION = 1


def select_components(
    eigenvalues: np.ndarray, n_samples: int, reduction: str, variance_threshold: float
) -> slice:
    """Which of the descending-sorted components PCA or NPCA keeps, as a slice.

    Mirrors the reference: min(n, d) components exist; k = first index where the
    cumulative explained-variance ratio exceeds the threshold; PCA keeps [0, k],
    NPCA keeps [k - 1, end] (Python's slice, so k = 0 keeps only the last one).
    """
    n_components = min(n_samples, eigenvalues.shape[0])
    variances = np.clip(eigenvalues[:n_components], 0.0, None)
    cumulative = np.cumsum(variances) / variances.sum()
    k = int(np.argmax(cumulative > variance_threshold))
    if reduction == "pca":
        return slice(0, k + 1)
    return slice(k - 1, n_components) if k > 0 else slice(n_components - 1, n_components)


def pca_basis(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Mean and all principal axes (rows, by descending variance) from statistics."""
    eigenvalues, eigenvectors = np.linalg.eigh(moments.covariance)
    order = np.argsort(eigenvalues)[::-1]
    return eigenvalues[order], eigenvectors[:, order].T


class GaussianAD:
    """Anomaly detector: one Gaussian per feature level, image score = summed Mahalanobis.

    Parameters
    ----------
    reduction : None, "pca" or "npca"
        Optional per-level projection before the Gaussian (see module docstring).
    variance_threshold : float
        The cumulative explained-variance ratio t that splits PCA from NPCA components.
    """

    def __init__(self, reduction: str | None = None, variance_threshold: float = 0.99):
        self.reduction = reduction
        self.variance_threshold = variance_threshold

    # ----------------------------------------------------------------- fitting
    def _check_params(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 < self.variance_threshold < 1.0:
            raise ValueError(
                f"variance_threshold must lie in (0, 1), got {self.variance_threshold}"
            )

    def fit(self, levels: Sequence[np.ndarray]) -> Self:
        """Fit on in-memory features: a sequence of (n, d_l) arrays, one per level."""
        levels = _as_level_list(levels)
        raw = [Moments.from_array(x) for x in levels]
        self.fit_components(raw)
        if self.reduction is None:
            return self.fit_moments(raw)
        return self.fit_moments([Moments.from_array(z) for z in self.transform(levels)])

    def fit_components(self, raw_moments: Sequence[Moments]) -> Self:
        """First pass: store raw statistics and, with a reduction, choose the components.

        Without a reduction the raw statistics are all the fit needs; call
        :meth:`fit_moments` with the same statistics next. With a reduction, call
        :meth:`fit_moments` with statistics of ``transform(features)`` (a second pass),
        because the projected fourth moment that Ledoit-Wolf needs is not a function
        of the raw sums.
        """
        self._check_params()
        self.raw_moments_ = list(raw_moments)
        self.n_features_in_ = [m.dim for m in self.raw_moments_]
        self.components_: list[np.ndarray] | None = None
        self.pca_means_: list[np.ndarray] | None = None
        if self.reduction is not None:
            self.components_, self.pca_means_ = [], []
            for m in self.raw_moments_:
                eigenvalues, axes = pca_basis(m)
                keep = select_components(eigenvalues, m.n, self.reduction, self.variance_threshold)
                self.components_.append(axes[keep])
                self.pca_means_.append(m.mean)
        return self

    def fit_moments(self, moments: Sequence[Moments]) -> Self:
        """Fit the per-level Gaussians from statistics in the model's (projected) space."""
        moments = list(moments)
        if self.reduction is None:
            self.fit_components(moments)
        elif getattr(self, "components_", None) is None:
            raise ValueError("with a reduction, call fit_components(raw statistics) first")
        if [m.dim for m in moments] != self.dims_expected():
            raise ValueError(
                f"statistics of dims {[m.dim for m in moments]}, expected {self.dims_expected()}"
            )
        self.moments_ = moments
        self.means_, self.covariances_, self.precisions_, self.shrinkages_ = [], [], [], []
        for m in moments:
            if m.n < 2:
                raise ValueError(f"need at least 2 training images, got {m.n}")
            covariance, shrinkage = ledoit_wolf(m)
            self.means_.append(m.mean)
            self.covariances_.append(covariance)
            self.precisions_.append(pinvh(covariance, check_finite=False))
            self.shrinkages_.append(shrinkage)
        self.n_samples_ = moments[0].n
        self.threshold_: float | None = None
        return self

    def dims_expected(self) -> list[int]:
        """Dimension of each level in the model's space (after any reduction)."""
        if self.components_ is None:
            return list(self.n_features_in_)
        return [c.shape[0] for c in self.components_]

    @property
    def dims_(self) -> list[int]:
        """Degrees of freedom per level: the dimension after any reduction."""
        return [mean.shape[0] for mean in self.means_]

    def partial_fit(self, levels: Sequence[np.ndarray]) -> Self:
        """Merge new normal images into the fitted statistics and refit (exact).

        Equals a full refit on old + new images without revisiting the old ones.
        Only without a reduction: new images change the principal axes, and the
        projected fourth moment of the old images cannot be recomputed from sums.
        """
        return self.merge_moments([Moments.from_array(x) for x in _as_level_list(levels)])

    def merge_moments(self, raw_moments: Sequence[Moments]) -> Self:
        """Merge raw statistics of new images into the model and refit (exact)."""
        if not hasattr(self, "raw_moments_"):
            return self.fit_moments(raw_moments)
        if self.reduction is not None:
            raise ValueError(
                f"incremental fitting needs reduction=None (this model uses {self.reduction!r}):"
                " refit from the feature store instead"
            )
        merged = [old + new for old, new in zip(self.raw_moments_, raw_moments, strict=True)]
        return self.fit_moments(merged)

    # ----------------------------------------------------------------- scoring
    def transform(self, levels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Project each level onto the kept components (identity without a reduction)."""
        levels = _as_level_list(levels)
        if len(levels) != len(self.n_features_in_):
            raise ValueError(f"got {len(levels)} levels, the model has {len(self.n_features_in_)}")
        for x, d in zip(levels, self.n_features_in_, strict=True):
            if x.shape[1] != d:
                raise ValueError(f"level of dimension {x.shape[1]}, the model expects {d}")
        if self.components_ is None:
            return levels
        return [
            (x.astype(np.float64) - mean) @ comp.T
            for x, mean, comp in zip(levels, self.pca_means_, self.components_, strict=True)
        ]

    def level_scores(self, levels: Sequence[np.ndarray]) -> np.ndarray:
        """Unsquared Mahalanobis distance per image and level, shape (n, L)."""
        columns = []
        for z, mean, precision in zip(
            self.transform(levels), self.means_, self.precisions_, strict=True
        ):
            diff = z.astype(np.float64) - mean
            squared = np.einsum("ij,jk,ik->i", diff, precision, diff, optimize=True)
            columns.append(np.sqrt(np.clip(squared, 0.0, None)))
        return np.stack(columns, axis=1)

    def anomaly_scores(self, levels: Sequence[np.ndarray]) -> np.ndarray:
        """Image score: the sum of the per-level distances (higher = more anomalous)."""
        return self.level_scores(levels).sum(axis=1)

    def thresholds(self, fpr: float | None = None, sigma: float | None = None) -> np.ndarray:
        """Chi-square thresholds per level for a target FPR or a sigma rule."""
        return chi2_thresholds(self.dims_, fpr=fpr, sigma=sigma)

    def predict(self, levels: Sequence[np.ndarray], threshold: float | None = None) -> np.ndarray:
        """True where the summed score exceeds ``threshold`` (default: ``threshold_``)."""
        threshold = self.threshold_ if threshold is None else threshold
        if threshold is None:
            raise ValueError(
                "no threshold: pass one or set threshold_ (e.g. from held-out normals)"
            )
        return self.anomaly_scores(levels) > threshold

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write the model to one safetensors file (arrays + JSON metadata, no pickle)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for i, (raw, fitted) in enumerate(zip(self.raw_moments_, self.moments_, strict=True)):
            arrays.update(raw.to_arrays(f"level{i}.raw."))
            if self.components_ is not None:
                arrays.update(fitted.to_arrays(f"level{i}.fit."))
                arrays[f"level{i}.components"] = self.components_[i]
                arrays[f"level{i}.pca_mean"] = self.pca_means_[i]
        header = {
            "format_version": FORMAT_VERSION,
            "reduction": self.reduction,
            "variance_threshold": self.variance_threshold,
            "n_levels": len(self.moments_),
            "threshold": self.threshold_,
            "metadata": metadata or {},
        }
        return write_arrays(path, arrays, "gaussian_ad", header)

    @classmethod
    def load(cls, path: str | Path) -> GaussianAD:
        """Read a model written by :meth:`save`; ``metadata_`` holds the saved metadata."""
        header, arrays = read_arrays(path, "gaussian_ad", FORMAT_VERSION, "gaussian-ad model")
        model = cls(header["reduction"], header["variance_threshold"])
        n_levels = header["n_levels"]
        raw = [Moments.from_arrays(arrays, f"level{i}.raw.") for i in range(n_levels)]
        if model.reduction is None:
            model.fit_moments(raw)
        else:
            model.raw_moments_ = raw
            model.n_features_in_ = [m.dim for m in raw]
            model.components_ = [arrays[f"level{i}.components"] for i in range(n_levels)]
            model.pca_means_ = [arrays[f"level{i}.pca_mean"] for i in range(n_levels)]
            model.fit_moments(
                [Moments.from_arrays(arrays, f"level{i}.fit.") for i in range(n_levels)]
            )
        model.threshold_ = header["threshold"]
        model.metadata_ = header["metadata"]
        return model


def _as_level_list(levels: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(levels, np.ndarray):
        raise TypeError("levels must be a sequence of (n, d_l) arrays, one per level")
    out = [np.asarray(x) for x in levels]
    for x in out:
        if x.ndim != 2:
            raise ValueError(f"each level must be a 2-D (n, d) array, got shape {x.shape}")
    if len({x.shape[0] for x in out}) > 1:
        raise ValueError(f"levels have different image counts: {[x.shape[0] for x in out]}")
    return out
