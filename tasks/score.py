"""Tasks: list a scoring source, and score one shard of it into a Parquet part."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import mlflow
from gaussian_ad_tasks.retries import worth_retrying
from prefect import task

from gaussian_ad.config import LoaderOptions
from gaussian_ad.data.images import ImageError
from gaussian_ad.data.sources import SourceItem, list_source
from gaussian_ad.detection.detector import Detector
from gaussian_ad.registry.mlflow_model import load_detector
from gaussian_ad.scoring.outputs import score_shard


@lru_cache(maxsize=2)
def worker_detector(model_uri: str, tracking: str, loader: LoaderOptions) -> Detector:
    """The model, loaded once per worker process and reused by every shard."""
    mlflow.set_tracking_uri(tracking)
    return load_detector(model_uri, loader)


@task(name="list-source", retries=2, retry_condition_fn=worth_retrying, retry_delay_seconds=2)
def list_source_task(source: str) -> tuple[list[SourceItem], list[ImageError]]:
    """Every image of the source, sorted, and the members rejected while listing."""
    return list_source(source)


@task(name="score-shard", retries=2, retry_condition_fn=worth_retrying, retry_delay_seconds=5)
def score_shard_task(
    items: list[SourceItem],
    shard: int,
    out: str,
    model: tuple[str, str, str],
    tracking: str,
    loader: LoaderOptions,
    maps: bool | str = False,
) -> dict[str, Any]:
    """Score a shard with the model (URI, name, version); see scoring.outputs.score_shard."""
    uri, name, version = model
    detector = worker_detector(uri, tracking, loader)
    return score_shard(detector, items, shard, out, (name, version), maps)
