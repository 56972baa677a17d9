"""Patch-level Gaussian: one Gaussian per spatial position, anomaly maps (PaDiM-style).

Patch features follow PaDiM (Defard et al. 2020): the maps of three levels with strides 4, 8
and 16 (PaDiM's ResNet layers 1-3; EfficientNet levels 3-5, ResNet levels 2-4 here) are
resized bilinearly to a common grid, concatenated along channels, and reduced to a fixed,
seeded random subset of ``n_channels`` = 100 channels (PaDiM's d for ResNet-18).

The default grid is the stride-8 resolution (28 x 28 for a 224 input), the feature resolution
of PatchCore (Roth et al. 2022), rather than PaDiM's stride 4 (56 x 56): the final map is
smoothed by a Gaussian of sigma 4 input pixels (full width at half maximum 9.4 px), which
already removes detail finer than a stride-8 cell (8 px), while the stride-4 grid costs 4x
the memory and time of every per-position statistic. ``grid=56`` gives PaDiM's layout.

Per position, the model is the image-level one of Rippel et al.: the mean and scikit-learn's
Ledoit-Wolf covariance, fitted from mergeable sums (:class:`BatchMoments`) accumulated batch
by batch, so memory does not depend on the number of images and incremental fits are exact.
A position's score is the (unsquared) Mahalanobis distance. The anomaly map is the score
grid upsampled bilinearly to the input size and smoothed by a Gaussian of sigma 4 (PaDiM);
its maximum is the patch-level image score.

Memory (float64 statistics, d = 100): each (P, d, d) array takes P * 80 kB; 14 x 14: 16 MB,
28 x 28: 63 MB, 56 x 56: 251 MB. A fitted model holds two of them (the sums and the
precisions); a streaming fit peaks at about three (the running sums, a batch's sums and
their total) plus one batch of features.

The per-position linear algebra runs on many small matrices; it runs with one BLAS thread,
which on a busy machine is an order of magnitude faster than several.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from gaussian_ad.arrayfile import read_arrays, write_arrays
from gaussian_ad.backbones import Backbone, BackboneSpec, parse_levels
from gaussian_ad.features import Features, Transform, autocast_for, iter_input_batches
from gaussian_ad.images import ImageError, ImageSource
from gaussian_ad.moments import BatchMoments

DEFAULT_N_CHANNELS = 100  # PaDiM's d for ResNet-18
DEFAULT_GRID_STRIDE = 8  # the default grid: the input size / 8, rounded up
DEFAULT_SIGMA = 4.0  # PaDiM's smoothing of the upsampled map
FORMAT_VERSION = 1
POSITIONS_PER_CHUNK = 256  # positions per Ledoit-Wolf / inverse step (bounds temporaries)


def default_patch_levels(spec: BackboneSpec) -> tuple[int, ...]:
    """The levels with strides 4, 8, 16 (PaDiM's layers 1-3) of a backbone."""
    return (3, 4, 5) if spec.is_efficientnet else (2, 3, 4)


def random_channel_index(n_total: int, n_channels: int, seed: int) -> np.ndarray:
    """A sorted, seeded random subset of ``n_channels`` of ``n_total`` channels."""
    if not 1 <= n_channels <= n_total:
        raise ValueError(f"n_channels must lie in [1, {n_total}], got {n_channels}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n_channels, replace=False)).astype(np.int64)


def patch_features(
    backbone_maps: Sequence[torch.Tensor], grid: int, channel_index: np.ndarray
) -> np.ndarray:
    """(B, P = grid * grid, d) float32 patch features from per-level (B, C_l, H_l, W_l) maps.

    Each level's chosen channels (``channel_index`` indexes the concatenation of all levels'
    channels, sorted) are resized bilinearly (align_corners=False) to grid x grid.
    """
    channel_index = np.asarray(channel_index)
    parts, offset = [], 0
    for level_map in backbone_maps:
        channels = level_map.shape[1]
        local = channel_index[(channel_index >= offset) & (channel_index < offset + channels)]
        offset += channels
        if local.size == 0:
            continue
        index = torch.as_tensor(local - (offset - channels), device=level_map.device)
        selected = level_map.index_select(1, index).float()
        if selected.shape[-2:] != (grid, grid):
            selected = F.interpolate(selected, size=(grid, grid), mode="bilinear")
        parts.append(selected)
    if offset <= int(channel_index.max()):
        raise ValueError(f"channel index {channel_index.max()} out of range ({offset} channels)")
    stacked = torch.cat(parts, dim=1)  # (B, d, grid, grid)
    return stacked.permute(0, 2, 3, 1).reshape(stacked.shape[0], grid * grid, -1).cpu().numpy()


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
        n_channels: int = DEFAULT_N_CHANNELS,
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

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid

    def features(self, backbone: Backbone, x: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """One backbone pass over a normalised batch: (B, P, d) float32 patch features, and
        the (B, d_l) float32 mean-pooled features of every level the backbone selects.
        """
        with torch.inference_mode():
            with autocast_for(x.device):
                maps = backbone.forward_maps(x)
            pooled = [m.mean(dim=(2, 3), dtype=torch.float32).cpu().numpy() for m in maps]
            chosen = [maps[backbone.levels.index(level)] for level in self.levels]
            return patch_features(chosen, self.grid, np.asarray(self.channel_index)), pooled

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "grid": self.grid,
            "channels": list(self.channel_index),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchLayout:
        return cls(tuple(data["levels"]), int(data["grid"]), tuple(data["channels"]))


class PatchGaussian:
    """Per-position Gaussian with Ledoit-Wolf shrinkage on (n, P, d) patch features.

    Parameters
    ----------
    sigma : standard deviation (in output pixels) of the Gaussian that smooths the maps.

    Learned: ``moments_`` (the sums), ``means_`` (P, d), ``precisions_`` (P, d, d),
    ``shrinkages_`` (P,), ``grid_`` (square grids: P = grid_ ** 2), and ``layout_`` when
    fitted through :func:`fit_patch`.
    """

    def __init__(self, sigma: float = DEFAULT_SIGMA):
        self.sigma = sigma
        self.layout_: PatchLayout | None = None

    # ----------------------------------------------------------------- fitting
    def fit(self, features: np.ndarray) -> Self:
        """Fit on in-memory (n, P, d) features."""
        return self.fit_moments(BatchMoments.from_array(features))

    def fit_moments(self, moments: BatchMoments) -> Self:
        """Fit every position's Gaussian from statistics (exactly sklearn's LedoitWolf)."""
        if moments.n < 2:
            raise ValueError(f"need at least 2 training images, got {moments.n}")
        grid = math.isqrt(moments.n_sets)
        if grid * grid != moments.n_sets:
            raise ValueError(f"{moments.n_sets} positions do not form a square grid")
        if self.layout_ is not None and self.layout_.n_positions != moments.n_sets:
            raise ValueError(f"{moments.n_sets} positions, the layout has {self.layout_.grid}^2")
        precisions = np.empty_like(moments.sum_yy)
        shrinkages = np.empty(moments.n_sets)
        with threadpool_limits(1, user_api="blas"):
            for start in range(0, moments.n_sets, POSITIONS_PER_CHUNK):
                chunk = slice(start, start + POSITIONS_PER_CHUNK)
                covariance, shrinkages[chunk] = moments.take(chunk).ledoit_wolf()
                precision = np.linalg.inv(covariance)  # shrunk: positive definite
                precisions[chunk] = 0.5 * (precision + precision.swapaxes(-1, -2))
        self.moments_ = moments
        self.grid_ = grid
        self.means_ = moments.mean
        self.precisions_ = precisions
        self.shrinkages_ = shrinkages
        self.n_samples_ = moments.n
        return self

    @property
    def covariances_(self) -> np.ndarray:
        """Ledoit-Wolf covariances (P, d, d), recomputed from the sums (not kept in memory)."""
        return self.moments_.ledoit_wolf()[0]

    def partial_fit(self, features: np.ndarray) -> Self:
        """Merge new normal (n, P, d) features into the statistics and refit (exact)."""
        shift = self.moments_.shift if hasattr(self, "moments_") else None
        return self.merge_moments(BatchMoments.from_array(features, shift))

    def merge_moments(self, moments: BatchMoments) -> Self:
        """Merge statistics of new images and refit (or fit, when not fitted yet)."""
        if hasattr(self, "moments_"):
            moments = self.moments_ + moments
        return self.fit_moments(moments)

    # ----------------------------------------------------------------- scoring
    def score_maps(self, features: np.ndarray) -> np.ndarray:
        """Unsquared Mahalanobis distance per position: (B, grid, grid) float64."""
        features = np.asarray(features)
        if features.ndim != 3 or features.shape[1:] != self.means_.shape:
            raise ValueError(
                f"features of shape {features.shape}, expected (B, *{self.means_.shape})"
            )
        diff = features.astype(np.float64).transpose(1, 0, 2) - self.means_[:, None, :]
        with threadpool_limits(1, user_api="blas"):
            squared = np.einsum("pbi,pbi->bp", diff @ self.precisions_, diff)
        distances = np.sqrt(np.clip(squared, 0.0, None))
        return distances.reshape(len(features), self.grid_, self.grid_)

    def anomaly_maps(self, features: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(image scores (B,) float64, anomaly maps (B, size, size) float32).

        The score grid is upsampled bilinearly (align_corners=False) to size x size and
        smoothed with a Gaussian of ``sigma`` pixels; an image's score is its map's maximum.
        """
        grids = torch.from_numpy(self.score_maps(features))[:, None]
        upsampled = F.interpolate(grids, size=(size, size), mode="bilinear")[:, 0].numpy()
        maps = gaussian_filter(upsampled, sigma=(0.0, self.sigma, self.sigma))
        return maps.reshape(len(maps), -1).max(axis=1), maps.astype(np.float32)

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """One safetensors file: the sums (arrays) + sigma, layout, metadata (JSON); no pickle."""
        path = Path(path)
        header = {
            "format_version": FORMAT_VERSION,
            "sigma": self.sigma,
            "layout": None if self.layout_ is None else self.layout_.to_dict(),
            "metadata": metadata or {},
        }
        return write_arrays(path, self.moments_.to_arrays("moments."), "gaussian_ad_patch", header)

    @classmethod
    def load(cls, path: str | Path) -> PatchGaussian:
        """Read a model written by :meth:`save` (refits from the sums: identical results)."""
        header, arrays = read_arrays(path, "gaussian_ad_patch", FORMAT_VERSION, "patch-level model")
        model = cls(sigma=header["sigma"])
        if header["layout"] is not None:
            model.layout_ = PatchLayout.from_dict(header["layout"])
        model.fit_moments(BatchMoments.from_arrays(arrays, "moments."))
        model.metadata_ = header["metadata"]
        return model


# --------------------------------------------------------------------------- end to end
@dataclass
class PatchScores:
    """Patch-level results of the images that decoded; ``index`` maps rows to the inputs."""

    index: np.ndarray
    scores: np.ndarray  # (n,) maximum of each anomaly map
    maps: np.ndarray  # (n, size, size) float32 anomaly maps at the backbone's input size
    pooled: list[np.ndarray]  # (n, d_l) pooled features of the backbone's levels, same pass
    errors: list[ImageError] = field(default_factory=list)


def iter_patch_feature_batches(
    backbone: Backbone,
    layout: PatchLayout,
    sources: Sequence[ImageSource],
    *,
    batch_size: int = 32,
    workers: int = 2,
    transform: Transform | Sequence[Transform | None] | None = None,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray], list[ImageError]]]:
    """Stream (indices, (n, P, d) patch features, per-level (n, d_l) pooled features, errors).

    One backbone pass per batch gives both (see :meth:`PatchLayout.features`); arguments as
    for :func:`gaussian_ad.features.iter_feature_batches`.
    """
    batches = iter_input_batches(
        backbone,
        sources,
        batch_size=batch_size,
        workers=workers,
        transform=transform,
        names=names,
        device=device,
    )
    if progress:
        batches = tqdm(batches, total=math.ceil(len(sources) / batch_size), unit="batch")
    for indices, x, errors in batches:
        if x is None:
            patches = np.empty((0, layout.n_positions, len(layout.channel_index)), np.float32)
            pooled = [np.empty((0, d), dtype=np.float32) for d in backbone.level_dims]
        else:
            patches, pooled = layout.features(backbone, x)
        yield indices, patches, pooled, errors


def _concatenated_pooled(batches: list[list[np.ndarray]], backbone: Backbone) -> list[np.ndarray]:
    return [
        np.concatenate([np.empty((0, d), np.float32), *(b[i] for b in batches)])
        for i, d in enumerate(backbone.level_dims)
    ]


def fit_patch(
    backbone: Backbone,
    sources: Sequence[ImageSource],
    *,
    layout: PatchLayout | None = None,
    sigma: float = DEFAULT_SIGMA,
    model: PatchGaussian | None = None,
    **stream: Any,
) -> tuple[PatchGaussian, Features]:
    """Fit (or, given a fitted ``model``, update) a patch model, one batch of maps at a time.

    Returns the model and, from the same backbone pass, the pooled features of the
    backbone's levels (for an image-level :class:`GaussianAD`), their input positions and
    the unreadable images' error records. ``layout`` defaults to
    :meth:`PatchLayout.for_backbone` (or the model's); ``stream`` takes batch_size, workers,
    transform, names, device, progress (see :func:`iter_patch_feature_batches`).
    """
    if model is None:
        model = PatchGaussian(sigma)
    layout = layout or model.layout_ or PatchLayout.for_backbone(backbone)
    if model.layout_ not in (None, layout):
        raise ValueError("the model was fitted with another patch layout")
    total: BatchMoments | None = model.moments_ if hasattr(model, "moments_") else None
    indices, pooled, errors = [np.empty(0, np.int64)], [], []
    for batch_indices, patches, batch_pooled, batch_errors in iter_patch_feature_batches(
        backbone, layout, sources, **stream
    ):
        errors.extend(batch_errors)
        if len(patches):
            part = BatchMoments.from_array(patches, None if total is None else total.shift)
            total = part if total is None else total + part
            indices.append(batch_indices)
            pooled.append(batch_pooled)
    if total is None:
        raise ValueError(
            "no readable training images" + "".join(f"\n  {e.path}: {e.reason}" for e in errors)
        )
    model.layout_ = layout
    model.fit_moments(total)
    return model, Features(_concatenated_pooled(pooled, backbone), np.concatenate(indices), errors)


def score_patch(
    backbone: Backbone, model: PatchGaussian, sources: Sequence[ImageSource], **stream: Any
) -> PatchScores:
    """Anomaly maps and patch-level scores at the backbone's input size (see fit_patch)."""
    if model.layout_ is None:
        raise ValueError("the model has no patch layout: fit it with fit_patch")
    size = backbone.spec.image_size
    indices, scores, maps, pooled, errors = [np.empty(0, np.int64)], [np.empty(0)], [], [], []
    maps.append(np.empty((0, size, size), np.float32))
    for batch_indices, patches, batch_pooled, batch_errors in iter_patch_feature_batches(
        backbone, model.layout_, sources, **stream
    ):
        errors.extend(batch_errors)
        if len(patches):
            batch_scores, batch_maps = model.anomaly_maps(patches, size)
            indices.append(batch_indices)
            scores.append(batch_scores)
            maps.append(batch_maps)
            pooled.append(batch_pooled)
    return PatchScores(
        np.concatenate(indices),
        np.concatenate(scores),
        np.concatenate(maps),
        _concatenated_pooled(pooled, backbone),
        errors,
    )


def load_masks(mask_paths: Sequence[str | None], size: int) -> np.ndarray:
    """(n, size, size) bool ground truth, resized with nearest neighbour; None = all normal."""
    masks = np.zeros((len(mask_paths), size, size), dtype=bool)
    for i, path in enumerate(mask_paths):
        if path is not None:
            with Image.open(path) as mask:
                resized = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
            masks[i] = np.asarray(resized) > 127
    return masks
