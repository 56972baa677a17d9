"""Scoring flow: source -> manifest -> shards -> score (model loaded once per worker) ->
per-shard Parquet parts written atomically -> summary. A rerun skips finished shards."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from gaussian_ad_flows.runtime import dask_runner, gpu_annotation, tracking_uri
from gaussian_ad_tasks.score import list_source_task, score_shard_task
from prefect import flow

from gaussian_ad.config import LoaderOptions
from gaussian_ad.data.sources import SourceItem
from gaussian_ad.registry.mlflow_model import registered_name, resolve_version
from gaussian_ad.scoring.outputs import part_path
from gaussian_ad.scoring.tables import error_table, write_table

MANIFEST = "manifest.parquet"
DEFAULT_LOADER = LoaderOptions()


def _manifest(source: str, out: Path) -> tuple[list[SourceItem], pd.DataFrame]:
    """The job's item list: listed once, then reused so that a rerun cuts the same shards."""
    path = out / MANIFEST
    if path.exists():
        table = pd.read_parquet(path)
        if len(table) and table["source"].iloc[0] != source:
            raise ValueError(f"{out} holds a scoring job of another source; choose another out")
        items = [
            SourceItem(n, loc, m if isinstance(m, str) else None)
            for n, loc, m in zip(table["name"], table["location"], table["member"], strict=True)
        ]
        return items, pd.read_parquet(out / "errors" / "listing.parquet")
    items, rejected = list_source_task(source)
    listing_errors = error_table(rejected)
    listing_errors["shard"] = -1
    write_table(listing_errors, out / "errors" / "listing.parquet")
    table = pd.DataFrame([asdict(i) for i in items], columns=["name", "location", "member"])
    table["source"] = source
    write_table(table, path)
    return items, listing_errors


@flow(
    name="score",
    log_prints=True,
    task_runner=dask_runner(),
)
def score(
    source: str,
    model: str | None = None,
    category: str | None = None,
    out: str = "scores",
    shard_size: int = 256,
    loader: LoaderOptions = DEFAULT_LOADER,
    home: str | None = None,
    maps: bool = False,
) -> dict[str, Any]:
    """Score every image of ``source`` (folder, glob, tar/zip archive or fsspec URL).

    ``model`` is a model URI, by default ``models:/gaussian-ad-<category>@champion``;
    an alias is resolved once, so every shard uses the same version. Output under
    ``out``: ``scores/part-*.parquet`` (path, score, score_l<level>, is_anomaly,
    model_name, model_version, shard; image_score, patch_score with a patch model) and
    ``errors/*.parquet`` (path, reason, shard). With ``maps`` (off by default; the model
    needs a patch-level model), the anomaly-map overlay of every image above the threshold
    is written under ``maps/`` and named in the table's ``map`` column.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size: must be >= 1, got {shard_size}")
    if model is None:
        if category is None:
            raise ValueError("give model= (a model URI) or category=")
        model = f"models:/{registered_name(category)}@champion"
    tracking = tracking_uri(home)
    mlflow.set_tracking_uri(tracking)
    version = resolve_version(model)
    if maps and version is not None and version.tags.get("patch") != "True":
        raise ValueError(
            f"{model} (version {version.version}) has no patch-level model to draw maps with; "
            "train with patch=True or score without maps"
        )
    model_uri = f"models:/{version.name}/{version.version}" if version else model
    name, number = (version.name, version.version) if version else (model, "")
    out_dir = Path(out).resolve()
    items, listing_errors = _manifest(source, out_dir)
    shards = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    print(f"scoring {len(items)} images in {len(shards)} shard(s) with {model_uri}")
    with gpu_annotation():
        futures = [
            score_shard_task.submit(
                shard_items, i, str(out_dir), (model_uri, name, number), tracking, loader, maps
            )
            for i, shard_items in enumerate(shards)
            if not part_path(str(out_dir), "scores", i).exists()
        ]
    infos = [f.result() for f in futures]
    scores = _read_parts(out_dir / "scores")
    errors = pd.concat([listing_errors, _read_parts(out_dir / "errors")])
    summary = {
        "images": len(items) + len(listing_errors),
        "scored": len(scores),
        "anomalies": int(scores["is_anomaly"].sum()) if len(scores) else 0,
        "errors": len(errors),
        "shards": len(shards),
        "shards_run": sum(not i["skipped"] for i in infos),
        "maps_written": sum(i.get("maps", 0) for i in infos),
        "model": model_uri,
        "out": str(out_dir),
    }
    print(
        f"{summary['scored']} scored, {summary['anomalies']} anomalous, "
        f"{summary['errors']} errors ({summary['shards_run']} of {len(shards)} shards run now)"
    )
    if len(errors):
        print(errors[["path", "reason"]].head(20).to_string(index=False))
    return summary


def _read_parts(folder: Path) -> pd.DataFrame:
    """All Parquet parts of a folder, in shard order."""
    parts = sorted(folder.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts]) if parts else pd.DataFrame()
