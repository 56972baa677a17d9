"""What scoring returns: per-level, image, patch and chosen scores of a set of images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gaussian_ad.data.images import ImageError


@dataclass
class Scores:
    """Scores of the images that decoded; ``index`` maps rows back to the inputs.

    ``scores`` is the detector's chosen score (None for the fused score before
    calibration); ``is_anomaly`` is None when the detector has no threshold.
    ``normalized`` is the chosen score as the fraction of the calibration's held-out
    normal images that scored lower, in [0, 1] (0.99: above 99% of the good training
    images); None without a calibration, or with one saved before it kept its normals'
    scores. ``image`` is the image score of the calibration that decided them (see
    :attr:`image_scores`).
    """

    index: np.ndarray
    level_scores: np.ndarray  # (n, L) image-level Mahalanobis per level
    patch_scores: np.ndarray | None = None  # (n,) anomaly-map maxima, with a patch model
    maps: np.ndarray | None = None  # (n, S, S) float32 anomaly maps, when asked for
    scores: np.ndarray | None = None
    is_anomaly: np.ndarray | None = None
    errors: list[ImageError] = field(default_factory=list)
    normalized: np.ndarray | None = None
    image: np.ndarray | None = None

    @property
    def image_scores(self) -> np.ndarray:
        """The image score: ``image`` when set (a calibrated detector's decision sets it:
        standardised or summed levels), else the paper's sum of the per-level distances."""
        return self.level_scores.sum(axis=1) if self.image is None else self.image

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> Scores:
        """The scores of some rows (errors are kept whole)."""

        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[rows]

        return Scores(
            self.index[rows],
            self.level_scores[rows],
            pick(self.patch_scores),
            pick(self.maps),
            pick(self.scores),
            pick(self.is_anomaly),
            self.errors,
            pick(self.normalized),
            pick(self.image),
        )


def concat_scores(parts: Sequence[Scores], errors: list[ImageError]) -> Scores:
    """Batches' scores as one (at least one part; empty parts are fine)."""
    if not parts:
        raise ValueError("no scores to concatenate")

    def joined(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return Scores(
        index=np.concatenate([p.index for p in parts]),
        level_scores=np.concatenate([p.level_scores for p in parts]),
        patch_scores=joined("patch_scores"),
        maps=joined("maps"),
        scores=joined("scores"),
        is_anomaly=joined("is_anomaly"),
        errors=errors,
        normalized=joined("normalized"),
        image=joined("image"),
    )
