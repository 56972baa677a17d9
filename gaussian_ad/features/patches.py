"""Patch features: how per-position features are cut from a backbone's maps (PaDiM-style).

Patch features follow PaDiM (Defard et al. 2020): the maps of three levels with strides 4, 8
and 16 (PaDiM's ResNet layers 1-3; EfficientNet levels 3-5, ResNet levels 2-4 here) are
resized bilinearly to a common grid, concatenated along channels, and reduced to a fixed,
seeded random subset of ``n_channels`` = 100 channels (PaDiM's d for ResNet-18).

The default grid is the stride-8 resolution (28 x 28 for a 224 input), the feature resolution
of PatchCore (Roth et al. 2022), rather than PaDiM's stride 4 (56 x 56), which costs 4x the
memory and time of every per-position statistic. The final map is smoothed by a Gaussian one
grid cell wide, as PaDiM's sigma of 4 px is on its stride-4 grid. ``grid=56`` gives PaDiM's
layout.
The statistics over these features are :class:`~gaussian_ad.stats.patch_gaussian.PatchGaussian`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def patch_features(
    backbone_maps: Sequence[torch.Tensor], grid: int, channel_index: np.ndarray
) -> np.ndarray:
    """(B, P = grid * grid, d) float32 patch features from per-level (B, C_l, H_l, W_l) maps.

    Each level's chosen channels (``channel_index`` indexes the concatenation of all levels'
    channels, sorted) are resized bilinearly (align_corners=False) to grid x grid.
    """
    return patch_tensor(backbone_maps, grid, channel_index).cpu().numpy()


def patch_tensor(
    backbone_maps: Sequence[torch.Tensor], grid: int, channel_index: np.ndarray
) -> torch.Tensor:
    """:func:`patch_features` as a float32 tensor on the maps' device (also what the ONNX
    export traces)."""
    channel_index = np.asarray(channel_index)
    parts, offset = [], 0
    for level_map in backbone_maps:
        channels = int(level_map.shape[1])  # static: also when traced for export
        local = channel_index[(channel_index >= offset) & (channel_index < offset + channels)]
        offset += channels
        if local.size == 0:
            continue
        index = torch.as_tensor(local - (offset - channels), device=level_map.device)
        selected = level_map.index_select(1, index).float()
        if tuple(map(int, selected.shape[-2:])) != (grid, grid):
            selected = F.interpolate(selected, size=(grid, grid), mode="bilinear")
        parts.append(selected)
    if offset <= int(channel_index.max()):
        raise ValueError(f"channel index {channel_index.max()} out of range ({offset} channels)")
    stacked = torch.cat(parts, dim=1)  # (B, d, grid, grid)
    return stacked.permute(0, 2, 3, 1).reshape(stacked.shape[0], grid * grid, -1)
