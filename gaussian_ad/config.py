"""Typed, frozen, validated configuration: what defines a model, and how it runs.

``DetectorConfig`` is everything that, with the fitted statistics, defines a detector;
``LoaderOptions`` is how it runs (device, batch size, decoding threads, where the weights
are). Both validate on construction and name the offending field, so a bad value fails
before any image is decoded. Torch-free: validating a configuration imports no model code.

Both are plain frozen dataclasses; pydantic (and so Prefect's parameter forms) validates
them as nested fields and rejects unknown keys (``__pydantic_config__``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, get_args

from gaussian_ad.backbones.specs import BACKBONES, parse_levels

ScoreKind = Literal["image", "patch", "fused"]
PoolRadius = int | Literal["auto"] | None
Reduction = Literal["pca", "npca"]
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
REDUCTIONS: tuple[str | None, ...] = (None, *get_args(Reduction))
DEFAULT_PATCH_CHANNELS = 100  # PaDiM's d for ResNet-18


def parse_reduction(text: str | None) -> Reduction | None:
    """``"none"``/None -> None; ``"pca"``/``"npca"`` (any case) as is; else ValueError."""
    if text is None or text.strip().lower() == "none":
        return None
    value = text.strip().lower()
    if value not in REDUCTIONS:
        raise ValueError(f"reduction: must be none, pca or npca, got {text!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class DetectorConfig:
    """What defines a detector, besides its fitted statistics.

    Parameters
    ----------
    backbone : a key of ``BACKBONES`` ("lite0", "b4", "resnet18", ...).
    levels : the image-level model's levels, as a tuple or text ("1-9", "7", "3,5,7").
    reduction : None, "pca" or "npca" (see :class:`~gaussian_ad.stats.gaussian.GaussianAD`).
    variance_threshold : the cumulative explained variance t that splits PCA from NPCA.
    score : the score that ranks and thresholds images: "image", "patch" or "fused". None
        (the default) = "fused" when the patch model is fitted, else "image". The fused
        score adds the patch score's z-score to the image score as one more level: the
        image score sees how far the whole image lies from normal, the patch score where a
        small part does, and a defect seldom hides from both. With it the default is the
        best candidate on both real dev categories (image AUROC 0.807 / 0.979 against the
        image score's 0.794 / 0.977).
    standardize_levels : the image score sums each level's distance as a z-score on the
        held-out normals (True) instead of the distances themselves (False: the paper's
        sum); see :mod:`gaussian_ad.stats.fusion` for why.
    patch : also fit the patch-level model (anomaly maps); required by "patch"/"fused".
        On by default: maps are what a person checks a flagged image against.
    patch_grid, patch_channels : the patch layout (None grid: the stride-8 grid).
    patch_pool_radius : which training patches each grid position's Gaussian pools: 0 its
        own position (PaDiM, aligned products), r the positions within r cells, None all
        positions: one position-free Gaussian. "auto" (the default) chooses between 0 and
        None at fit from the normals alone (:mod:`gaussian_ad.stats.pooling`): position-free,
        which assumes nothing about where the parts lie (pixel AUROC 0.972 / 0.941 against
        the per-position 0.939 / 0.900 on capsules and fryum), unless the out-of-fold
        normals' position-free maps mostly peak on the border, where the picture's framing
        is normal only there (magnetic-tile crops: per-position).
    input_size : the square side images are resized to, a multiple of 32. None = the
        backbone's default side: 352 for lite0 (measured above its native 224 on real
        products), the native side for the others. Larger sides show small defects to the
        backbone (and give a finer patch grid) at about (input_size / native) ** 2 the
        compute.
    seed : seed of the patch channels, the hold-out split and augmentation.
    pretrained : False only to ask explicitly for random backbone weights.

    Examples
    --------
    >>> DetectorConfig(levels="6-8").levels
    (6, 7, 8)
    >>> DetectorConfig(score="fused", patch=False)
    Traceback (most recent call last):
    ...
    ValueError: score: 'fused' needs the patch-level model: set patch=True
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    backbone: str = "lite0"
    levels: tuple[int, ...] | str | None = None
    reduction: Reduction | None = None
    variance_threshold: float = 0.99
    score: ScoreKind | None = None
    standardize_levels: bool = True
    patch: bool = True
    patch_grid: int | None = None
    patch_channels: int = DEFAULT_PATCH_CHANNELS
    patch_pool_radius: PoolRadius = "auto"
    input_size: int | None = None
    seed: int = 0
    pretrained: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone: unknown {self.backbone!r}; choose from {sorted(BACKBONES)}"
            )
        try:
            levels = parse_levels(self.levels, BACKBONES[self.backbone].n_levels)
        except ValueError as error:
            raise ValueError(f"levels: {error}") from None
        object.__setattr__(self, "levels", levels)
        if self.score is None:  # resolved, so a saved configuration names its score
            object.__setattr__(self, "score", "fused" if self.patch else "image")
        if self.input_size is None:  # resolved, so a saved configuration names its side
            object.__setattr__(self, "input_size", BACKBONES[self.backbone].default_input_size)
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: must be None, 'pca' or 'npca', got {self.reduction!r}")
        if not 0.0 < self.variance_threshold < 1.0:
            raise ValueError(
                f"variance_threshold: must lie in (0, 1), got {self.variance_threshold}"
            )
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score: must be one of {SCORE_KINDS}, got {self.score!r}")
        if self.score != "image" and not self.patch:
            raise ValueError(f"score: {self.score!r} needs the patch-level model: set patch=True")
        if self.patch_grid is not None and self.patch_grid < 1:
            raise ValueError(f"patch_grid: must be >= 1 or None, got {self.patch_grid}")
        if self.patch_channels < 1:
            raise ValueError(f"patch_channels: must be >= 1, got {self.patch_channels}")
        if self.input_size is not None and (
            self.input_size < 32 or self.input_size > 2048 or self.input_size % 32
        ):
            raise ValueError(
                f"input_size: must be a multiple of 32 in [32, 2048] or None, got {self.input_size}"
            )
        radius = self.patch_pool_radius
        if (
            radius != "auto"
            and radius is not None
            and (not isinstance(radius, int) or isinstance(radius, bool) or radius < 0)
        ):
            raise ValueError(f"patch_pool_radius: must be >= 0, None or 'auto', got {radius!r}")

    @property
    def image_size(self) -> int:
        """The square input side: ``input_size``, or the backbone's native one."""
        return self.input_size or BACKBONES[self.backbone].image_size

    @property
    def image_levels(self) -> tuple[int, ...]:
        """The levels as a tuple (``levels`` after validation)."""
        return self.levels  # type: ignore[return-value]

    def describe(self) -> str:
        """One line for titles: backbone and side, levels, score and how levels add up.

        >>> DetectorConfig().describe()
        'lite0 at 352 px, levels 1-9, fused score of standardised levels, auto-pooled maps'
        >>> DetectorConfig(patch=False, levels="7").describe()
        'lite0 at 352 px, levels 7, image score of standardised levels'
        """
        levels = self.image_levels
        span = (
            f"{levels[0]}-{levels[-1]}"
            if levels == tuple(range(levels[0], levels[-1] + 1)) and len(levels) > 1
            else ",".join(map(str, levels))
        )
        adding = "standardised" if self.standardize_levels else "summed"
        maps = ""
        if self.patch:
            radius = self.patch_pool_radius
            pooling = {None: "position-free", 0: "per-position", "auto": "auto-pooled"}.get(
                radius, f"pooled r={radius}"
            )
            maps = f", {pooling} maps"
        return (
            f"{self.backbone} at {self.image_size} px, levels {span}, "
            f"{self.score} score of {adding} levels{maps}"
        )

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` inverts it."""
        return {**dataclasses.asdict(self), "levels": list(self.image_levels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """From :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown detector settings {unknown}; known: {sorted(names)}")
        values = dict(data)
        if isinstance(values.get("levels"), list):
            values["levels"] = tuple(values["levels"])
        return cls(**values)


@dataclass(frozen=True)
class LoaderOptions:
    """How a detector runs; none of it changes what it computes.

    Parameters
    ----------
    device : "cpu", "cuda", "cuda:1"; None = CUDA when present.
    batch_size : images per forward pass.
    workers : the most decoding threads; fewer run where fewer keep up with the model
        (see :class:`~gaussian_ad.features.extract.DecodeGate`).
    weights : a backbone weights file; None = resolve offline (see backbones.models).
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    device: str | None = None
    batch_size: int = 32
    workers: int = 2
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))


DEFAULT_LOADER = LoaderOptions()
