"""Choosing a configuration without real defects: validation on synthetic defects.

Real defective images are rare when a product line starts, so the configuration (levels,
reduction, image / patch / fused score) is chosen on held-out NORMAL images and defective
copies of them made here: cut-paste patches, scratches, noise blobs and colour stains, each
covering roughly 0.5-5% of the image.

Data use. The fit uses the training images only. The held-out normals are split in two
alternating halves: ``heldout[0::2]`` is the validation half (its images as normals, label 0,
and the bases of the defective copies, label 1), ``heldout[1::2]`` the standardisation half
(its scores fit the :class:`~gaussian_ad.fusion.Standardizer` of the fused score, so the
fusion never sees a validation image). The split does not depend on the grid, so adding or
removing fused candidates leaves every other candidate's AUROC unchanged.

Cost. One backbone pass (with every level the grid needs, plus the patch levels) over the
training images and one over the standardisation half plus the validation set. The pooled
features of that pass fit one :class:`~gaussian_ad.gaussian.GaussianAD` per distinct
(levels, reduction) of the grid, in memory; one patch model serves every candidate.

Ties. The best AUROC (rounded to 9 decimals) wins; among equals the simpler candidate:
image before fused before patch score, no reduction before a reduction, fewer levels before
more, and finally the earlier one in the grid.

The defaults are generic and not tuned to any data set: the grid is the user's to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gaussian_ad.backbones import Backbone, parse_levels
from gaussian_ad.fusion import Standardizer, fuse
from gaussian_ad.gaussian import REDUCTIONS, GaussianAD
from gaussian_ad.images import ImageSource, load_rgb
from gaussian_ad.metrics import auroc
from gaussian_ad.patch import fit_patch, score_patch

KINDS = ("cutpaste", "scratch", "noise", "stain")
SCORES = ("image", "fused", "patch")  # in order of simplicity
AREA_RANGE = (0.01, 0.04)  # drawn area fraction of cut-paste patches and blobs
DEFAULT_N_PER_KIND = 10
AUROC_DECIMALS = 9  # AUROCs equal to this precision tie


# --------------------------------------------------------------------------- defects
def synthetic_defect(
    image: Image.Image | np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """A defective RGB copy of ``image`` and its (H, W) bool mask; a pure function of ``rng``.

    ``kind``: "cutpaste" (a patch of the image, flipped and brightened or darkened, pasted
    elsewhere), "scratch" (a thin bright or dark polyline), "noise" (a blob of strong noise)
    or "stain" (a soft colour blot). Pixels outside the mask are unchanged.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {list(KINDS)}")
    pixels = np.asarray(load_rgb(image), dtype=np.float32)
    if kind == "cutpaste":
        out, mask = _cutpaste(pixels, rng)
    elif kind == "scratch":
        out, mask = _scratch(pixels, rng)
    elif kind == "noise":
        mask = _blob(pixels.shape[:2], rng) < 1.0
        noise = rng.uniform(0.0, 255.0, size=(int(mask.sum()), 3))
        out = pixels.copy()
        out[mask] = 0.35 * pixels[mask] + 0.65 * noise
    else:
        out, mask = _stain(pixels, rng)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)), mask


