"""Patch-level Gaussians on patch features: per grid position, or pooled, and anomaly maps.

Per position, the model is the image-level one of Rippel et al.: the mean and scikit-learn's
Ledoit-Wolf covariance, fitted from mergeable sums (:class:`BatchMoments`) accumulated batch
by batch, so memory does not depend on the number of images and incremental fits are exact.
A position's score is the (unsquared) Mahalanobis distance. The anomaly map is the score
grid upsampled bilinearly to the input size and smoothed by a Gaussian as wide as one grid
cell (PaDiM's sigma of 4 px is one cell of its stride-4 grid at 224 px; the default grid here
has stride 8, so 8 px); its maximum is the patch-level image score. How patch features are
cut from a backbone is :mod:`gaussian_ad.features.patches`' concern, and the patch layout is
the detector's; this model sees only (n, P, d) arrays.

Memory (float64 statistics, d = 100): each (P, d, d) array takes P * 80 kB; 14 x 14: 16 MB,
28 x 28: 63 MB, 56 x 56: 251 MB. A fitted per-position model holds two of them (the sums
and the precisions), a position-free one a (1, d, d) of each; a streaming fit peaks at about
three (the running sums, a batch's sums and their total) plus one batch of features.

Pooling (``pool_radius``). PaDiM's per-position model assumes every image puts the same
part at the same place. For products that move (loose parts, a tray of pieces), each
position's Gaussian can instead pool the sums of its neighbours within r grid cells, or of
every position (``None``: one position-free Gaussian over all patches). The pooling is a sum
of the per-position statistics, so the fit stays exact, mergeable and subtractable.

The per-position linear algebra runs on many small matrices; it runs with one BLAS thread,
which on a busy machine is an order of magnitude faster than several.
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path
from typing import Any, Self

import numpy as np
from threadpoolctl import threadpool_limits

from gaussian_ad.stats.arrayfile import model_file_errors, read_arrays, write_arrays
from gaussian_ad.stats.estimator import Estimator, check_fitted
from gaussian_ad.stats.gaussian import NOT_FITTED, VARIANCE_RTOL, zero_variance
from gaussian_ad.stats.moments import BatchMoments, shrunk_precision

FORMAT_VERSION = 2
POSITIONS_PER_CHUNK = 256  # positions per Ledoit-Wolf / inverse step (bounds temporaries)


def pool_positions(moments: BatchMoments, radius: int | None) -> BatchMoments:
    """Each position's statistics pooled with its neighbours' (exact sums).

    ``radius`` 0 returns ``moments``; r > 0 gives every position the rows of the
    (2r + 1) x (2r + 1) positions around it (edge positions repeated, so every window holds
    (2r + 1)^2 positions' rows); None pools every position into one set (a position-free
    model: one Gaussian for all patches). All sets are first re-expressed around one shift.

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.moments import BatchMoments
    >>> from gaussian_ad.stats.patch_gaussian import pool_positions
    >>> x = np.random.default_rng(0).normal(size=(5, 9, 2))  # 5 images, 3 x 3 grid
    >>> pooled = pool_positions(BatchMoments.from_array(x), None)
    >>> pooled.n, pooled.n_sets, bool(np.allclose(pooled.mean[0], x.reshape(-1, 2).mean(0)))
    (45, 1, True)
    >>> pool_positions(BatchMoments.from_array(x), 1).n
    45
    """
    if radius == 0:
        return moments
    common = moments.mean.mean(axis=0)
    same = moments.reshifted(np.broadcast_to(common, moments.shift.shape))
    sums = (same.sum_y, same.sum_yy, same.sum_y2y, same.sum_y4)
    if radius is None:
        pooled = [a.sum(axis=0, keepdims=True) for a in sums]
        return BatchMoments(moments.n * moments.n_sets, common[None].copy(), *pooled)
    grid = math.isqrt(moments.n_sets)
    window = 2 * radius + 1

    from scipy.ndimage import uniform_filter  # only here: not a cost of every import

    def box_sum(values: np.ndarray) -> np.ndarray:
        tiled = values.reshape(grid, grid, *values.shape[1:])
        size = (window, window) + (1,) * (values.ndim - 1)
        summed = uniform_filter(tiled, size=size, mode="nearest") * window**2
        return summed.reshape(values.shape)

    pooled = [box_sum(a) for a in sums]
    shift = np.broadcast_to(common, moments.shift.shape).copy()
    return BatchMoments(moments.n * window**2, shift, *pooled)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of a 1-D bilinear resize with half-pixel centres.

    The source coordinate of output pixel i is (i + 0.5) * n_in / n_out - 0.5, clamped at 0,
    and edges are repeated: ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` along one axis.
    """
    source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, None)
    low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    weight = source - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(n_out), high), weight)
    return matrix


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian filter of ``sigma`` samples with mirrored edges.

    The same as ``scipy.ndimage.gaussian_filter1d(mode="reflect", truncate=4.0)``: weights
    exp(-k^2 / 2 sigma^2) for |k| <= int(truncate * sigma + 0.5), normalised, and samples
    beyond an edge read back from it (d c b a | a b c d | d c b a). sigma 0: the identity.
    """
    if sigma == 0:
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    source = np.mod(np.arange(n)[:, None] + offsets, 2 * n)
    source = np.where(source >= n, 2 * n - 1 - source, source)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (np.repeat(np.arange(n), offsets.size), source.ravel()), np.tile(weights, n))
    return matrix


@functools.lru_cache(maxsize=16)
def _map_matrix(grid: int, size: int, sigma: float) -> np.ndarray:
    """(size, grid): bilinear upsampling then Gaussian smoothing, along one axis."""
    matrix = gaussian_matrix(size, sigma) @ bilinear_matrix(grid, size)
    matrix.flags.writeable = False
    return matrix


def upsample_bilinear(grids: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(B, h, w) -> (B, H, W) float64 bilinear resize with half-pixel centres.

    ``size`` is H = W, or (H, W). The same as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (without
    ``scale_factor``), up or down (see :func:`bilinear_matrix`).

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.patch_gaussian import upsample_bilinear
    >>> upsample_bilinear(np.array([[[0.0, 1.0]]]), (1, 4))
    array([[[0.  , 0.25, 0.75, 1.  ]]])
    >>> upsample_bilinear(np.ones((2, 3, 5)), 7).shape
    (2, 7, 7)
    """
    out_h, out_w = (size, size) if isinstance(size, numbers.Integral) else size
    grids = np.asarray(grids, dtype=np.float64)
    if grids.ndim != 3:
        raise ValueError(f"expected (B, h, w) grids, got shape {grids.shape}")
    rows = bilinear_matrix(grids.shape[1], int(out_h))
    columns = bilinear_matrix(grids.shape[2], int(out_w))
    return rows @ grids @ columns.T


