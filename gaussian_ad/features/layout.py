"""The patch layout: which levels, grid and channels patch features are cut from.

Torch-free: the layout travels with stores and models, and out-of-core fits that only
reduce statistics never import the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gaussian_ad.backbones.specs import BackboneSpec, parse_levels
from gaussian_ad.config import DEFAULT_PATCH_CHANNELS, DetectorConfig

if TYPE_CHECKING:
    from gaussian_ad.backbones.models import Backbone

DEFAULT_GRID_STRIDE = 8  # the default grid: the input size / 8, rounded up


def default_patch_levels(spec: BackboneSpec) -> tuple[int, ...]:
    """The levels with strides 4, 8, 16 (PaDiM's layers 1-3) of a backbone."""
    return (3, 4, 5) if spec.is_efficientnet else (2, 3, 4)


def random_channel_index(n_total: int, n_channels: int, seed: int) -> np.ndarray:
    """A sorted, seeded random subset of ``n_channels`` of ``n_total`` channels."""
    if not 1 <= n_channels <= n_total:
        raise ValueError(f"n_channels must lie in [1, {n_total}], got {n_channels}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n_channels, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class PatchLayout:
    """How patch features are cut from a backbone: levels, grid and kept channels."""

    levels: tuple[int, ...]
    grid: int
    channel_index: tuple[int, ...]  # into the concatenated channels of ``levels``

    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        levels: str | Sequence[int] | None = None,
        grid: int | None = None,
        n_channels: int = DEFAULT_PATCH_CHANNELS,
        seed: int = 0,
    ) -> PatchLayout:
        """The layout for ``backbone`` (levels default to strides 4-16, grid to stride 8's)."""
        levels = (
            default_patch_levels(backbone.spec)
            if levels is None
            else parse_levels(levels, backbone.spec.n_levels)
        )
        missing = [level for level in levels if level not in backbone.levels]
        if missing:
            raise ValueError(f"levels {missing} are not among the backbone's {backbone.levels}")
        dims = [backbone.level_dims[backbone.levels.index(level)] for level in levels]
        if grid is None:
            grid = -(-backbone.spec.image_size // DEFAULT_GRID_STRIDE)
        index = random_channel_index(sum(dims), n_channels, seed)
        return cls(tuple(levels), int(grid), tuple(int(i) for i in index))

    @classmethod
    def for_config(cls, backbone: Backbone, config: DetectorConfig) -> PatchLayout:
        """The layout a detector configuration asks for (grid, channels, seed)."""
        return cls.for_backbone(
            backbone, grid=config.patch_grid, n_channels=config.patch_channels, seed=config.seed
        )

    def feature_shape(self, n: int) -> tuple[int, int, int]:
        """The shape of ``n`` images' patch features: (n, positions, channels)."""
        return n, self.n_positions, len(self.channel_index)

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "grid": self.grid,
            "channels": list(self.channel_index),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchLayout:
        return cls(tuple(data["levels"]), int(data["grid"]), tuple(data["channels"]))