def _cutpaste(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = pixels.shape[:2]
    area = rng.uniform(*AREA_RANGE) * h * w
    aspect = rng.uniform(0.5, 2.0)
    ph = int(np.clip(round(math.sqrt(area * aspect)), 2, h // 2))
    pw = int(np.clip(round(area / ph), 2, w // 2))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    # The target lies at least half a patch away from the source along some axis.
    ty, tx = sy, sx
    while abs(ty - sy) < ph // 2 and abs(tx - sx) < pw // 2:
        ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = pixels[sy : sy + ph, sx : sx + pw]
    flips = [axis for axis in (0, 1) if rng.random() < 0.5]
    if flips:
        patch = np.flip(patch, axis=flips)
    brightness = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.4) + 1.0
    out = pixels.copy()
    out[ty : ty + ph, tx : tx + pw] = patch * brightness
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return out, mask


def _scratch(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = pixels.shape[:2]
    side = min(h, w)
    n_points = int(rng.integers(3, 6))
    step = rng.uniform(0.3, 0.6) * side / (n_points - 1)
    turns = np.cumsum(rng.normal(0.0, 0.5, size=n_points - 1)) + rng.uniform(0, 2 * np.pi)
    start = rng.uniform(0.2, 0.8, size=2) * (w, h)
    steps = step * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    points = np.vstack([start, start + np.cumsum(steps, axis=0)])
    points = np.clip(points, 0, (w - 1, h - 1))
    width = max(2, round(side * rng.uniform(0.015, 0.025)))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    value = rng.uniform(225, 255) if rng.random() < 0.5 else rng.uniform(0, 30)
    out = pixels.copy()
    out[mask] = value + rng.normal(0.0, 4.0, size=(int(mask.sum()), 3))
    return out, mask


def _stain(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    radius = _blob(pixels.shape[:2], rng)
    mask = radius < 1.0
    # A colour far from the region's mean, blended in with a peak opacity fading to the rim.
    shift = rng.choice([-1.0, 1.0], size=3) * rng.uniform(60, 120, size=3)
    colour = np.clip(pixels[mask].mean(axis=0) + shift, 0, 255)
    alpha = rng.uniform(0.5, 0.85) * np.clip(1.0 - radius**2, 0.0, None)[..., None]
    return pixels * (1.0 - alpha) + colour * alpha, mask


def _blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) normalised radius of a random wobbly ellipse: < 1 inside."""
    h, w = shape
    radius = math.sqrt(rng.uniform(*AREA_RANGE) * h * w / math.pi)
    aspect = rng.uniform(0.6, 1.6)
    cy, cx = rng.uniform(0.15, 0.85, size=2) * (h, w)
    angle = rng.uniform(0, np.pi)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius / math.sqrt(aspect))
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / (radius * math.sqrt(aspect))
    theta = np.arctan2(v, u)
    wobble = 1.0 + 0.15 * np.sin(3 * theta + phases[0]) + 0.1 * np.sin(5 * theta + phases[1])
    return np.hypot(u, v) / wobble


def validation_set(
    paths: Sequence[ImageSource],
    n_per_kind: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
    size: int | None = None,
) -> tuple[list[Image.Image], np.ndarray, list[np.ndarray]]:
    """(images, labels, masks): the normals (label 0) and ``n_per_kind`` defective copies
    (label 1) per kind, made from the normals in turn.

    ``size`` resizes the normals (bilinear, square) first, so defects are drawn at the
    model's input resolution. Copy i of kind k is a pure function of (seed, k, i).
    Raises ImageDecodeError for an unreadable normal.
    """
    if not paths:
        raise ValueError("need at least one normal image to build a validation set")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown defect kinds {unknown}; choose from {list(KINDS)}")
    normals = [load_rgb(path) for path in paths]
    if size is not None:
        normals = [image.resize((size, size), Image.Resampling.BILINEAR) for image in normals]
    images = list(normals)
    masks = [np.zeros(image.size[::-1], dtype=bool) for image in normals]
    for position, kind in enumerate(kinds):
        for i in range(n_per_kind):
            rng = np.random.default_rng([seed, KINDS.index(kind), i])
            base = normals[(position * n_per_kind + i) % len(normals)]
            image, mask = synthetic_defect(base, kind, rng)
            images.append(image)
            masks.append(mask)
    labels = np.repeat([0, 1], [len(normals), len(images) - len(normals)])
    return images, labels, masks


# --------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One configuration: image-level levels and reduction, and which score ranks images.

    A "patch" candidate has no image-level model: ``levels`` and ``reduction`` are None.
    """

    levels: str | None = "1-9"
    reduction: str | None = None
    score: str = "image"

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

    def to_dict(self) -> dict[str, Any]:
        return {"levels": self.levels, "reduction": self.reduction, "score": self.score}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(data["levels"], data["reduction"], data["score"])


def default_grid() -> list[Candidate]:
    """Levels {"1-9", "6-8"} x reduction {None, "npca"} x score {image, fused}, and patch."""
    grid = [
        Candidate(levels, reduction, score)
        for levels in ("1-9", "6-8")
        for reduction in (None, "npca")
        for score in ("image", "fused")
    ]
    return [*grid, Candidate(None, None, "patch")]


DEFAULT_GRID: tuple[Candidate, ...] = tuple(default_grid())


def simplicity_key(candidate: Candidate, n_levels: int) -> tuple[int, int, int]:
    """Sort key, simplest first: score kind, then reduction, then number of levels."""
    count = 0 if candidate.levels is None else len(parse_levels(candidate.levels, n_levels))
    return SCORES.index(candidate.score), int(candidate.reduction is not None), count


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


def select_configuration(
    train_paths: Sequence[ImageSource],
    heldout_paths: Sequence[ImageSource],
    backbone: Backbone,
    candidates: Sequence[Candidate] = DEFAULT_GRID,
    *,
    n_per_kind: int = DEFAULT_N_PER_KIND,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    **stream: Any,
) -> Selection:
    """Fit every candidate on ``train_paths``, rank them by AUROC on synthetic defects.

    ``backbone`` must include every level of the grid and the patch levels (load it with all
    levels). ``stream`` takes batch_size, workers, device, progress (see
    :func:`gaussian_ad.patch.fit_patch`). See the module docstring for the data use.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidates to choose from")
    n_levels = backbone.spec.n_levels
    configs = {
        (parse_levels(c.levels, n_levels), c.reduction) for c in candidates if c.levels is not None
    }
    missing = sorted({level for levels, _ in configs for level in levels} - set(backbone.levels))
    if missing:
        raise ValueError(f"levels {missing} are not among the backbone's {backbone.levels}")
    validate_paths, standardize_paths = split_heldout(heldout_paths)
    images, labels, _ = validation_set(
        validate_paths, n_per_kind, seed, kinds, size=backbone.spec.image_size
    )

    patch_model, fitted = fit_patch(backbone, train_paths, **stream)
    scored = score_patch(backbone, patch_model, [*standardize_paths, *images], **stream)
    standardizing = scored.index < len(standardize_paths)
    validating = ~standardizing
    validation_labels = labels[scored.index[validating] - len(standardize_paths)]

    image_scores = {}
    for levels, reduction in configs:
        columns = [backbone.levels.index(level) for level in levels]
        model = GaussianAD(reduction).fit([fitted.levels[c] for c in columns])
        image_scores[levels, reduction] = model.anomaly_scores([scored.pooled[c] for c in columns])

    results = []
    for candidate in candidates:
        if candidate.score == "patch":
            scores = scored.scores
        else:
            scores = image_scores[parse_levels(candidate.levels, n_levels), candidate.reduction]
            if candidate.score == "fused":
                standardizer = Standardizer.fit(scores[standardizing], scored.scores[standardizing])
                scores = fuse(scores, scored.scores, standardizer)
        results.append((candidate, auroc(validation_labels, scores[validating])))
    return Selection(
        best=best_candidate(results, n_levels),
        results=results,
        backbone=backbone.spec.name,
        seed=seed,
        n_per_kind=n_per_kind,
        kinds=tuple(kinds),
        counts={
            "fit": len(fitted.index),
            "standardize": int(standardizing.sum()),
            "validation_normal": int((validation_labels == 0).sum()),
            "validation_defective": int((validation_labels == 1).sum()),
        },
    )
