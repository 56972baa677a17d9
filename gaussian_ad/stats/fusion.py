"""Score fusion: the sum of z-scores of the image-level and patch-level scores.

Each score is standardised with the mean and standard deviation (ddof=1) of its values on
held-out normal images, so neither dominates the sum by its scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Standardizer:
    """Means and standard deviations of the two scores on held-out normal images."""

    image_mean: float
    image_std: float
    patch_mean: float
    patch_std: float

    @classmethod
    def fit(cls, image_scores: np.ndarray, patch_scores: np.ndarray) -> Standardizer:
        """Fit on held-out normal images' scores (at least 2 images)."""
        stats = []
        for name, scores in (("image", image_scores), ("patch", patch_scores)):
            scores = np.asarray(scores, dtype=np.float64)
            if scores.size < 2:
                raise ValueError(f"need at least 2 held-out {name} scores, got {scores.size}")
            std = float(scores.std(ddof=1))
            if not std > 0.0:
                raise ValueError(f"held-out {name} scores have no spread (std {std})")
            stats += [float(scores.mean()), std]
        return cls(*stats)

    def to_dict(self) -> dict[str, float]:
        """JSON-ready: four floats."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Standardizer:
        return cls(
            **{k: float(data[k]) for k in ("image_mean", "image_std", "patch_mean", "patch_std")}
        )


def fuse(
    image_scores: np.ndarray, patch_scores: np.ndarray, standardizer: Standardizer
) -> np.ndarray:
    """(n,) fused score: the sum of both scores' z-scores."""
    image = (
        np.asarray(image_scores, np.float64) - standardizer.image_mean
    ) / standardizer.image_std
    patch = (
        np.asarray(patch_scores, np.float64) - standardizer.patch_mean
    ) / standardizer.patch_std
    if image.shape != patch.shape:
        raise ValueError(f"image scores {image.shape} and patch scores {patch.shape} differ")
    return image + patch