class PatchGaussian(Estimator):
    """Per-position Gaussian with Ledoit-Wolf shrinkage on (n, P, d) patch features.

    Every one of the P = grid x grid positions gets its own mean and scikit-learn
    Ledoit-Wolf covariance, fitted from mergeable sums; a position's score is the
    unsquared Mahalanobis distance, and the anomaly map is the upsampled, smoothed score
    grid (PaDiM).

    Parameters
    ----------
    sigma : float or None, default=None
        Standard deviation, in output pixels, of the Gaussian that smooths the anomaly
        maps; finite and >= 0 (0 does not smooth). None: one grid cell of the output,
        ``size / grid_`` (PaDiM's 4 px is one cell of its 56 x 56 grid at 224 px). Bilinear
        upsampling leaves ridges at the cell scale; a cell-wide Gaussian removes them at any
        input side and grid, where a fixed width in pixels would not.
    pool_radius : int or None, default=0
        Which training patches each position's Gaussian is fitted on. 0: the patches at
        that position only (PaDiM; assumes aligned images). r > 0: the patches within r
        grid cells of it (tolerates shifts of about r cells). None: the patches of every
        position, one Gaussian for all (position-free: for products that are not aligned,
        such as loose parts in a tray). Merges and leave-fold-out subtractions stay exact
        whatever the pooling: they act on the sums.

    Attributes
    ----------
    moments_ : BatchMoments
        The training sums: one row set per position (before pooling), or with
        ``pool_radius=None`` the one pooled set (all a position-free model needs: 1/P of
        the size, 100 kB instead of 155 MB for a 44 x 44 grid at d = 100).
    grid_ : int
        Side of the square grid of positions: P = grid_ ** 2.
    means_ : ndarray of shape (P, d), or (1, d) with ``pool_radius=None``
        Mean per position.
    precisions_ : ndarray of shape (P, d, d), or (1, d, d) with ``pool_radius=None``
        Inverse Ledoit-Wolf covariance per position (symmetrised).
    shrinkages_ : ndarray of shape (P,), or (1,) with ``pool_radius=None``
        Ledoit-Wolf shrinkage per position.
    n_samples_ : int
        Number of training images.
    covariances_ : ndarray of shape (P, d, d), or (1, d, d) with ``pool_radius=None``
        Ledoit-Wolf covariances, recomputed from the sums on access (a property).
    metadata_ : dict
        Only on models read by :meth:`load`: the metadata passed to :meth:`save`.

    See Also
    --------
    gaussian_ad.stats.gaussian.GaussianAD : one Gaussian per image-level feature level.

    Notes
    -----
    Training sets whose images are numerically identical at some position are rejected
    with a ValueError naming the position; the criterion is
    :func:`gaussian_ad.stats.gaussian.zero_variance`'s.

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.patch_gaussian import PatchGaussian
    >>> rng = np.random.default_rng(0)
    >>> train = rng.normal(size=(40, 16, 3))  # 40 images, a 4 x 4 grid, 3 channels
    >>> model = PatchGaussian(sigma=1.0).fit(train)
    >>> model
    PatchGaussian(sigma=1.0)
    >>> model.grid_, model.means_.shape, model.precisions_.shape
    (4, (16, 3), (16, 3, 3))
    >>> test = rng.normal(size=(2, 16, 3))
    >>> test[1, 5] += 10.0  # one anomalous patch in the second image: row 1, column 1
    >>> model.score_maps(test).shape
    (2, 4, 4)
    >>> scores, maps = model.anomaly_maps(test, size=32)
    >>> maps.shape, maps.dtype
    ((2, 32, 32), dtype('float32'))
    >>> bool(scores[1] > scores[0])
    True
    >>> row, column = np.unravel_index(maps[1].argmax(), maps[1].shape)
    >>> int(row) // 8, int(column) // 8  # each grid cell covers 8 x 8 output pixels
    (1, 1)
    """

    def __init__(self, *, sigma: float | None = None, pool_radius: int | None = 0):
        self.sigma = sigma
        self.pool_radius = pool_radius

    def __sklearn_is_fitted__(self) -> bool:
        """Fitted once the per-position Gaussians exist."""
        return hasattr(self, "means_")

    def _check_params(self) -> None:
        sigma = self.sigma
        if sigma is not None and (
            not isinstance(sigma, numbers.Real)
            or isinstance(sigma, bool)
            or not math.isfinite(sigma)
            or sigma < 0
        ):
            raise ValueError(f"sigma must be a finite number >= 0 or None, got {sigma!r}")
        radius = self.pool_radius
        if radius is not None and (
            not isinstance(radius, numbers.Integral) or isinstance(radius, bool) or radius < 0
        ):
            raise ValueError(f"pool_radius must be an integer >= 0 or None, got {radius!r}")

    # ----------------------------------------------------------------- fitting
    def fit(self, features: np.ndarray) -> Self:
        """Fit on in-memory (n, P, d) features."""
        self._check_params()
        return self.fit_moments(BatchMoments.from_array(features))

    def fit_moments(self, moments: BatchMoments, grid: int | None = None) -> Self:
        """Fit every position's Gaussian from statistics (exactly sklearn's LedoitWolf).

        ``moments`` hold one row set per position of a square grid (``grid`` defaults to
        its side) or, for a position-free model, the pooled set of :meth:`kept_moments`
        (then ``grid`` is required). Raises ValueError for invalid parameters, fewer than
        2 images, a non-square number of positions, or a position whose training images
        are numerically identical.
        """
        self._check_params()
        n_images = moments.n
        if grid is None:
            grid = math.isqrt(moments.n_sets)
            if grid * grid != moments.n_sets:
                raise ValueError(f"{moments.n_sets} positions do not form a square grid")
        elif moments.n_sets == 1 and grid > 1 and self.pool_radius is None:
            n_images, left = divmod(moments.n, grid * grid)
            if left:
                raise ValueError(f"pooled sums of {moments.n} rows: not {grid}x{grid} per image")
        elif moments.n_sets != grid * grid:
            raise ValueError(f"{moments.n_sets} positions, but a {grid}x{grid} grid")
        if n_images < 2:
            raise ValueError(f"need at least 2 training images, got {n_images}")
        raw, moments = moments, pool_positions(moments, self.pool_radius)
        degenerate = np.flatnonzero(zero_variance(moments))
        if degenerate.size and moments.n_sets == 1:
            raise ValueError(
                "the training images' patches are (numerically) all identical: a Gaussian "
                "needs training images that differ"
            )
        if degenerate.size:
            first = int(degenerate[0])
            raise ValueError(
                f"the training images are (numerically) identical at {degenerate.size} of "
                f"{moments.n_sets} grid positions, the first at position {first} (row "
                f"{first // grid}, column {first % grid}, 0-based): trace of the covariance at "
                f"most {VARIANCE_RTOL:g} x the features' mean squared norm; a Gaussian needs "
                "training images that differ"
            )
        precisions = np.empty_like(moments.sum_yy)
        shrinkages = np.empty(moments.n_sets)
        with threadpool_limits(1, user_api="blas"):
            for start in range(0, moments.n_sets, POSITIONS_PER_CHUNK):
                chunk = slice(start, start + POSITIONS_PER_CHUNK)
                covariance, shrinkages[chunk] = moments.take(chunk).ledoit_wolf()
                precisions[chunk] = shrunk_precision(covariance)
        self.moments_ = moments if self.pool_radius is None else raw
        self.grid_ = grid
        self.means_ = moments.mean
        self.precisions_ = precisions
        self.shrinkages_ = shrinkages
        self.n_samples_ = n_images
        return self

    def kept_moments(self, moments: BatchMoments) -> BatchMoments:
        """Per-position sums as this model keeps them: pooled into one set when it is
        position-free, else as given. Sums of kept parts (and differences) stay exact."""
        return pool_positions(moments, None) if self.pool_radius is None else moments

    @property
    def covariances_(self) -> np.ndarray:
        """Ledoit-Wolf covariances (P, d, d), recomputed from the sums (not kept in memory)."""
        check_fitted(self, "means_", NOT_FITTED)
        return pool_positions(self.moments_, self.pool_radius).ledoit_wolf()[0]

    def partial_fit(self, features: np.ndarray) -> Self:
        """Merge new normal (n, P, d) features into the statistics and refit (exact)."""
        per_position = hasattr(self, "moments_") and self.pool_radius is not None
        shift = self.moments_.shift if per_position else None
        return self.merge_moments(BatchMoments.from_array(features, shift))

    def merge_moments(self, moments: BatchMoments) -> Self:
        """Merge per-position statistics of new images and refit (or fit, when not fitted)."""
        if not hasattr(self, "moments_"):
            return self.fit_moments(moments)
        if moments.n_sets != self.grid_**2:
            raise ValueError(
                f"statistics of {moments.n_sets} positions, the model has {self.grid_}x{self.grid_}"
            )
        return self.fit_moments(self.moments_ + self.kept_moments(moments), grid=self.grid_)

    # ----------------------------------------------------------------- scoring
    def score_maps(self, features: np.ndarray) -> np.ndarray:
        """Unsquared Mahalanobis distance per position: (B, grid, grid) float64."""
        check_fitted(self, "means_", NOT_FITTED)
        features = np.asarray(features)
        expected = (self.grid_**2, self.means_.shape[-1])
        if features.ndim != 3 or features.shape[1:] != expected:
            raise ValueError(f"features of shape {features.shape}, expected (B, *{expected})")
        diff = features.astype(np.float64).transpose(1, 0, 2) - self.means_[:, None, :]
        with threadpool_limits(1, user_api="blas"):
            squared = np.einsum("pbi,pbi->bp", diff @ self.precisions_, diff)
        distances = np.sqrt(np.clip(squared, 0.0, None))
        return distances.reshape(len(features), self.grid_, self.grid_)

    def anomaly_maps(self, features: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(image scores (B,) float64, anomaly maps (B, size, size) float32).

        The score grid is upsampled bilinearly (align_corners=False) to size x size and
        smoothed with a Gaussian of ``sigma`` pixels (None: ``size / grid_``, one cell); an
        image's score is its map's maximum.
        """
        return self.maps_of(self.score_maps(features), size)

    def maps_of(self, score_grids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`anomaly_maps` from (B, grid, grid) grids of :meth:`score_maps`."""
        axis = self.map_matrix(size)
        with threadpool_limits(1, user_api="blas"):
            maps = axis @ score_grids @ axis.T
        return maps.reshape(len(maps), -1).max(axis=1), maps.astype(np.float32)

    def map_matrix(self, size: int) -> np.ndarray:
        """(size, grid_) read-only float64: the score grid's bilinear upsampling to
        size x size and Gaussian smoothing (``sigma`` pixels; None: one cell), along one
        axis. An anomaly map is ``A @ score_map @ A.T``."""
        check_fitted(self, "means_", NOT_FITTED)
        self._check_params()  # sigma is used here, so a set_params after fit is checked too
        sigma = size / self.grid_ if self.sigma is None else float(self.sigma)
        # Upsampling and smoothing are linear: one (size, grid) matrix per axis does both
        # (scipy's gaussian_filter on the upsampled map, in two small products).
        return _map_matrix(self.grid_, int(size), sigma)

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """One safetensors file: the sums (arrays) + sigma, metadata (JSON); no pickle."""
        check_fitted(self, "means_", NOT_FITTED)
        path = Path(path)
        header = {
            "format_version": FORMAT_VERSION,
            "sigma": self.sigma,
            "pool_radius": self.pool_radius,
            "grid": self.grid_,
            "metadata": metadata or {},
        }
        return write_arrays(path, self.moments_.to_arrays("moments."), "gaussian_ad_patch", header)

    @classmethod
    def load(cls, path: str | Path) -> PatchGaussian:
        """Read a model written by :meth:`save` (refits from the sums: identical results).

        Format 1 files also carry a patch layout; it is ignored (the detector owns it).
        """
        what = "patch-level model"
        header, arrays = read_arrays(path, "gaussian_ad_patch", FORMAT_VERSION, what)
        with model_file_errors(path, what):
            model = cls(sigma=header["sigma"], pool_radius=header.get("pool_radius", 0))
            model.fit_moments(BatchMoments.from_arrays(arrays, "moments."), header.get("grid"))
            model.metadata_ = dict(header["metadata"])
        return model
