"""Calibration: the chosen score from image and patch scores, and its decision threshold.

One implementation for every caller (the CLI, the training flow, the selection): held-out
normal images' scores fit the fused score's :class:`Standardizer` (whenever patch scores
exist, so every score kind can be compared) and the empirical threshold of the chosen
score at a target false-positive rate. The threshold lives here and nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from gaussian_ad.stats.fusion import Standardizer, fuse
from gaussian_ad.stats.thresholds import empirical_threshold

logger = logging.getLogger(__name__)


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
    normal images' chosen scores.
    """

    kind: str
    threshold: float
    target_fpr: float
    n_normals: int
    standardizer: Standardizer | None = None

    @classmethod
    def fit(
        cls,
        kind: str,
        image_scores: np.ndarray,
        patch_scores: np.ndarray | None,
        target_fpr: float,
    ) -> Calibration:
        """Calibrate on held-out normal images' image (and patch) scores."""
        image_scores = np.asarray(image_scores, dtype=np.float64)
        standardizer = (
            None if patch_scores is None else Standardizer.fit(image_scores, patch_scores)
        )
        chosen = combine(kind, image_scores, patch_scores, standardizer)
        threshold = empirical_threshold(chosen, target_fpr)
        calibration = cls(kind, threshold, float(target_fpr), int(chosen.size), standardizer)
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

    def scores(self, image_scores: np.ndarray, patch_scores: np.ndarray | None) -> np.ndarray:
        """The chosen score of new images."""
        return combine(self.kind, image_scores, patch_scores, self.standardizer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` inverts it."""
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "n_normals": self.n_normals,
            "standardizer": None if self.standardizer is None else self.standardizer.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        standardizer = data.get("standardizer")
        return cls(
            kind=str(data["kind"]),
            threshold=float(data["threshold"]),
            target_fpr=float(data["target_fpr"]),
            n_normals=int(data["n_normals"]),
            standardizer=None if standardizer is None else Standardizer.from_dict(standardizer),
        )
