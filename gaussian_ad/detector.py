"""Detector: a backbone configuration plus fitted models — images in, scores (and maps) out.

The image-level :class:`GaussianAD` of Rippel et al. is always fitted; with ``patch=True`` a
:class:`~gaussian_ad.patch.PatchGaussian` is fitted from the same backbone pass, giving
anomaly maps, and ``score`` chooses which score ranks and thresholds images: the summed
image-level Mahalanobis ("image"), the map maximum ("patch") or their standardised sum
("fused", see :mod:`gaussian_ad.fusion`). Per-level scores stay available in every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from gaussian_ad.backbones import BACKBONES, Backbone, load_backbone, parse_levels
from gaussian_ad.features import Features, extract
from gaussian_ad.fusion import Standardizer, fuse
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.images import ImageError, ImageSource
from gaussian_ad.patch import (
    DEFAULT_N_CHANNELS,
    PatchGaussian,
    PatchLayout,
    PatchScores,
    default_patch_levels,
    fit_patch,
    score_patch,
)
from gaussian_ad.thresholds import empirical_threshold

SCORE_KINDS = ("image", "patch", "fused")
PATCH_SUFFIX = ".patch.safetensors"


@dataclass
class Scores:
    """Scores of the images that decoded; ``index`` maps rows back to the inputs."""

    index: np.ndarray
    scores: np.ndarray  # the detector's chosen score (image, patch or fused)
    level_scores: np.ndarray  # (n, L) image-level Mahalanobis per level
    is_anomaly: np.ndarray
    errors: list[ImageError] = field(default_factory=list)
    image_scores: np.ndarray | None = None  # summed level scores (set with a patch model)
    patch_scores: np.ndarray | None = None  # anomaly-map maxima (set with a patch model)
    maps: np.ndarray | None = None  # (n, S, S) float32 anomaly maps, when asked for


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
    patch : also fit the patch-level model (anomaly maps) from the same backbone pass.
    score : "image", "patch" or "fused": the score that ranks and thresholds images.
    patch_grid, patch_channels, seed : the patch layout (see :class:`PatchLayout`).

    Learned: ``model_`` (GaussianAD), ``patch_model_`` (PatchGaussian or None),
    ``standardizer_`` (fused score only) and ``threshold_`` (of the chosen score, from
    :meth:`calibrate`; None until then).
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
        patch: bool = False,
        score: str = "image",
        patch_grid: int | None = None,
        patch_channels: int = DEFAULT_N_CHANNELS,
        seed: int = 0,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        if score not in SCORE_KINDS:
            raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
        if score != "image" and not patch:
            raise ValueError(f"the {score!r} score needs the patch-level model: pass patch=True")
        self.backbone = backbone
        self.levels = parse_levels(levels, BACKBONES[backbone].n_levels)
        self.reduction = reduction
        self.variance_threshold = variance_threshold
        self.weights = None if weights is None else str(weights)
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.patch = patch
        self.score_kind = score
        self.patch_grid = patch_grid
        self.patch_channels = patch_channels
        self.seed = seed
        self.model_: GaussianAD | None = None
        self.patch_model_: PatchGaussian | None = None
        self.standardizer_: Standardizer | None = None
        self.threshold_: float | None = None
        self._backbone: Backbone | None = None

    @property
    def image_size(self) -> int:
        """The backbone's native square input size."""
        return BACKBONES[self.backbone].image_size

    @property
    def backbone_levels(self) -> tuple[int, ...]:
        """The levels the backbone computes: the image-level ones plus the patch levels."""
        if not self.patch:
            return self.levels
        patch_levels = (
            self.patch_model_.layout_.levels
            if self.patch_model_ is not None and self.patch_model_.layout_ is not None
            else default_patch_levels(BACKBONES[self.backbone])
        )
        return tuple(sorted(set(self.levels) | set(patch_levels)))

    def backbone_module(self) -> Backbone:
        """The frozen backbone, loaded once and cached."""
        if self._backbone is None:
            self._backbone = load_backbone(
                self.backbone,
                self.backbone_levels,
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
        features = extract(self.backbone_module(), sources, **self._stream(names, progress))
        return Features(self._image_levels(features.levels), features.index, features.errors)

    def _stream(self, names: Sequence[str] | None, progress: bool) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "workers": self.workers,
            "names": names,
            "device": self.device,
            "progress": progress,
        }

    def _image_levels(self, pooled: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The image-level model's levels out of the backbone's pooled features."""
        computed = self.backbone_module().levels
        return [pooled[computed.index(level)] for level in self.levels]

    def fit(self, sources: Sequence[ImageSource], progress: bool = False) -> Self:
        """Fit on normal images; unreadable ones are skipped and kept in ``errors_``.

        With ``patch=True`` one backbone pass fits both models. Call :meth:`calibrate`
        on held-out normal images for a threshold (and the fused score's standardiser).
        """
        if self.patch:
            backbone = self.backbone_module()
            layout = PatchLayout.for_backbone(
                backbone, grid=self.patch_grid, n_channels=self.patch_channels, seed=self.seed
            )
            self.patch_model_, pooled = fit_patch(
                backbone, sources, layout=layout, **self._stream(None, progress)
            )
            features = Features(self._image_levels(pooled.levels), pooled.index, pooled.errors)
        else:
            features = self.features(sources, progress=progress)
        if len(features.index) < 2:
            raise ValueError(
                f"need at least 2 readable training images, got {len(features.index)}"
                + "".join(f"\n  {e.path}: {e.reason}" for e in features.errors)
            )
        self.fit_features(features.levels)
        self.standardizer_, self.threshold_ = None, None
        self.errors_ = features.errors
        return self

    def calibrate(
        self, heldout: Sequence[ImageSource], target_fpr: float = 0.01, progress: bool = False
    ) -> Self:
        """Fit the fused score's standardiser and set ``threshold_`` on held-out normals."""
        features, patch = self._forward(heldout, None, progress)
        image_scores = self.fitted_model().anomaly_scores(features.levels)
        self.calibrate_scores(image_scores, None if patch is None else patch.scores, target_fpr)
        return self

    def calibrate_scores(
        self,
        image_scores: np.ndarray,
        patch_scores: np.ndarray | None,
        target_fpr: float = 0.01,
    ) -> np.ndarray:
        """Calibrate from held-out normals' image and patch scores; returns their final score."""
        if self.patch:
            self.standardizer_ = Standardizer.fit(image_scores, patch_scores)
        held = self.combine(np.asarray(image_scores), patch_scores)
        self.threshold_ = empirical_threshold(held, target_fpr)
        if self.model_ is not None:
            self.model_.threshold_ = empirical_threshold(image_scores, target_fpr)
        return held

    def combine(self, image_scores: np.ndarray, patch_scores: np.ndarray | None) -> np.ndarray:
        """The chosen score from the image-level and patch-level scores."""
        if self.score_kind == "image":
            return np.asarray(image_scores, dtype=np.float64)
        if patch_scores is None:
            raise ValueError(f"the {self.score_kind!r} score needs patch scores")
        if self.score_kind == "patch":
            return np.asarray(patch_scores, dtype=np.float64)
        if self.standardizer_ is None:
            raise ValueError("the fused score needs a standardiser: call calibrate() first")
        return fuse(image_scores, patch_scores, self.standardizer_)

    def fit_features(self, levels: Sequence[np.ndarray]) -> Self:
        """Fit the Gaussian on already extracted features."""
        self.model_ = GaussianAD(self.reduction, self.variance_threshold).fit(levels)
        return self

    def score(
        self,
        sources: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        progress: bool = False,
        maps: bool = False,
    ) -> Scores:
        """Score images; unreadable ones become error records, the rest go on.

        With a patch model, ``maps=True`` also returns the anomaly maps (at the
        backbone's input size; about 200 kB an image at 224 px).
        """
        if maps and self.patch_model_ is None:
            raise ValueError("anomaly maps need the patch-level model (patch=True)")
        features, patch = self._forward(sources, names, progress)
        return self.score_features(
            features.levels,
            features.index,
            features.errors,
            patch_scores=None if patch is None else patch.scores,
            maps=patch.maps if maps else None,
        )

    def _forward(
        self, sources: Sequence[ImageSource], names: Sequence[str] | None, progress: bool
    ) -> tuple[Features, PatchScores | None]:
        """One backbone pass: the image-level features and, with a patch model, its results."""
        if self.patch_model_ is None:
            return self.features(sources, names, progress), None
        result = score_patch(
            self.backbone_module(), self.patch_model_, sources, **self._stream(names, progress)
        )
        return Features(self._image_levels(result.pooled), result.index, result.errors), result

    def score_features(
        self,
        levels: Sequence[np.ndarray],
        index: np.ndarray | None = None,
        errors: list[ImageError] | None = None,
        patch_scores: np.ndarray | None = None,
        maps: np.ndarray | None = None,
    ) -> Scores:
        """Score already extracted features (and, for a patch model, its map maxima)."""
        model = self.fitted_model()
        n = len(levels[0])
        level_scores = model.level_scores(levels) if n else np.zeros((0, len(self.levels)))
        image_scores = level_scores.sum(axis=1)
        scores = self.combine(image_scores, patch_scores) if n else image_scores
        threshold = self.threshold_
        is_anomaly = scores > threshold if threshold is not None else np.zeros(n, dtype=bool)
        index = np.arange(n) if index is None else index
        with_patch = patch_scores is not None
        return Scores(
            index,
            scores,
            level_scores,
            is_anomaly,
            errors or [],
            image_scores if with_patch else None,
            patch_scores,
            maps,
        )

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
            "patch": self.patch,
            "score": self.score_kind,
            "patch_grid": self.patch_grid,
            "patch_channels": self.patch_channels,
            "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """The statistics plus this configuration, as safetensors files (no pickle).

        ``path`` holds the image-level model, the configuration, the threshold and the
        fused score's standardiser; a patch model goes next to it, in
        ``<stem>.patch.safetensors``. The backbone weights are referenced, not copied.
        """
        path = Path(path)
        metadata: dict[str, Any] = {
            "detector": self.config(),
            "threshold": self.threshold_,
            "standardizer": None if self.standardizer_ is None else self.standardizer_.to_dict(),
        }
        if self.patch_model_ is not None:
            metadata["patch_file"] = patch_path(path).name
            self.patch_model_.save(patch_path(path))
        return self.fitted_model().save(path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, **runtime: Any) -> Detector:
        """Load a saved detector; ``runtime`` overrides batch_size, workers, device, weights."""
        path = Path(path)
        model = GaussianAD.load(path)
        config = model.metadata_.get("detector")
        if config is None:
            raise ValueError(f"{path}: a GaussianAD file without a detector configuration")
        keys = ("backbone", "levels", "weights", "pretrained", "patch", "score")
        keys += ("patch_grid", "patch_channels", "seed")
        params = {k: config[k] for k in keys if k in config}
        detector = cls(
            reduction=model.reduction,
            variance_threshold=model.variance_threshold,
            **{**params, **runtime},
        )
        detector.model_ = model
        detector.threshold_ = model.metadata_.get("threshold", model.threshold_)
        standardizer = model.metadata_.get("standardizer")
        detector.standardizer_ = (
            None if standardizer is None else Standardizer.from_dict(standardizer)
        )
        patch_file = model.metadata_.get("patch_file")
        if patch_file is not None:
            if not (path.parent / patch_file).is_file():
                raise FileNotFoundError(f"{path}: its patch-level model {patch_file} is missing")
            detector.patch_model_ = PatchGaussian.load(path.parent / patch_file)
        return detector


def patch_path(path: str | Path) -> Path:
    """Where the patch-level model of a detector saved at ``path`` goes."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + PATCH_SUFFIX)
