"""Tasks: plan the feature store, and extract one shard into it (the unit of fan-out)."""

from __future__ import annotations

from distributed import get_worker
from gaussian_ad_tasks.retries import worth_retrying
from prefect import task

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.augment import AugmentConfig
from gaussian_ad.detection.detector import Detector
from gaussian_ad.features.shards import create_plan_store, extract_shard
from gaussian_ad.store.feature_store import FeatureStore
from gaussian_ad.store.plan import TrainingPlan


@task(name="prepare-store", retries=2, retry_condition_fn=worth_retrying, retry_delay_seconds=2)
def prepare_store(
    url: str, plan: TrainingPlan, config: DetectorConfig, loader: LoaderOptions, shard_size: int
) -> list[int]:
    """Create or reopen the plan's store; returns the shards still to extract."""
    backbone = Detector(config, loader).backbone_module()
    store = create_plan_store(url, plan, backbone, config, loader, shard_size)
    return store.pending_shards()


@task(name="extract-shard", retries=2, retry_condition_fn=worth_retrying, retry_delay_seconds=5)
def extract_shard_task(
    url: str,
    shard: int,
    config: DetectorConfig,
    loader: LoaderOptions,
    augment: AugmentConfig | None = None,
) -> dict:
    """Extract one shard, its augmented rows with ``augment`` (None: the category's
    defaults); returns its info (rows, errors, host, pid, worker, seconds, ...)."""
    backbone = Detector(config, loader).backbone_module()
    info = extract_shard(FeatureStore.open(url), shard, backbone, loader, config.seed, augment)
    return {**info, "worker": _worker_address()}


def _worker_address() -> str | None:
    """The Dask worker running this task, if it runs on one."""
    try:
        return get_worker().address
    except ValueError:
        return None
