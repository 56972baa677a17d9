"""Choosing a configuration without real defects: validation on synthetic defects.

Real defective images are rare when a product line starts, so the configuration (levels,
reduction, image / patch / fused score) is chosen on held-out NORMAL images and defective
copies of them made here: cut-paste patches, scratches, noise blobs and colour stains, each
covering roughly 0.5-5% of the image.

Data use. The fit uses the training images only. The held-out normals are split in two
alternating halves: ``heldout[0::2]`` is the validation half (its images as normals, label 0,
and the bases of the defective copies, label 1), ``heldout[1::2]`` the standardisation half
(its scores fit the :class:`~gaussian_ad.stats.fusion.Standardizer` of the fused score, so the
fusion never sees a validation image). The split does not depend on the grid, so adding or
removing fused candidates leaves every other candidate's AUROC unchanged.

Cost. One backbone pass (with every level the grid needs, plus the patch levels) over the
training images and one over the standardisation half plus the validation set. The pooled
features of that pass fit one :class:`~gaussian_ad.stats.gaussian.GaussianAD` per distinct
(levels, reduction) of the grid, in memory; one patch model per pooling radius serves
every candidate that uses it.

Ties. The best AUROC (rounded to 9 decimals) wins; among equals the simpler candidate:
image before fused before patch score, no reduction before a reduction, fewer levels before
more, and finally the earlier one in the grid.

The defaults are generic and not tuned to any data set: the grid is the user's to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gaussian_ad.backbones.specs import parse_levels
from gaussian_ad.config import REDUCTIONS, DetectorConfig, LoaderOptions
from gaussian_ad.data.defects import KINDS, validation_set
from gaussian_ad.data.images import ImageSource
from gaussian_ad.detection.detector import Detector, training_pass
from gaussian_ad.features.extract import collect, iter_batches, pick_levels
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.metrics import auroc
from gaussian_ad.stats.patch_gaussian import PatchGaussian
from gaussian_ad.store.plan import holdout_split

SCORES = ("image", "fused", "patch")  # in order of simplicity
DEFAULT_N_PER_KIND = 10
AUROC_DECIMALS = 9  # AUROCs equal to this precision tie


# --------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One configuration: image-level levels and reduction, which score ranks images, and
    the patch model's pooling (``pool_radius``, see DetectorConfig.patch_pool_radius).

    A "patch" candidate has no image-level model: ``levels`` and ``reduction`` are None.
    """

    levels: str | None = "1-9"
    reduction: str | None = None
    score: str = "image"
    pool_radius: int | None = 0

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.score == "patch" and (self.levels, self.reduction) != (None, None):
            raise ValueError(
                "a patch candidate has no image-level model: levels=None and no reduction"
            )
        if self.score != "patch" and self.levels is None:
            raise ValueError(f"a {self.score} candidate needs image-level levels")
        if self.score == "image" and self.pool_radius != 0:
            raise ValueError("an image candidate has no patch model to pool: pool_radius=0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": self.levels,
            "reduction": self.reduction,
            "score": self.score,
            "pool_radius": self.pool_radius,
        }

    def config(self, base: DetectorConfig) -> DetectorConfig:
        """``base`` with this candidate's levels, reduction and score (and the patch model;
        a patch candidate keeps the base's levels for its unused image-level model)."""
        levels = base.levels if self.levels is None else self.levels
        patch = base.patch or self.score != "image"
        pool = base.patch_pool_radius if self.score == "image" else self.pool_radius
        return base.replace(
            levels=levels,
            reduction=self.reduction,
            score=self.score,
            patch=patch,
            patch_pool_radius=pool,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        """From :meth:`to_dict` (selections recorded before pooling existed: radius 0)."""
        return cls(data["levels"], data["reduction"], data["score"], data.get("pool_radius", 0))


def default_grid() -> list[Candidate]:
    """Levels {"1-9", "6-8"} x reduction {None, "npca"} x score {image, fused per position,
    fused position-free}, and the patch score per position and position-free."""
    grid = [
        Candidate(levels, reduction, score, pool)
        for levels in ("1-9", "6-8")
        for reduction in (None, "npca")
        for score, pool in (("image", 0), ("fused", 0), ("fused", None))
    ]
    return [*grid, Candidate(None, None, "patch", 0), Candidate(None, None, "patch", None)]


DEFAULT_GRID: tuple[Candidate, ...] = tuple(default_grid())


def simplicity_key(candidate: Candidate, n_levels: int) -> tuple[int, int, int, int]:
    """Sort key, simplest first: score kind, then reduction, then number of levels, then
    per-position before pooled patch models."""
    count = 0 if candidate.levels is None else len(parse_levels(candidate.levels, n_levels))
    pooled = int(candidate.pool_radius != 0)
    return SCORES.index(candidate.score), int(candidate.reduction is not None), count, pooled


def best_candidate(results: Sequence[tuple[Candidate, float]], n_levels: int) -> Candidate:
    """The highest AUROC; ties (to AUROC_DECIMALS) go to the simplest, then the earliest."""
    ranked = sorted(
        enumerate(results),
        key=lambda item: (
            -round(item[1][1], AUROC_DECIMALS),
            simplicity_key(item[1][0], n_levels),
            item[0],
        ),
    )
    return ranked[0][1][0]


# --------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """The chosen candidate, every candidate's validation AUROC, and how they were measured."""

    best: Candidate
    results: list[tuple[Candidate, float]]
    backbone: str
    seed: int
    n_per_kind: int
    kinds: tuple[str, ...] = KINDS
    counts: dict[str, int] = field(default_factory=dict)  # images per role

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for MLflow and the model version); :meth:`from_dict` inverts it."""
        return {
            "best": self.best.to_dict(),
            "results": [{**c.to_dict(), "auroc": value} for c, value in self.results],
            "backbone": self.backbone,
            "seed": self.seed,
            "n_per_kind": self.n_per_kind,
            "kinds": list(self.kinds),
            "counts": dict(self.counts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        return cls(
            best=Candidate.from_dict(data["best"]),
            results=[(Candidate.from_dict(row), float(row["auroc"])) for row in data["results"]],
            backbone=data["backbone"],
            seed=int(data["seed"]),
            n_per_kind=int(data["n_per_kind"]),
            kinds=tuple(data["kinds"]),
            counts={k: int(v) for k, v in data["counts"].items()},
        )


def split_heldout(
    heldout: Sequence[ImageSource],
) -> tuple[list[ImageSource], list[ImageSource]]:
    """(validation half, standardisation half): alternate held-out images, validation first."""
    if len(heldout) < 4:
        raise ValueError(f"need at least 4 held-out normal images, got {len(heldout)}")
    return list(heldout[0::2]), list(heldout[1::2])


def _fitted_pooling(config: DetectorConfig) -> int | None:
    """The patch model a candidate is scored with: its pooling; "auto" (only an image
    candidate's, which ranks images without the patch model) is fitted position-free."""
    radius = config.patch_pool_radius
    return None if radius == "auto" else radius


def select_configuration(
    train_paths: Sequence[ImageSource],
    heldout_paths: Sequence[ImageSource],
    base: DetectorConfig,
    candidates: Sequence[Candidate] = DEFAULT_GRID,
    loader: LoaderOptions | None = None,
    *,
    n_per_kind: int = DEFAULT_N_PER_KIND,
    kinds: Sequence[str] = KINDS,
) -> Selection:
    """Fit every candidate on ``train_paths``, rank them by AUROC on synthetic defects.

    ``base`` gives the backbone, the patch layout and the seed; each candidate replaces its
    levels, reduction and score. See the module docstring for the data use.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidates to choose from")
    loader = loader or LoaderOptions()
    configs = [candidate.config(base.replace(patch=True)) for candidate in candidates]
    widest = Detector(base.replace(levels=None, patch=True, score="image"), loader)
    backbone = widest.backbone_module()
    layout = PatchLayout.for_config(backbone, widest.config)
    validate_paths, standardize_paths = split_heldout(heldout_paths)
    images, labels, _ = validation_set(
        validate_paths, n_per_kind, base.seed, kinds, size=backbone.spec.image_size
    )
    fitted = training_pass(backbone, train_paths, loader, layout)
    scored = collect(
        iter_batches(backbone, [*standardize_paths, *images], loader, layout=layout),
        backbone,
        layout,
    )
    patch_models: dict[int | None, tuple[PatchGaussian, np.ndarray]] = {}
    for radius in dict.fromkeys(map(_fitted_pooling, configs)):
        patch_model = PatchGaussian(pool_radius=radius).fit_moments(fitted.patch_sums)
        scores, _ = patch_model.anomaly_maps(scored.patches, backbone.spec.image_size)
        patch_models[radius] = patch_model, scores
    standardizing = scored.index < len(standardize_paths)
    validating = ~standardizing
    validation_labels = labels[scored.index[validating] - len(standardize_paths)]

    image_models: dict[tuple, GaussianAD] = {}
    results = []
    for candidate, config in zip(candidates, configs, strict=True):
        key = (config.image_levels, config.reduction)
        if key not in image_models:
            image_models[key] = GaussianAD(reduction=config.reduction).fit(
                pick_levels(fitted.pooled, backbone.levels, config.image_levels)
            )
        patch_model, patch_scores = patch_models[_fitted_pooling(config)]
        detector = Detector(config, loader).set_models(image_models[key], patch_model, layout)
        levels = pick_levels(scored.pooled, backbone.levels, config.image_levels)
        scores = detector.score_features(levels, patch_scores=patch_scores)
        detector.calibrate_scores(scores.take(np.flatnonzero(standardizing)))
        chosen = detector.decide(scores).scores
        results.append((candidate, auroc(validation_labels, chosen[validating])))
    return Selection(
        best=best_candidate(results, backbone.spec.n_levels),
        results=results,
        backbone=base.backbone,
        seed=base.seed,
        n_per_kind=n_per_kind,
        kinds=tuple(kinds),
        counts={
            "fit": len(fitted.index),
            "standardize": int(standardizing.sum()),
            "validation_normal": int((validation_labels == 0).sum()),
            "validation_defective": int((validation_labels == 1).sum()),
        },
    )


def select_on_normals(
    paths: Sequence[ImageSource],
    base: DetectorConfig,
    candidates: Sequence[Candidate] = DEFAULT_GRID,
    loader: LoaderOptions | None = None,
    n_per_kind: int = DEFAULT_N_PER_KIND,
) -> Selection:
    """:func:`select_configuration` on normal images alone: fold 0 of KFold(5, shuffle,
    ``base.seed``) is held out for the validation, the other 4/5 fit the candidates."""
    fit_idx, held_idx = holdout_split(len(paths), seed=base.seed)
    return select_configuration(
        [paths[i] for i in fit_idx],
        [paths[i] for i in held_idx],
        base,
        candidates,
        loader,
        n_per_kind=n_per_kind,
    )
