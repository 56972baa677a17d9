"""Extraction into a feature store shard by shard, and augmented passes into statistics.

A shard is the unit of fan-out: :func:`extract_shard` reads its images, runs the
backbone and writes the rows plus the shard's completion marker. Augmented rows are
a pure function of (seed, row), so a re-extracted shard is identical.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gaussian_ad.augment import AugmentConfig, SeededAugment
from gaussian_ad.backbones import Backbone
from gaussian_ad.features import extract, iter_feature_batches
from gaussian_ad.images import ImageRecord, file_digest
from gaussian_ad.moments import Moments
from gaussian_ad.patch import PatchLayout, iter_patch_feature_batches
from gaussian_ad.store import FeatureStore


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


def create_store(
    url: str,
    records: Sequence[ImageRecord],
    backbone: Backbone,
    *,
    shard_size: int = 256,
    augment_passes: int = 0,
    dtype: str = "float32",
    config: dict[str, Any] | None = None,
    patch_layout: PatchLayout | None = None,
) -> FeatureStore:
    """Create (or reopen, to resume) the store for ``records`` and the backbone's levels.

    With ``augment_passes = K > 0`` the store has K rows per image, pass by pass. With a
    ``patch_layout`` the store also keeps every row's patch features.
    """
    rows, passes = augmented_rows(records, augment_passes)
    return FeatureStore.create(
        url,
        rows,
        backbone.levels,
        backbone.level_dims,
        shard_size=shard_size,
        augment_passes=passes,
        dtype=dtype,
        config={"backbone": backbone.spec.name, **(config or {})},
        patch_layout=None if patch_layout is None else patch_layout.to_dict(),
    )


def extract_shard(
    store: FeatureStore,
    shard: int,
    backbone: Backbone,
    *,
    batch_size: int = 32,
    workers: int = 2,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Extract one shard into the store (skipped if already complete); returns its info.

    Rows with an augmentation pass get a :class:`SeededAugment` fixed by (seed, row),
    so re-extracting a shard reproduces it exactly. The backbone may compute more levels
    than the store keeps (e.g. the patch levels); a store with a patch layout gets the
    patch features from the same pass.
    """
    if shard in store.complete_shards():
        return {**store.shard_marker(shard)["info"], "skipped": True}
    started = time.perf_counter()
    rows = store.shard_rows(shard)
    manifest = store.shard_manifest(shard)
    paths = manifest["path"].tolist()
    transforms = [
        SeededAugment(AugmentConfig.for_category(category), seed, row) if p >= 0 else None
        for row, category, p in zip(
            range(rows.start, rows.stop),
            manifest["category"],
            manifest["augment_pass"],
            strict=True,
        )
    ]
    stream = {"batch_size": batch_size, "workers": workers, "transform": transforms}
    n = len(paths)
    columns = [backbone.levels.index(level) for level in store.levels]
    levels = [np.full((n, d), np.nan, dtype=np.float32) for d in store.dims]
    patches = None
    if store.patch_layout is None:
        features = extract(backbone, paths, device=device, **stream)
        for full, column in zip(levels, columns, strict=True):
            full[features.index] = features.levels[column]
        decoded, errors = features.index, features.errors
    else:
        layout = PatchLayout.from_dict(store.patch_layout)
        patches = np.full((n, layout.n_positions, len(layout.channel_index)), np.nan, np.float32)
        errors, batches = [], [np.empty(0, np.int64)]
        for index, batch_patches, pooled, batch_errors in iter_patch_feature_batches(
            backbone, layout, paths, device=device, **stream
        ):
            patches[index] = batch_patches
            for full, column in zip(levels, columns, strict=True):
                full[index] = pooled[column]
            errors.extend(batch_errors)
            batches.append(index)
        decoded = np.concatenate(batches)
    valid = np.zeros(n, dtype=bool)
    valid[decoded] = True
    failed = {e.path for e in errors}
    hashes = [None if p in failed else file_digest(p) for p in paths]
    info = {
        "shard": shard,
        "rows": n,
        "errors": len(errors),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    store.write_shard(shard, levels, valid, hashes, errors, info, patches)
    return {**info, "skipped": False}


def augmented_moments(
    backbone: Backbone,
    paths: Sequence[str],
    passes: int,
    config: AugmentConfig,
    *,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 2,
    device: str | None = None,
) -> list[Moments]:
    """Stream ``passes`` augmented passes over ``paths`` straight into per-level statistics.

    Features are reduced batch by batch and never kept; row ``p * len(paths) + i`` is
    augmented with the same (seed, row) as in an augmented feature store.
    """
    totals = [Moments.empty(d) for d in backbone.level_dims]
    for p in range(passes):
        transforms = [SeededAugment(config, seed, p * len(paths) + i) for i in range(len(paths))]
        for _, levels, _ in iter_feature_batches(
            backbone,
            paths,
            batch_size=batch_size,
            workers=workers,
            transform=transforms,
            device=device,
        ):
            totals = [t + Moments.from_array(x) for t, x in zip(totals, levels, strict=True)]
    return totals
