"""Out-of-core fitting: shard-by-shard extraction into a feature store, Dask statistics.

Memory never grows with the number of images: extraction holds one shard, and the
fit reduces one chunk at a time into :class:`Moments` partials, tree-merged by Dask
(locally or on a cluster, whichever scheduler is active when the fit is computed).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import dask
import numpy as np
import zarr
from dask.delayed import Delayed
from distributed import get_worker, worker_client

from gaussian_ad.augment import AugmentConfig, SeededAugment
from gaussian_ad.backbones import Backbone
from gaussian_ad.features import extract, iter_feature_batches
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.images import ImageRecord, file_digest
from gaussian_ad.moments import Moments
from gaussian_ad.store import FeatureStore


def create_store(
    url: str,
    records: Sequence[ImageRecord],
    backbone: Backbone,
    *,
    shard_size: int = 256,
    augment_passes: int = 0,
    dtype: str = "float32",
    config: dict[str, Any] | None = None,
) -> FeatureStore:
    """Create (or reopen, to resume) the store for ``records`` and the backbone's levels.

    With ``augment_passes = K > 0`` the store has K rows per image, pass by pass.
    """
    records = list(records)
    passes = None
    if augment_passes > 0:
        passes = [p for p in range(augment_passes) for _ in records]
        records = records * augment_passes
    return FeatureStore.create(
        url,
        records,
        backbone.levels,
        backbone.level_dims,
        shard_size=shard_size,
        augment_passes=passes,
        dtype=dtype,
        config={"backbone": backbone.spec.name, **(config or {})},
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
    so re-extracting a shard reproduces it exactly.
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
    features = extract(
        backbone,
        paths,
        batch_size=batch_size,
        workers=workers,
        transform=transforms,
        device=device,
    )
    n = len(paths)
    levels = []
    for x in features.levels:
        full = np.full((n, x.shape[1]), np.nan, dtype=np.float32)
        full[features.index] = x
        levels.append(full)
    valid = np.zeros(n, dtype=bool)
    valid[features.index] = True
    failed = {e.path for e in features.errors}
    hashes = [None if p in failed else file_digest(p) for p in paths]
    info = {
        "shard": shard,
        "rows": n,
        "errors": len(features.errors),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    store.write_shard(shard, levels, valid, hashes, features.errors, info)
    return {**info, "skipped": False}


@lru_cache(maxsize=8)
def _open_group(url: str) -> zarr.Group:
    return zarr.open_group(url, mode="r")


def _chunk_moments(
    url: str,
    level: int,
    rows: slice,
    selected: np.ndarray | None,
    projection: tuple[np.ndarray, np.ndarray] | None,
) -> Moments:
    """Statistics of one chunk's valid (and selected) rows, optionally projected."""
    group = _open_group(url)
    valid = np.asarray(group["valid"][rows])
    if selected is not None:
        valid &= selected
    x = np.asarray(group["features"][str(level)][rows])[valid].astype(np.float64)
    if projection is not None:
        mean, components = projection
        x = (x - mean) @ components.T
    dim = x.shape[1]
    return Moments.from_array(x) if len(x) else Moments.empty(dim)


def _merge(*parts: Moments) -> Moments:
    return sum(parts, Moments.empty(parts[0].dim))


def tree_sum(parts: list[Delayed], split_every: int = 8) -> Delayed:
    """Merge delayed partials in a tree (depth log_k of the count)."""
    if not parts:
        raise ValueError("no partial statistics to merge")
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge)(*parts[i : i + split_every])
            for i in range(0, len(parts), split_every)
        ]
    return parts[0]


def level_moments(
    store: FeatureStore,
    level: int,
    selected: np.ndarray | None = None,
    projection: tuple[np.ndarray, np.ndarray] | None = None,
    split_every: int = 8,
) -> Delayed:
    """Delayed statistics of a level over the complete shards, one partial per chunk.

    ``selected`` is an optional (N,) bool mask of the rows to include (e.g. a fold).
    """
    parts = []
    for shard in store.complete_shards():
        rows = store.shard_rows(shard)
        if selected is not None and not selected[rows].any():
            continue
        chunk_mask = None if selected is None else selected[rows]
        parts.append(dask.delayed(_chunk_moments)(store.url, level, rows, chunk_mask, projection))
    return tree_sum(parts, split_every)


def compute(*delayed: Delayed) -> tuple:
    """Compute on the active scheduler; from inside a Dask task, via the worker's client.

    ``worker_client`` secedes the calling task's thread while the graph runs, so a
    task that launches a reduction on its own cluster cannot deadlock it.
    """
    try:
        get_worker()
    except ValueError:
        return dask.compute(*delayed)
    with worker_client() as client:
        return tuple(client.compute(list(delayed), sync=True))


def store_moments(
    store: FeatureStore, selected: np.ndarray | None = None, split_every: int = 8
) -> list[Moments]:
    """Raw per-level statistics of the store's complete shards (optionally a row subset)."""
    return list(
        compute(*[level_moments(store, lv, selected, None, split_every) for lv in store.levels])
    )


def fit_store(
    store: FeatureStore,
    reduction: str | None = None,
    variance_threshold: float = 0.99,
    *,
    selected: np.ndarray | None = None,
    allow_incomplete: bool = False,
    split_every: int = 8,
) -> GaussianAD:
    """Fit a GaussianAD from the store with Dask, never materialising an (N, d) array.

    Equals ``GaussianAD.fit`` on the in-memory features. With a reduction, a second
    pass reduces the projected features (Ledoit-Wolf needs their fourth moment).
    """
    pending = store.pending_shards()
    if pending and not allow_incomplete:
        raise ValueError(
            f"{store.url}: {len(pending)} of {store.n_shards} shards are not extracted yet "
            f"(first: {pending[:5]}); finish the extraction or pass allow_incomplete=True"
        )
    model = GaussianAD(reduction, variance_threshold)
    raw = store_moments(store, selected, split_every=split_every)
    model.fit_components(raw)
    if reduction is None:
        return model.fit_moments(raw)
    projected = compute(
        *[
            level_moments(store, lv, selected, (mean, comp), split_every)
            for lv, mean, comp in zip(
                store.levels, model.pca_means_, model.components_, strict=True
            )
        ]
    )
    return model.fit_moments(list(projected))


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
