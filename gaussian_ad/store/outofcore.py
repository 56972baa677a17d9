"""Out-of-core fitting from a feature store: per-chunk statistics reduced with Dask.

Memory never grows with the number of images: each task reduces one chunk into a
:class:`Moments` partial, and partials are folded along a few chains then merged
in a tree, on whichever scheduler is active (local threads or a cluster). This
module needs no torch: workers that only fit never import the backbone.
"""

from __future__ import annotations

import functools
import operator
import os
from functools import lru_cache

import dask
import numpy as np
import zarr
from dask.delayed import Delayed
from distributed import get_worker, worker_client

from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.moments import BatchMoments, Moments
from gaussian_ad.store.feature_store import FeatureStore


@lru_cache(maxsize=8)
def _open_group(url: str) -> zarr.Group:
    return zarr.open_group(url, mode="r")


def _chunk_rows(group: zarr.Group, rows: slice, selected: np.ndarray | None) -> np.ndarray:
    """(rows,) bool: the chunk's rows whose image decoded (and that are selected)."""
    valid = np.asarray(group["valid"][rows])
    return valid if selected is None else valid & selected


def _chunk_moments(
    url: str,
    level: int,
    rows: slice,
    selected: np.ndarray | None,
    projection: tuple[np.ndarray, np.ndarray] | None,
) -> Moments:
    """Statistics of one chunk's valid (and selected) rows, optionally projected."""
    group = _open_group(url)
    valid = _chunk_rows(group, rows, selected)
    x = np.asarray(group["features"][str(level)][rows])
    if not valid.all():
        x = x[valid]
    if projection is not None:
        mean, components = projection
        x = (x - mean) @ components.T
    # float32 rows go to from_array as they are: it makes the one float64 copy.
    return Moments.from_array(x) if len(x) else Moments.empty(x.shape[1])


def _chunk_patch_moments(url: str, rows: slice, selected: np.ndarray | None) -> BatchMoments | None:
    """Per-position statistics of one chunk's valid (and selected) patch rows."""
    group = _open_group(url)
    valid = _chunk_rows(group, rows, selected)
    if not valid.any():
        return None
    return BatchMoments.from_array(np.asarray(group["patches"][rows])[valid])


def _merge(*parts: Moments | BatchMoments | None) -> Moments | BatchMoments | None:
    """The sum of the partials that exist (None: a chunk or group without rows)."""
    present = [part for part in parts if part is not None]
    return functools.reduce(operator.add, present) if present else None


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


def chain_sum(parts: list[Delayed], chains: int, split_every: int = 8) -> Delayed:
    """Fold delayed partials along ``chains`` sequential chains, then tree-merge the chains.

    About ``chains`` accumulators are alive at once whatever the number of partials,
    where a plain tree keeps up to ``split_every`` partials per level waiting to merge.
    """
    if not parts:
        raise ValueError("no partial statistics to merge")
    heads = parts[:chains]
    for i, part in enumerate(parts[chains:]):
        heads[i % chains] = dask.delayed(operator.add)(heads[i % chains], part)
    return tree_sum(heads, split_every)


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
    parts = [
        dask.delayed(_chunk_moments)(store.url, level, rows, mask, projection)
        for rows, mask in _store_parts(store, selected)
    ]
    chains = dask.config.get("num_workers", None) or os.cpu_count() or 1
    return chain_sum(parts, chains, split_every)


def _store_parts(
    store: FeatureStore, selected: np.ndarray | None
) -> list[tuple[slice, np.ndarray | None]]:
    """(rows, chunk mask) of each complete shard that has selected rows."""
    parts = []
    for shard in store.complete_shards():
        rows = store.shard_rows(shard)
        if selected is None or selected[rows].any():
            parts.append((rows, None if selected is None else selected[rows]))
    return parts


def _group_patch_moments(
    url: str, parts: list[tuple[slice, np.ndarray | None]]
) -> BatchMoments | None:
    """Fold the patch statistics of several chunks, one chunk at a time."""
    total = None
    for rows, mask in parts:
        total = _merge(total, _chunk_patch_moments(url, rows, mask))
    return total


def patch_moments(
    store: FeatureStore, selected: np.ndarray | None = None, split_every: int = 8
) -> BatchMoments:
    """Per-position statistics of the store's patch features (optionally a row subset).

    A partial here is large (P * d * d float64: 63 MB at 28 x 28 x 100), so instead of one
    task per chunk, each of ``num_workers`` tasks folds its share of the chunks one at a
    time and the few results are tree-merged: memory is a few partials per worker thread,
    whatever the number of images (a scheduler free to run chunk tasks ahead would hold
    more of them).
    """
    if store.patch_layout is None:
        raise ValueError(f"{store.url}: the store has no patch features (no patch layout)")
    parts = _store_parts(store, selected)
    groups = min(dask.config.get("num_workers", None) or os.cpu_count() or 1, len(parts))
    tasks = [dask.delayed(_group_patch_moments)(store.url, parts[i::groups]) for i in range(groups)]
    total = compute(tree_sum(tasks, split_every))[0] if tasks else None
    if total is None:
        raise ValueError(f"{store.url}: no valid patch rows to fit on")
    return total


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
    model = GaussianAD(reduction=reduction, variance_threshold=variance_threshold)
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
