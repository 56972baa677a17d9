"""Extraction into a feature store shard by shard, and augmented passes into statistics.

A shard is the unit of fan-out: :func:`extract_shard` reads its images, runs the
backbone and writes the rows plus the shard's completion marker. Augmented rows are
a pure function of (seed, row), so a re-extracted shard is identical.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gaussian_ad.backbones.models import Backbone
from gaussian_ad.config import DEFAULT_LOADER, DetectorConfig, LoaderOptions
from gaussian_ad.data.augment import AugmentConfig, SeededAugment
from gaussian_ad.data.images import ImageRecord, file_digest
from gaussian_ad.features.extract import iter_batches
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.stats.moments import Moments
from gaussian_ad.store.feature_store import FeatureStore
from gaussian_ad.store.plan import TrainingPlan, augmented_rows

logger = logging.getLogger(__name__)


def create_store(
    url: str,
    records: Sequence[ImageRecord],
    backbone: Backbone,
    *,
    levels: Sequence[int] | None = None,
    shard_size: int = 256,
    augment_passes: int | Sequence[int] = 0,
    dtype: str = "float32",
    config: dict[str, Any] | None = None,
    patch_layout: PatchLayout | None = None,
) -> FeatureStore:
    """Create (or reopen, to resume) the store for ``records`` and ``levels`` (default:
    all the backbone computes).

    With ``augment_passes = K > 0`` the store has K rows per image, pass by pass (or give
    each record's pass, -1 for none: see :func:`augmented_rows`). With a ``patch_layout``
    the store also keeps every row's patch features.
    """
    if isinstance(augment_passes, int):
        records, passes = augmented_rows(records, augment_passes)
    else:
        passes = list(augment_passes)
    levels = backbone.levels if levels is None else tuple(levels)
    return FeatureStore.create(
        url,
        list(records),
        levels,
        [backbone.level_dims[backbone.levels.index(level)] for level in levels],
        shard_size=shard_size,
        augment_passes=passes,
        dtype=dtype,
        config={
            "backbone": backbone.spec.name,
            "image_size": backbone.spec.image_size,
            **(config or {}),
        },
        patch_layout=None if patch_layout is None else patch_layout.to_dict(),
    )


def extract_shard(
    store: FeatureStore,
    shard: int,
    backbone: Backbone,
    options: LoaderOptions = DEFAULT_LOADER,
    seed: int = 0,
    augment: AugmentConfig | None = None,
) -> dict[str, Any]:
    """Extract one shard into the store (skipped if already complete); returns its info.

    Rows with an augmentation pass get a :class:`SeededAugment` fixed by (seed, row),
    so re-extracting a shard reproduces it exactly; its transforms are ``augment``, or
    (None) the row's category defaults (:meth:`AugmentConfig.for_category`). The backbone
    may compute more levels than the store keeps (e.g. the patch levels); a store with a
    patch layout gets the patch features from the same pass.
    """
    if shard in store.complete_shards():
        logger.info("%s: shard %d already complete, skipped", store.url, shard)
        return {**store.shard_marker(shard)["info"], "skipped": True}
    started = time.perf_counter()
    rows = store.shard_rows(shard)
    manifest = store.shard_manifest(shard)
    paths = manifest["path"].tolist()
    transforms = [
        SeededAugment(augment or AugmentConfig.for_category(category), seed, row)
        if p >= 0
        else None
        for row, category, p in zip(
            range(rows.start, rows.stop),
            manifest["category"],
            manifest["augment_pass"],
            strict=True,
        )
    ]
    n = len(paths)
    columns = [backbone.levels.index(level) for level in store.levels]
    levels = [np.full((n, d), np.nan, dtype=np.float32) for d in store.dims]
    layout = None if store.patch_layout is None else PatchLayout.from_dict(store.patch_layout)
    patches = None
    if layout is not None:
        patches = np.full(layout.feature_shape(n), np.nan, np.float32)
    valid = np.zeros(n, dtype=bool)
    errors = []
    for batch in iter_batches(backbone, paths, options, layout=layout, transform=transforms):
        for full, column in zip(levels, columns, strict=True):
            full[batch.index] = batch.pooled[column]
        if patches is not None:
            patches[batch.index] = batch.patches
        valid[batch.index] = True
        errors.extend(batch.errors)
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
    options: LoaderOptions = DEFAULT_LOADER,
    seed: int = 0,
) -> list[Moments]:
    """Stream ``passes`` augmented passes over ``paths`` straight into per-level statistics.

    Features are reduced batch by batch and never kept; row ``p * len(paths) + i`` is
    augmented with the same (seed, row) as in an augmented feature store.
    """
    totals = [Moments.empty(d) for d in backbone.level_dims]
    for p in range(passes):
        transforms = [SeededAugment(config, seed, p * len(paths) + i) for i in range(len(paths))]
        for batch in iter_batches(backbone, paths, options, transform=transforms):
            totals = [t + Moments.from_array(x) for t, x in zip(totals, batch.pooled, strict=True)]
    return totals


def create_plan_store(
    url: str,
    plan: TrainingPlan,
    backbone: Backbone,
    config: DetectorConfig,
    loader: LoaderOptions,
    shard_size: int,
) -> FeatureStore:
    """Create (or reopen) the store of a training plan for a detector configuration: its
    image levels and, with a patch model, its patch layout."""
    layout = PatchLayout.for_config(backbone, config) if config.patch else None
    records, passes = plan.rows()
    return create_store(
        url,
        records,
        backbone,
        levels=config.image_levels,
        shard_size=shard_size,
        augment_passes=passes,
        config={
            "weights": loader.weights,
            "pretrained": config.pretrained,
            "weights_fingerprint": backbone.weights_fingerprint,
        },
        patch_layout=layout,
    )
