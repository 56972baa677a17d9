"""Mergeable sufficient statistics for a Gaussian with Ledoit-Wolf shrinkage.

Every quantity the fit needs is a sum over images, accumulated in float64 around a
shift ``s`` (``y = x - s``):

- ``n``: the count,
- ``sum_y``: sum of y,
- ``sum_yy``: sum of y y^T,
- ``sum_y2y``: sum of ||y||^2 y,
- ``sum_y4``: sum of ||y||^4.

The last two are what scikit-learn's Ledoit-Wolf shrinkage needs beyond the
covariance: it uses sum_k ||x_k - mean||^4, which expands into these sums. Two
partials with different shifts merge exactly after re-expressing one around the
other's shift (a closed-form update), so partials can be reduced in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a set of d-dimensional rows, around ``shift``."""

    n: int
    shift: np.ndarray
    sum_y: np.ndarray
    sum_yy: np.ndarray
    sum_y2y: np.ndarray
    sum_y4: float

    @property
    def dim(self) -> int:
        """Number of feature dimensions."""
        return self.shift.shape[0]

    @classmethod
    def empty(cls, dim: int, shift: np.ndarray | None = None) -> Moments:
        """Statistics of zero rows."""
        shift = np.zeros(dim) if shift is None else np.asarray(shift, dtype=np.float64)
        return cls(0, shift, np.zeros(dim), np.zeros((dim, dim)), np.zeros(dim), 0.0)

    @classmethod
    def from_array(cls, x: np.ndarray, shift: np.ndarray | None = None) -> Moments:
        """Statistics of the rows of ``x`` (n, d); the shift defaults to their mean."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array of rows, got shape {x.shape}")
        if x.shape[0] == 0:
            return cls.empty(x.shape[1], shift)
        if shift is None:
            shift = x.mean(axis=0, dtype=np.float64)
        shift = np.asarray(shift, dtype=np.float64)
        y = x.astype(np.float64) - shift
        sq = np.einsum("ij,ij->i", y, y)
        return cls(
            n=int(x.shape[0]),
            shift=shift,
            sum_y=y.sum(axis=0),
            sum_yy=y.T @ y,
            sum_y2y=sq @ y,
            sum_y4=float(sq @ sq),
        )

    def reshifted(self, shift: np.ndarray) -> Moments:
        """The same statistics expressed around another shift (exact, closed form)."""
        shift = np.asarray(shift, dtype=np.float64)
        delta = self.shift - shift  # y' = y + delta
        n, sy, syy = self.n, self.sum_y, self.sum_yy
        dd = float(delta @ delta)
        s_sq = float(np.trace(syy))  # sum ||y||^2
        d_sy = float(delta @ sy)
        syy_d = syy @ delta
        sum_yy = syy + np.outer(delta, sy) + np.outer(sy, delta) + n * np.outer(delta, delta)
        sum_y2y = self.sum_y2y + 2.0 * syy_d + dd * sy + delta * (s_sq + 2.0 * d_sy + n * dd)
        sum_y4 = (
            self.sum_y4
            + 4.0 * float(delta @ syy_d)
            + n * dd * dd
            + 4.0 * float(delta @ self.sum_y2y)
            + 2.0 * dd * s_sq
            + 4.0 * dd * d_sy
        )
        return Moments(n, shift, sy + n * delta, sum_yy, sum_y2y, sum_y4)

    def __add__(self, other: Moments) -> Moments:
        """Statistics of the union of both row sets (associative, commutative)."""
        if not isinstance(other, Moments):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        # Keep the shift of the larger partial; it is the better centre for both.
        big, small = (self, other) if self.n >= other.n else (other, self)
        small = small.reshifted(big.shift)
        return Moments(
            big.n + small.n,
            big.shift,
            big.sum_y + small.sum_y,
            big.sum_yy + small.sum_yy,
            big.sum_y2y + small.sum_y2y,
            big.sum_y4 + small.sum_y4,
        )

    def __radd__(self, other: object) -> Moments:
        """Allow ``sum(partials)`` (which starts from 0)."""
        if other == 0:
            return self
        return NotImplemented

    @property
    def mean(self) -> np.ndarray:
        """Mean of the rows."""
        self._require_rows()
        return self.shift + self.sum_y / self.n

    @property
    def covariance(self) -> np.ndarray:
        """Maximum-likelihood (biased, divide by n) covariance of the rows."""
        self._require_rows()
        c = self.sum_y / self.n
        return self.sum_yy / self.n - np.outer(c, c)

    @property
    def centred_fourth_moment(self) -> float:
        """sum_k ||x_k - mean||^4, expanded from the stored sums."""
        self._require_rows()
        n, c = self.n, self.sum_y / self.n
        cc = float(c @ c)
        s_sq = float(np.trace(self.sum_yy))
        return (
            self.sum_y4
            + 4.0 * float(c @ self.sum_yy @ c)
            + n * cc * cc
            - 4.0 * float(c @ self.sum_y2y)
            + 2.0 * cc * s_sq
            - 4.0 * cc * float(c @ self.sum_y)
        )

    def _require_rows(self) -> None:
        if self.n == 0:
            raise ValueError("no rows: statistics of an empty set have no mean or covariance")

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Flat arrays for saving (no pickle)."""
        return {
            f"{prefix}n": np.array([self.n], dtype=np.int64),
            f"{prefix}shift": self.shift,
            f"{prefix}sum_y": self.sum_y,
            f"{prefix}sum_yy": self.sum_yy,
            f"{prefix}sum_y2y": self.sum_y2y,
            f"{prefix}sum_y4": np.array([self.sum_y4], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> Moments:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            n=int(np.ravel(arrays[f"{prefix}n"])[0]),
            shift=np.asarray(arrays[f"{prefix}shift"], dtype=np.float64),
            sum_y=np.asarray(arrays[f"{prefix}sum_y"], dtype=np.float64),
            sum_yy=np.asarray(arrays[f"{prefix}sum_yy"], dtype=np.float64),
            sum_y2y=np.asarray(arrays[f"{prefix}sum_y2y"], dtype=np.float64),
            sum_y4=float(np.ravel(arrays[f"{prefix}sum_y4"])[0]),
        )


def ledoit_wolf(moments: Moments) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance and shrinkage, exactly as ``sklearn.covariance.LedoitWolf``.

    Shrinkage target is mu * I with mu = trace(S) / d, S the biased empirical covariance.
    """
    n, d = moments.n, moments.dim
    emp_cov = moments.covariance
    if d == 1:
        # scikit-learn special-cases one feature: no shrinkage.
        return emp_cov, 0.0
    trace = float(np.trace(emp_cov))
    mu = trace / d
    delta_ = float(np.sum(emp_cov * emp_cov))
    beta = (moments.centred_fourth_moment / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    shrunk = (1.0 - shrinkage) * emp_cov
    shrunk.flat[:: d + 1] += shrinkage * mu
    return shrunk, shrinkage
