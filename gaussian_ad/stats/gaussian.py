"""GaussianAD: per-level multivariate Gaussian with Ledoit-Wolf shrinkage, Mahalanobis score.

The estimator follows scikit-learn's estimator contract: keyword-only parameters stored
unchanged by ``__init__`` and validated when fitting, learned state in attributes ending
in ``_`` that exist only after fitting, :class:`~gaussian_ad.stats.estimator.NotFittedError` before
(scikit-learn itself is not imported: see :mod:`gaussian_ad.stats.estimator`).
Input is a sequence of feature arrays, one per level, each of shape (n, d_l).

PCA / NPCA follow the paper's reference exactly: per level, the components of
``sklearn.decomposition.PCA(n_components=None)`` (there are min(n, d) of them, so with
fewer images than dimensions the null space is absent); with c the cumulative
explained-variance ratio and k the first index where c > t, PCA keeps components
0..k and NPCA keeps components k-1..end (for k = 0 that is only the last component).
Features are projected without whitening, then modelled as above.

Degenerate training data (all images numerically identical, so that the covariance is
zero up to rounding) is rejected when fitting; see :func:`zero_variance`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
from threadpoolctl import threadpool_limits

from gaussian_ad.stats.arrayfile import model_file_errors, read_arrays, write_arrays
from gaussian_ad.stats.estimator import Estimator, NotFittedError, check_fitted
from gaussian_ad.stats.moments import BatchMoments, Moments, ledoit_wolf, shrunk_precision
from gaussian_ad.stats.thresholds import chi2_thresholds

REDUCTIONS = (None, "pca", "npca")
# 2: no "threshold" in the header (the detector's calibration owns it); 1 is still read.
FORMAT_VERSION = 2
# A row set counts as degenerate when trace(S) <= VARIANCE_RTOL * scale (see zero_variance).
VARIANCE_RTOL = 1e-13
# An in-memory fit of at most this many multiply-adds (sum of n d^2 over the levels) runs with
# one BLAS thread: its products are too small for threads to pay (on 2 busy cores, the 6 fits
# of an evaluation of 120 images at Lite0's levels took 0.3 s of CPU so, 0.8-1.0 s with two).
SMALL_FIT = 2e9
NOT_FITTED = "This %(name)s instance is not fitted yet: call 'fit' (or 'fit_moments') first."


def zero_variance(moments: Moments | BatchMoments) -> np.ndarray:
    """Whether a row set's total variance is zero up to rounding (one bool per set).

    With S the (biased) covariance, m the mean and s the shift the sums were accumulated
    around, a set is degenerate when::

        trace(S) <= VARIANCE_RTOL * (||m||^2 + E||x - s||^2),    VARIANCE_RTOL = 1e-13

    ``trace(S) = E||x - s||^2 - ||m - s||^2`` is evaluated from the stored sums, and its
    rounding error is a small multiple of eps * E||x - s||^2 (eps = 2.2e-16): below the
    tolerance the computed variance cannot be told from zero. The ``||m||^2`` term makes
    the test relative to the data's own magnitude (it is scale-invariant): rows whose RMS
    distance from their mean is below sqrt(1e-13) ~ 3e-7 of their RMS norm, i.e. that
    differ by a few float32 ulps at most, count as identical. All-zero data (0 <= 0) is
    degenerate. Data that differ by 1e-6 relative, or that span only a line (rank 1),
    are not: Ledoit-Wolf shrinkage makes their covariance positive definite.

    Returns a 0-d array for :class:`Moments` and one of shape (P,) for
    :class:`BatchMoments`.
    """
    n = moments.n
    spread = np.trace(moments.sum_yy, axis1=-2, axis2=-1) / n  # E||x - s||^2
    offset = moments.sum_y / n  # m - s
    trace = spread - np.einsum("...i,...i->...", offset, offset)
    mean = moments.shift + offset
    scale = np.einsum("...i,...i->...", mean, mean) + spread
    return np.asarray(trace <= VARIANCE_RTOL * scale)


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


class GaussianAD(Estimator):
    """Anomaly detector: one Gaussian per feature level, image score = summed Mahalanobis.

    Each level's features are modelled by their mean and scikit-learn's Ledoit-Wolf
    shrunk covariance, fitted from mergeable sufficient statistics (:class:`Moments`), so
    fits can stream over batches and incremental fits are exact. An image's level score is
    the unsquared Mahalanobis distance; its anomaly score is the sum over levels.

    Parameters
    ----------
    reduction : {None, "pca", "npca"}, default=None
        Optional per-level projection before the Gaussian (see the module docstring):
        None keeps all dimensions, "pca" the leading components, "npca" the trailing
        ones (negated PCA, the paper's best variant).
    variance_threshold : float, default=0.99
        The cumulative explained-variance ratio t, in (0, 1), that splits PCA from NPCA
        components. Validated even when ``reduction`` is None.

    Attributes
    ----------
    n_features_in_ : list of int
        Raw feature dimension of each level.
    raw_moments_ : list of Moments
        Sufficient statistics of the raw training features, one per level.
    components_ : list of ndarray of shape (k_l, d_l), or None
        The kept principal axes per level (rows); None without a reduction.
    pca_means_ : list of ndarray of shape (d_l,), or None
        The raw training mean per level that features are centred on before projecting;
        None without a reduction.
    moments_ : list of Moments
        Statistics of the training features in the model's (projected) space.
    means_ : list of ndarray of shape (k_l,)
        Mean per level, in the model's space.
    covariances_ : list of ndarray of shape (k_l, k_l)
        Ledoit-Wolf covariance per level.
    precisions_ : list of ndarray of shape (k_l, k_l)
        Inverse of each covariance (symmetrised; see :func:`shrunk_precision`).
    shrinkages_ : list of float
        Ledoit-Wolf shrinkage per level.
    n_samples_ : int
        Number of training images.
    dims_ : list of int
        Degrees of freedom per level: the dimension after any reduction (a property).
    metadata_ : dict
        Only on models read by :meth:`load`: the metadata passed to :meth:`save`.

    See Also
    --------
    gaussian_ad.stats.patch_gaussian.PatchGaussian : one Gaussian per patch position.

    Notes
    -----
    The decision threshold is not part of the model: calibrate one (e.g. with
    :func:`gaussian_ad.stats.thresholds.empirical_threshold` on held-out normal scores,
    or from :meth:`thresholds`) and pass it to :meth:`predict`.

    Training sets whose images are numerically identical at some level are rejected with
    a ValueError naming the level; the criterion is :func:`zero_variance`'s.

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.gaussian import GaussianAD
    >>> rng = np.random.default_rng(0)
    >>> train = [rng.normal(size=(200, 3)), rng.normal(size=(200, 5))]
    >>> model = GaussianAD().fit(train)
    >>> model
    GaussianAD()
    >>> model.dims_
    [3, 5]
    >>> test = [np.vstack([np.zeros(3), np.full(3, 4.0)]), np.zeros((2, 5))]
    >>> model.level_scores(test).shape
    (2, 2)
    >>> scores = model.anomaly_scores(test)
    >>> bool(scores[1] > scores[0])
    True
    >>> model.predict(test, threshold=5.0).tolist()
    [False, True]
    >>> np.round(model.thresholds(fpr=0.01), 3)
    array([3.368, 3.884])

    With a reduction, the Gaussian models the kept principal components:

    >>> npca = GaussianAD(reduction="npca", variance_threshold=0.9).fit(train)
    >>> [c.shape for c in npca.components_]
    [(2, 3), (2, 5)]
    """

    def __init__(self, *, reduction: str | None = None, variance_threshold: float = 0.99):
        self.reduction = reduction
        self.variance_threshold = variance_threshold

    def __sklearn_is_fitted__(self) -> bool:
        """Fitted once the Gaussians exist (:meth:`fit_components` alone is not enough)."""
        return hasattr(self, "means_")

    # ----------------------------------------------------------------- fitting
    def _check_params(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        threshold = self.variance_threshold
        if (
            not isinstance(threshold, numbers.Real)
            or isinstance(threshold, bool)
            or not 0.0 < threshold < 1.0
        ):
            raise ValueError(f"variance_threshold must lie in (0, 1), got {threshold!r}")

    def fit(self, levels: Sequence[np.ndarray]) -> Self:
        """Fit on in-memory features: a sequence of (n, d_l) arrays, one per level."""
        self._check_params()
        levels = _as_level_list(levels)
        work = sum(x.shape[0] * x.shape[1] ** 2 for x in levels)
        with threadpool_limits(1 if work <= SMALL_FIT else None, user_api="blas"):
            raw = [Moments.from_array(x) for x in levels]
            if self.reduction is None:
                return self._fit_moments(raw, rows=levels)
            self.fit_components(raw)
            projected = self.transform(levels)
            return self._fit_moments([Moments.from_array(z) for z in projected], rows=projected)

    def fit_components(self, raw_moments: Sequence[Moments]) -> Self:
        """First pass: store raw statistics and, with a reduction, choose the components.

        Without a reduction the raw statistics are all the fit needs; call
        :meth:`fit_moments` with the same statistics next. With a reduction, call
        :meth:`fit_moments` with statistics of ``transform(features)`` (a second pass),
        because the projected fourth moment that Ledoit-Wolf needs is not a function
        of the raw sums.

        Raises ValueError for invalid parameters, fewer than 2 images, or a level whose
        training images are numerically identical (see :func:`zero_variance`).
        """
        self._check_params()
        raw_moments = list(raw_moments)
        _check_training_moments(raw_moments)
        self.raw_moments_ = raw_moments
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
        """Fit the per-level Gaussians from statistics in the model's (projected) space.

        Raises ValueError for fewer than 2 images or a level with (numerically) zero
        variance: identical training images, or (with a reduction) zero variance on the
        kept components.
        """
        return self._fit_moments(list(moments))

    def _fit_moments(
        self,
        moments: list[Moments],
        precisions: list[np.ndarray] | None = None,
        rows: Sequence[np.ndarray] | None = None,
    ) -> Self:
        """:meth:`fit_moments`, with the precisions given (saved with the model: a load
        skips the inversions, the most expensive step of a model's start-up) or computed
        (the inverses of the Ledoit-Wolf covariances; from the statistics' ``rows`` where
        given, see :func:`shrunk_precision`)."""
        self._check_params()
        moments = list(moments)
        if self.reduction is None:
            self.fit_components(moments)
        elif getattr(self, "components_", None) is None:
            raise NotFittedError("with a reduction, call fit_components(raw statistics) first")
        else:
            _check_training_moments(moments, f"on the kept {self.reduction!r} components")
        if [m.dim for m in moments] != self.dims_expected():
            raise ValueError(
                f"statistics of dims {[m.dim for m in moments]}, expected {self.dims_expected()}"
            )
        means, covariances, shrinkages = [], [], []
        for m in moments:
            covariance, shrinkage = ledoit_wolf(m)
            means.append(m.mean)
            covariances.append(covariance)
            shrinkages.append(shrinkage)
        if precisions is None:
            fitted_rows = [None] * len(moments) if rows is None else rows
            precisions = [
                shrunk_precision(c, s, x)
                for c, s, x in zip(covariances, shrinkages, fitted_rows, strict=True)
            ]
        elif [p.shape for p in precisions] != [c.shape for c in covariances]:
            raise ValueError(
                f"saved precisions of shapes {[p.shape for p in precisions]} do not fit the "
                f"statistics' {[c.shape for c in covariances]}"
            )
        self.moments_ = moments
        self.means_, self.covariances_ = means, covariances
        self.precisions_, self.shrinkages_ = precisions, shrinkages
        self.n_samples_ = moments[0].n
        return self

    def dims_expected(self) -> list[int]:
        """Dimension of each level in the model's space (after any reduction)."""
        check_fitted(self, "n_features_in_", NOT_FITTED)
        if self.components_ is None:
            return list(self.n_features_in_)
        return [c.shape[0] for c in self.components_]

    @property
    def dims_(self) -> list[int]:
        """Degrees of freedom per level: the dimension after any reduction."""
        check_fitted(self, "means_", NOT_FITTED)
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
        """Project each level onto the kept components (identity without a reduction).

        Available after :meth:`fit_components` (the second pass of a two-pass fit).
        """
        check_fitted(self, "n_features_in_", NOT_FITTED)
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
        check_fitted(self, "means_", NOT_FITTED)
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

    def predict(self, levels: Sequence[np.ndarray], threshold: float) -> np.ndarray:
        """True where the summed score exceeds ``threshold`` (the detector's calibration)."""
        check_fitted(self, "means_", NOT_FITTED)
        if threshold is None:
            raise ValueError("threshold is required (e.g. calibrated on held-out normals)")
        return self.anomaly_scores(levels) > threshold

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write the model to one safetensors file (arrays + JSON metadata, no pickle)."""
        check_fitted(self, "means_", NOT_FITTED)
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for i, (raw, fitted) in enumerate(zip(self.raw_moments_, self.moments_, strict=True)):
            arrays.update(raw.to_arrays(f"level{i}.raw."))
            if self.components_ is not None:
                arrays.update(fitted.to_arrays(f"level{i}.fit."))
                arrays[f"level{i}.components"] = self.components_[i]
                arrays[f"level{i}.pca_mean"] = self.pca_means_[i]
            arrays[f"level{i}.precision"] = self.precisions_[i]
        header = {
            "format_version": FORMAT_VERSION,
            "reduction": self.reduction,
            "variance_threshold": self.variance_threshold,
            "n_levels": len(self.moments_),
            "metadata": metadata or {},
        }
        return write_arrays(path, arrays, "gaussian_ad", header)

    @classmethod
    def load(cls, path: str | Path) -> GaussianAD:
        """Read a model written by :meth:`save`; ``metadata_`` holds the saved metadata.

        Files of format 1 may carry a ``threshold``; it is ignored (thresholds belong to
        the detector's calibration). The saved precisions are used as they are (files
        without them are inverted again).
        """
        what = "gaussian-ad model"
        header, arrays = read_arrays(path, "gaussian_ad", FORMAT_VERSION, what)
        with model_file_errors(path, what):
            model = cls(
                reduction=header["reduction"], variance_threshold=header["variance_threshold"]
            )
            n_levels = header["n_levels"]
            raw = [Moments.from_arrays(arrays, f"level{i}.raw.") for i in range(n_levels)]
            saved = [arrays.get(f"level{i}.precision") for i in range(n_levels)]
            precisions = (
                None
                if any(p is None for p in saved)
                else [np.asarray(p, dtype=np.float64) for p in saved]
            )
            if model.reduction is None:
                model._fit_moments(raw, precisions)
            else:
                model.raw_moments_ = raw
                model.n_features_in_ = [m.dim for m in raw]
                model.components_ = [arrays[f"level{i}.components"] for i in range(n_levels)]
                model.pca_means_ = [arrays[f"level{i}.pca_mean"] for i in range(n_levels)]
                fitted = [Moments.from_arrays(arrays, f"level{i}.fit.") for i in range(n_levels)]
                model._fit_moments(fitted, precisions)
            model.metadata_ = dict(header["metadata"])
        return model


def _check_training_moments(moments: Sequence[Moments], where: str | None = None) -> None:
    """At least 2 images, and no level with (numerically) zero variance (named 1-based).

    ``where`` describes projected statistics; None means raw features, for which zero
    variance means the training images are identical.
    """
    for level, m in enumerate(moments, start=1):
        if m.n < 2:
            raise ValueError(f"need at least 2 training images, got {m.n}")
        if zero_variance(m):
            if where is None:
                what = "the training images are (numerically) identical"
                fix = "a Gaussian needs training images that differ"
            else:
                what = f"the training features have (numerically) zero variance {where}"
                fix = "use another reduction or variance_threshold"
            raise ValueError(
                f"level {level} of {len(moments)}: {what} (trace of the covariance at most "
                f"{VARIANCE_RTOL:g} x the features' mean squared norm); {fix}"
            )


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
