"""Detector: a backbone configuration plus a fitted GaussianAD — images in, scores out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from gaussian_ad.backbones import BACKBONES, Backbone, load_backbone, parse_levels
from gaussian_ad.features import Features, extract
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.images import ImageError, ImageSource


@dataclass
class Scores:
    """Scores of the images that decoded; ``index`` maps rows back to the inputs."""

    index: np.ndarray
    scores: np.ndarray
    level_scores: np.ndarray
    is_anomaly: np.ndarray
    errors: list[ImageError] = field(default_factory=list)


class Detector:
    """Image-level anomaly detector of Rippel et al. 2020.

    Parameters
    ----------
    backbone : a key of ``BACKBONES`` ("lite0", "b4", "resnet18", ...).
    levels : which levels to use ("1-9", "7", [3, 5, 7]); None = all.
    reduction, variance_threshold : passed to :class:`GaussianAD`.
    weights : a weights file for the backbone; None = resolve offline (see backbones).
    pretrained : False only to ask explicitly for random weights.
    batch_size, workers : extraction batch size and decoding threads.
    device : "cpu", "cuda", ...; None = CUDA when present.
    """

    def __init__(
        self,
        backbone: str = "lite0",
        levels: str | Sequence[int] | None = None,
        reduction: str | None = None,
        variance_threshold: float = 0.99,
        weights: str | Path | None = None,
        pretrained: bool = True,
        batch_size: int = 32,
        workers: int = 2,
        device: str | None = None,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        self.backbone = backbone
        self.levels = parse_levels(levels, BACKBONES[backbone].n_levels)
        self.reduction = reduction
        self.variance_threshold = variance_threshold
        self.weights = None if weights is None else str(weights)
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.model_: GaussianAD | None = None
        self._backbone: Backbone | None = None

    @property
    def image_size(self) -> int:
        """The backbone's native square input size."""
        return BACKBONES[self.backbone].image_size

    def backbone_module(self) -> Backbone:
        """The frozen backbone, loaded once and cached."""
        if self._backbone is None:
            self._backbone = load_backbone(
                self.backbone,
                self.levels,
                weights=self.weights,
                pretrained=self.pretrained,
                device=self.device,
            )
        return self._backbone

    def features(
        self,
        sources: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Features:
        """Pooled features of the chosen levels for ``sources`` (``names`` label errors)."""
        return extract(
            self.backbone_module(),
            sources,
            batch_size=self.batch_size,
            workers=self.workers,
            names=names,
            device=self.device,
            progress=progress,
        )

    def fit(self, sources: Sequence[ImageSource], progress: bool = False) -> Self:
        """Fit on normal images; unreadable ones are skipped and kept in ``errors_``."""
        features = self.features(sources, progress=progress)
        if len(features.index) < 2:
            raise ValueError(
                f"need at least 2 readable training images, got {len(features.index)}"
                + "".join(f"\n  {e.path}: {e.reason}" for e in features.errors)
            )
        self.fit_features(features.levels)
        self.errors_ = features.errors
        return self

    def fit_features(self, levels: Sequence[np.ndarray]) -> Self:
        """Fit the Gaussian on already extracted features."""
        self.model_ = GaussianAD(self.reduction, self.variance_threshold).fit(levels)
        return self

    def score(
        self,
        sources: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Scores:
        """Score images; unreadable ones become error records, the rest go on."""
        features = self.features(sources, names, progress=progress)
        return self.score_features(features.levels, features.index, features.errors)

    def score_features(
        self,
        levels: Sequence[np.ndarray],
        index: np.ndarray | None = None,
        errors: list[ImageError] | None = None,
    ) -> Scores:
        """Score already extracted features."""
        model = self.fitted_model()
        n = len(levels[0])
        level_scores = model.level_scores(levels) if n else np.zeros((0, len(self.levels)))
        scores = level_scores.sum(axis=1)
        threshold = model.threshold_
        is_anomaly = scores > threshold if threshold is not None else np.zeros(n, dtype=bool)
        index = np.arange(n) if index is None else index
        return Scores(index, scores, level_scores, is_anomaly, errors or [])

    def fitted_model(self) -> GaussianAD:
        """The fitted GaussianAD, or a clear error before fitting."""
        if self.model_ is None:
            raise ValueError("this Detector is not fitted yet: call fit() or load()")
        return self.model_

    def config(self) -> dict[str, Any]:
        """The parameters that, with the fitted statistics, define the detector."""
        return {
            "backbone": self.backbone,
            "levels": list(self.levels),
            "reduction": self.reduction,
            "variance_threshold": self.variance_threshold,
            "weights": self.weights,
            "pretrained": self.pretrained,
            "image_size": self.image_size,
        }

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the statistics plus this configuration (no pickle).

        The backbone weights are referenced (by name or path), not copied.
        """
        return self.fitted_model().save(path, metadata={"detector": self.config()})

    @classmethod
    def load(cls, path: str | Path, **runtime: Any) -> Detector:
        """Load a saved detector; ``runtime`` overrides batch_size, workers, device, weights."""
        model = GaussianAD.load(path)
        config = model.metadata_.get("detector")
        if config is None:
            raise ValueError(f"{path}: a GaussianAD file without a detector configuration")
        params = {k: config[k] for k in ("backbone", "levels", "weights", "pretrained")}
        detector = cls(
            reduction=model.reduction,
            variance_threshold=model.variance_threshold,
            **{**params, **runtime},
        )
        detector.model_ = model
        return detector
