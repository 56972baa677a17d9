"""Tasks: plan the feature store, and extract one shard into it (the unit of fan-out)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from distributed import get_worker
from prefect import task

from gaussian_ad.backbones import Backbone, load_backbone
from gaussian_ad.extraction import extract_shard
from gaussian_ad.images import ImageRecord
from gaussian_ad.patch import PatchLayout
from gaussian_ad.store import FeatureStore


@dataclass(frozen=True)
class BackboneConfig:
    """What a worker needs to build the same backbone (hashable, cheap to ship)."""

    name: str = "lite0"
    levels: tuple[int, ...] | None = None
    weights: str | None = None
    pretrained: bool = True
    device: str | None = None
    batch_size: int = 32
    workers: int = 2


@lru_cache(maxsize=2)
def worker_backbone(config: BackboneConfig) -> Backbone:
    """The backbone, loaded once per worker process and reused by every shard."""
    return load_backbone(
        config.name,
        config.levels,
        weights=config.weights,
        pretrained=config.pretrained,
        device=config.device,
    )


@task(name="prepare-store", retries=2, retry_delay_seconds=2)
def prepare_store(
    url: str,
    records: list[ImageRecord],
    augment_passes: list[int],
    backbone: BackboneConfig,
    shard_size: int,
    config: dict[str, Any],
    levels: tuple[int, ...] | None = None,
    patch: dict[str, Any] | None = None,
) -> list[int]:
    """Create or reopen the store; returns the shards still to extract.

    The store keeps ``levels`` (default: all the backbone computes) and, with ``patch``
    (keyword arguments of :meth:`PatchLayout.for_backbone`: grid, n_channels, seed),
    patch features too.
    """
    model = worker_backbone(backbone)
    levels = model.levels if levels is None else tuple(levels)
    layout = None if patch is None else PatchLayout.for_backbone(model, **patch).to_dict()
    store = FeatureStore.create(
        url,
        records,
        levels,
        [model.level_dims[model.levels.index(level)] for level in levels],
        shard_size=shard_size,
        augment_passes=augment_passes,
        config={"backbone": backbone.name, **config},
        patch_layout=layout,
    )
    return store.pending_shards()


@task(name="extract-shard", retries=2, retry_delay_seconds=5)
def extract_shard_task(url: str, shard: int, backbone: BackboneConfig, seed: int) -> dict:
    """Extract one shard; returns its info (rows, errors, host, pid, worker, seconds, ...)."""
    info = extract_shard(
        FeatureStore.open(url),
        shard,
        worker_backbone(backbone),
        batch_size=backbone.batch_size,
        workers=backbone.workers,
        device=backbone.device,
        seed=seed,
    )
    return {**info, "worker": _worker_address()}


def _worker_address() -> str | None:
    """The Dask worker running this task, if it runs on one."""
    try:
        return get_worker().address
    except ValueError:
        return None
