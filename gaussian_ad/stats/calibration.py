"""Calibration: the chosen score from image and patch scores, and its decision threshold.

One implementation for every caller (the CLI, the training flow, the selection): held-out
normal images' scores fit the fused score's :class:`Standardizer` (whenever patch scores
exist, so every score kind can be compared) and the empirical threshold of the chosen
score at a target false-positive rate. The threshold lives here and nowhere else.

The calibration also keeps the normals' chosen scores (sorted; at most
``MAX_NORMAL_SCORES`` quantiles of them for larger sets), so that any score reads as a
normalised score in [0, 1]: the fraction of those held-out good images that scored lower
(0.99: above 99% of the good training images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from gaussian_ad.stats.fusion import LevelStandardizer, Standardizer, fuse, level_image_scores
from gaussian_ad.stats.thresholds import empirical_threshold

logger = logging.getLogger(__name__)

MAX_NORMAL_SCORES = 1001
"""The most normal scores a calibration keeps: larger sets keep this many evenly spaced
quantiles (probabilities 0, 0.001, ..., 1), so the normalised score is read off a
piecewise-linear empirical CDF within about 0.001 of the exact fraction."""


def combine(
    kind: str,
    image_scores: np.ndarray,
    patch_scores: np.ndarray | None,
    standardizer: Standardizer | None,
) -> np.ndarray:
    """The ``kind`` score ("image", "patch" or "fused") from the image and patch scores."""
    if kind == "image":
        return np.asarray(image_scores, dtype=np.float64)
    if patch_scores is None:
        raise ValueError(f"the {kind!r} score needs patch scores (a patch-level model)")
    if kind == "patch":
        return np.asarray(patch_scores, dtype=np.float64)
    if kind != "fused":
        raise ValueError(f"unknown score kind {kind!r}")
    if standardizer is None:
        raise ValueError("the fused score needs a standardiser: calibrate on held-out normals")
    return fuse(image_scores, patch_scores, standardizer)


@dataclass(frozen=True)
class Calibration:
    """The decision threshold of the chosen score and the fused score's standardiser.

    ``threshold`` is the empirical (1 - target_fpr) quantile of ``n_normals`` held-out
    normal images' chosen scores. ``normal_scores`` holds those scores, sorted (or, for
    more than ``MAX_NORMAL_SCORES`` normals, that many evenly spaced quantiles of them); it
    is None for calibrations saved before it existed, which then have no normalised score.
    ``levels``, when set, makes the image score the sum of the per-level distances'
    z-scores on the held-out normals (see :mod:`gaussian_ad.stats.fusion`); None keeps the
    paper's sum of the distances.
    """

    kind: str
    threshold: float
    target_fpr: float
    n_normals: int
    standardizer: Standardizer | None = None
    normal_scores: tuple[float, ...] | None = None
    levels: LevelStandardizer | None = None

    @classmethod
    def fit(
        cls,
        kind: str,
        image_scores: np.ndarray,
        patch_scores: np.ndarray | None,
        target_fpr: float,
        levels: LevelStandardizer | None = None,
    ) -> Calibration:
        """Calibrate on held-out normal images' image (and patch) scores; with ``levels``,
        ``image_scores`` are its standardised sums of those images' level distances."""
        image_scores = np.asarray(image_scores, dtype=np.float64)
        standardizer = None
        if patch_scores is not None:
            standardizer = Standardizer.fit(
                image_scores, patch_scores, image_in_z=levels is not None
            )
        chosen = combine(kind, image_scores, patch_scores, standardizer)
        threshold = empirical_threshold(chosen, target_fpr)
        calibration = cls(
            kind,
            threshold,
            float(target_fpr),
            int(chosen.size),
            standardizer,
            _kept_scores(chosen),
            levels,
        )
        if target_fpr < calibration.smallest_fpr:
            logger.warning(
                "%d normal images cannot resolve a false-positive rate of %g: the smallest "
                "they support is %.3g (1/n); the threshold is near their highest score",
                calibration.n_normals,
                target_fpr,
                calibration.smallest_fpr,
            )
        return calibration

    @property
    def smallest_fpr(self) -> float:
        """The smallest false-positive rate the calibration normals can tell apart: 1/n."""
        return 1.0 / self.n_normals

    def image_scores(self, level_scores: np.ndarray) -> np.ndarray:
        """(n,) image scores from (n, L) level distances: standardised with ``levels``, else
        the paper's sum."""
        return level_image_scores(level_scores, self.levels)

    def scores(self, image_scores: np.ndarray, patch_scores: np.ndarray | None) -> np.ndarray:
        """The chosen score of new images."""
        return combine(self.kind, image_scores, patch_scores, self.standardizer)

    @property
    def has_normalized(self) -> bool:
        """Whether :meth:`normalized` is available (False for calibrations saved before
        the normal scores were kept)."""
        return self.normal_scores is not None

    def normalized(self, scores: np.ndarray) -> np.ndarray:
        """(n,) normalised scores in [0, 1]: the fraction of the held-out normal images whose
        chosen score is lower than each score (NaN stays NaN).

        0.99 means "scores above 99% of the good training images" (held out of the fit);
        the threshold reads as about 1 - ``target_fpr``. With the normals' scores kept
        whole, this is exactly ``mean(normal_scores < score)``; with quantiles kept, it is
        interpolated between them.
        """
        if self.normal_scores is None:
            raise ValueError("this calibration keeps no normal scores (saved by an older version)")
        scores = np.asarray(scores, dtype=np.float64)
        kept = np.asarray(self.normal_scores)
        if self.n_normals == kept.size:
            fraction = np.searchsorted(kept, scores, side="left") / kept.size
        else:
            fraction = np.interp(scores, kept, np.linspace(0.0, 1.0, kept.size))
        return np.where(np.isnan(scores), np.nan, fraction)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` inverts it."""
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "n_normals": self.n_normals,
            "standardizer": None if self.standardizer is None else self.standardizer.to_dict(),
            "normal_scores": None if self.normal_scores is None else list(self.normal_scores),
            "levels": None if self.levels is None else self.levels.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """The calibration of :meth:`to_dict` (older dicts have no ``normal_scores`` or
        ``levels``)."""
        standardizer, normal_scores = data.get("standardizer"), data.get("normal_scores")
        levels = data.get("levels")
        return cls(
            kind=str(data["kind"]),
            threshold=float(data["threshold"]),
            target_fpr=float(data["target_fpr"]),
            n_normals=int(data["n_normals"]),
            standardizer=None if standardizer is None else Standardizer.from_dict(standardizer),
            normal_scores=None if normal_scores is None else tuple(float(v) for v in normal_scores),
            levels=None if levels is None else LevelStandardizer.from_dict(levels),
        )


def _kept_scores(chosen: np.ndarray) -> tuple[float, ...]:
    """The normal scores a calibration keeps: all of them sorted, or ``MAX_NORMAL_SCORES``
    evenly spaced quantiles of a larger set."""
    if chosen.size > MAX_NORMAL_SCORES:
        chosen = np.quantile(chosen, np.linspace(0.0, 1.0, MAX_NORMAL_SCORES))
    return tuple(float(v) for v in np.sort(chosen))
