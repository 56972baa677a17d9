"""The row plan of a training run's feature store, and the folds of cross-fitting.

The final models are fitted on every normal training image. Calibration (the threshold and
the fused score's standardiser) uses out-of-fold scores: each image is scored by the model
without its fold (scikit-learn's KFold(5, shuffle, seed), as the paper splits), whose
statistics are the total minus that fold's, exactly. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gaussian_ad.config import DetectorConfig
from gaussian_ad.data.augment import AugmentConfig
from gaussian_ad.data.images import ImageRecord, folder_manifest, manifest_fingerprint

logger = logging.getLogger(__name__)


N_FOLDS = 5


def fold_ids(keys: Sequence[str], n_folds: int = N_FOLDS, seed: int = 0) -> np.ndarray:
    """The cross-fitting fold of each training row: KFold(n_folds, shuffle, seed) over the
    distinct ``keys`` (image paths), so every augmented copy of an image shares its fold.

    With fewer distinct images than folds, each image is its own fold.
    """
    unique, inverse = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    if len(unique) < 2:
        raise ValueError(f"need at least 2 distinct training images, got {len(unique)}")
    folds = np.empty(len(unique), dtype=np.int64)
    for k, held in enumerate(kfold_held_out(len(unique), min(n_folds, len(unique)), seed)):
        folds[held] = k
    return folds[inverse]


def kfold_held_out(n: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Each fold's held-out indices, as ``KFold(n_folds, shuffle=True, random_state=seed)``
    splits ``range(n)``: a RandomState(seed) shuffle cut into consecutive folds (the first
    ``n % n_folds`` one longer), each sorted (scikit-learn is not imported for it: see
    :mod:`gaussian_ad.stats.estimator`).

    Examples
    --------
    >>> from gaussian_ad.store.plan import kfold_held_out
    >>> [fold.tolist() for fold in kfold_held_out(7, 3, seed=0)]
    [[1, 2, 6], [0, 3], [4, 5]]
    """
    if not 2 <= n_folds <= n:
        raise ValueError(f"need 2 <= n_folds <= n, got n_folds={n_folds} for n={n}")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    return [np.sort(fold) for fold in np.split(order, np.cumsum(sizes)[:-1])]


def holdout_split(n: int, n_folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: fold 0 of KFold(n_folds, shuffle, seed), as the paper splits."""
    if n < n_folds:
        raise ValueError(f"need at least {n_folds} normal training images to hold out a fold")
    held_idx = kfold_held_out(n, n_folds, seed)[0]
    return np.setdiff1d(np.arange(n), held_idx), held_idx


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
    """The records of a run: the normal images that fit (all of train/good, or the new
    normals of an incremental run) and the test images; the augmented passes over the fit
    images and their transforms (``augment``; None: each image's category defaults,
    :meth:`AugmentConfig.for_category`)."""

    fit: list[ImageRecord]
    test: list[ImageRecord]
    augment_passes: int = 0
    incremental: bool = False  # fit records are new normals merged into a base model
    augment: AugmentConfig | None = None

    @classmethod
    def from_manifest(
        cls,
        records: Sequence[ImageRecord],
        augment_passes: int = 0,
        augment: AugmentConfig | None = None,
    ) -> TrainingPlan:
        train = [r for r in records if r.split == "train"]
        test = [r for r in records if r.split == "test"]
        return cls(train, test, augment_passes, augment=augment)

    def with_new_normals(self, folder: str, category: str) -> TrainingPlan:
        """The same test rows, with the new normal images as the fit rows."""
        new = [ImageRecord(r.path, category, "train", 0, "good") for r in folder_manifest([folder])]
        if len(new) < 2:
            raise ValueError(f"new_images: need at least 2 images in {folder}, found {len(new)}")
        return TrainingPlan(
            new, self.test, self.augment_passes, incremental=True, augment=self.augment
        )

    def rows(self) -> tuple[list[ImageRecord], list[int]]:
        """Store rows and their augmentation pass: fit rows (once per pass), then test."""
        fit_rows, fit_passes = augmented_rows(self.fit, self.augment_passes)
        return fit_rows + self.test, fit_passes + [-1] * len(self.test)

    def row_index(self) -> dict[str, np.ndarray]:
        """Store row numbers of the fit and test rows."""
        n_fit = len(self.fit) * max(self.augment_passes, 1)
        return {"fit": np.arange(n_fit), "test": np.arange(n_fit, n_fit + len(self.test))}

    def store_url(self, home: Path, category: str, fingerprint: str, config: DetectorConfig) -> str:
        """One store per data, features and plan: reruns resume it, other settings do not.

        The name carries the input side (features of another side are other features);
        augmented passes with a chosen ``augment`` add its digest to the name.
        """
        levels = "-".join(map(str, config.image_levels))
        patch = (
            f"-patch{config.patch_grid or 'auto'}x{config.patch_channels}" if config.patch else ""
        )
        new = f"-inc{manifest_fingerprint(self.fit)[:12]}" if self.incremental else ""
        augment = ""
        if self.augment is not None and self.augment_passes > 0:
            chosen = json.dumps(asdict(self.augment), sort_keys=True).encode()
            augment = f"-{hashlib.sha256(chosen).hexdigest()[:8]}"
        name = (
            f"{fingerprint[:16]}-{config.backbone}-{config.image_size}px-L{levels}{patch}"
            f"-aug{self.augment_passes}{augment}-seed{config.seed}{new}.zarr"
        )
        return str(home / "stores" / category / name)
