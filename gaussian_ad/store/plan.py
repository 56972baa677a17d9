"""The row plan of a training run's feature store: fit rows, held-out rows, test rows.

The fit uses 4/5 of train/good (fold 0 of KFold(5, shuffle, seed), as the paper splits);
the other fifth calibrates thresholds and the fused score. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold

from gaussian_ad.config import DetectorConfig
from gaussian_ad.data.images import ImageRecord, folder_manifest, manifest_fingerprint

logger = logging.getLogger(__name__)


def holdout_split(n: int, n_folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: fold 0 of KFold(n_folds, shuffle, seed), as the paper splits."""
    if n < n_folds:
        raise ValueError(f"need at least {n_folds} normal training images to hold out a fold")
    fit_idx, held_idx = next(KFold(n_folds, shuffle=True, random_state=seed).split(np.arange(n)))
    return fit_idx, held_idx


def augmented_rows(
    records: Sequence[ImageRecord], passes: int
) -> tuple[list[ImageRecord], list[int]]:
    """Store rows and their augmentation pass: once each (pass -1) without passes, else
    pass by pass, so row ``p * len(records) + i`` is image i in pass p (the numbering
    :class:`SeededAugment` and :func:`augmented_moments` use)."""
    records = list(records)
    if passes <= 0:
        return records, [-1] * len(records)
    return records * passes, [p for p in range(passes) for _ in records]


@dataclass(frozen=True)
class TrainingPlan:
    """The records of a run and which store rows fit, calibrate and test."""

    fit: list[ImageRecord]
    held: list[ImageRecord]
    test: list[ImageRecord]
    augment_passes: int = 0
    incremental: bool = False  # fit records are new normals merged into a base model

    @classmethod
    def from_manifest(
        cls, records: Sequence[ImageRecord], seed: int, augment_passes: int = 0
    ) -> TrainingPlan:
        train = [r for r in records if r.split == "train"]
        fit_idx, held_idx = holdout_split(len(train), seed=seed)
        test = [r for r in records if r.split == "test"]
        return cls([train[i] for i in fit_idx], [train[i] for i in held_idx], test, augment_passes)

    def with_new_normals(self, folder: str, category: str) -> TrainingPlan:
        """The same held-out and test rows, with the new normal images as the fit rows."""
        new = [ImageRecord(r.path, category, "train", 0, "good") for r in folder_manifest([folder])]
        if not new:
            raise ValueError(f"new_images: no images found in {folder}")
        return TrainingPlan(new, self.held, self.test, self.augment_passes, incremental=True)

    def rows(self) -> tuple[list[ImageRecord], list[int]]:
        """Store rows and their augmentation pass: fit rows (once per pass), held, test."""
        fit_rows, fit_passes = augmented_rows(self.fit, self.augment_passes)
        rest = self.held + self.test
        return fit_rows + rest, fit_passes + [-1] * len(rest)

    def row_index(self) -> dict[str, np.ndarray]:
        """Store row numbers of the fit, held-out and test rows."""
        n_fit = len(self.fit) * max(self.augment_passes, 1)
        n_held = len(self.held)
        return {
            "fit": np.arange(n_fit),
            "held": np.arange(n_fit, n_fit + n_held),
            "test": np.arange(n_fit + n_held, n_fit + n_held + len(self.test)),
        }

    def store_url(self, home: Path, category: str, fingerprint: str, config: DetectorConfig) -> str:
        """One store per data, features and plan: reruns resume it, other settings do not."""
        levels = "-".join(map(str, config.image_levels))
        patch = (
            f"-patch{config.patch_grid or 'auto'}x{config.patch_channels}" if config.patch else ""
        )
        new = f"-inc{manifest_fingerprint(self.fit)[:12]}" if self.incremental else ""
        name = (
            f"{fingerprint[:16]}-{config.backbone}-L{levels}{patch}"
            f"-aug{self.augment_passes}-seed{config.seed}{new}.zarr"
        )
        return str(home / "stores" / category / name)
