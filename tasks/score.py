"""Tasks: list a scoring source, and score one shard of it into a Parquet part."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from prefect import task

from gaussian_ad.detector import Detector
from gaussian_ad.images import ImageError
from gaussian_ad.overlays import write_overlays
from gaussian_ad.registry import load_detector
from gaussian_ad.sources import SourceItem, list_source, read_items
from gaussian_ad.tables import error_table, score_table, write_table


@lru_cache(maxsize=2)
def worker_detector(
    model_uri: str, tracking: str, device: str | None, batch_size: int, workers: int
) -> Detector:
    """The model, loaded once per worker process and reused by every shard."""
    mlflow.set_tracking_uri(tracking)
    return load_detector(model_uri, device=device, batch_size=batch_size, workers=workers)


def part_path(out: str, kind: str, shard: int) -> Path:
    """Where a shard's scores or errors go: ``<out>/<kind>/part-<shard>.parquet``."""
    return Path(out) / kind / f"part-{shard:05d}.parquet"


@task(name="list-source", retries=2, retry_delay_seconds=2)
def list_source_task(source: str) -> tuple[list[SourceItem], list[ImageError]]:
    """Every image of the source, sorted, and the members rejected while listing."""
    return list_source(source)


@task(name="score-shard", retries=2, retry_delay_seconds=5)
def score_shard(
    items: list[SourceItem],
    shard: int,
    out: str,
    model_uri: str,
    model_name: str,
    model_version: str,
    tracking: str,
    runtime: dict[str, Any],
    maps: bool = False,
) -> dict[str, Any]:
    """Score a shard; its scores part is written last, atomically: the commit point.

    With ``maps``, the anomaly-map overlay of every image above the threshold is written
    first, to ``maps/part-<shard>/`` (the table's ``map`` column names it, relative to ``out``);
    this needs a detector with a patch-level model.
    """
    scores_part = part_path(out, "scores", shard)
    if scores_part.exists():
        return {"shard": shard, "skipped": True}
    started = time.perf_counter()
    detector = worker_detector(
        model_uri,
        tracking,
        runtime.get("device"),
        runtime.get("batch_size", 32),
        runtime.get("workers", 2),
    )
    names, contents, errors = [], [], []
    for item, content in read_items(items):
        if isinstance(content, ImageError):
            errors.append(content)
        else:
            names.append(item.name)
            contents.append(content)
    result = detector.score(contents, names=names, maps=maps)
    errors += result.errors
    written = {}
    if maps:
        written = write_overlays(
            result, contents, names, out, f"maps/part-{shard:05d}", detector.standardizer_
        )
    table = score_table([names[i] for i in result.index], result, detector.levels)
    table["model_name"] = model_name
    table["model_version"] = model_version
    table["shard"] = np.int32(shard)
    if maps:
        table["map"] = [written.get(int(i), "") for i in result.index]
    errors_table = error_table(errors)
    errors_table["shard"] = np.int32(shard)
    write_table(errors_table, part_path(out, "errors", shard))
    write_table(table, scores_part)
    return {
        "shard": shard,
        "skipped": False,
        "rows": len(table),
        "anomalies": int(table["is_anomaly"].sum()),
        "errors": len(errors),
        "maps": len(written),
        "seconds": round(time.perf_counter() - started, 3),
    }
