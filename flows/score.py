"""Scoring flow: source -> listing -> shard plan -> score (model loaded once per worker) ->
per-shard Parquet parts written atomically -> summary, published as the Prefect table
artifact ``score-<source name>``. The output folder records the run (source listing, shard
plan, pinned model version, threshold): a rerun continues exactly that plan or is refused;
a second run on the same folder at the same time is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from gaussian_ad_flows.runtime import artifact_key, dask_runner, gpu_annotation, tracking_uri
from gaussian_ad_tasks.score import list_source_task, score_shard_task
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from gaussian_ad.config import DEFAULT_LOADER, LoaderOptions
from gaussian_ad.registry.mlflow_model import pin_model, requested_model
from gaussian_ad.scoring.outputs import part_path
from gaussian_ad.scoring.run import claim, open_run, summarize


def _source_name(source: str) -> str:
    """The last component of a source (folder, archive, URL), or the whole of it."""
    source = str(source).rstrip("/")
    return Path(source).name or source


def _run_name() -> str:
    return f"score-{_source_name(flow_run.parameters.get('source', ''))}"


@flow(name="score", flow_run_name=_run_name, log_prints=True, task_runner=dask_runner())
def score(
    source: str,
    model: str | None = None,
    category: str | None = None,
    out: str = "scores",
    shard_size: int | None = None,
    loader: LoaderOptions = DEFAULT_LOADER,
    home: str | None = None,
    maps: bool = False,
) -> dict[str, Any]:
    """Score every image of ``source`` (folder, glob, tar/zip archive or fsspec URL).

    ``model`` is a model URI or file, by default ``models:/gaussian-ad-<category>@champion``;
    it is resolved once and the run is pinned to that version. ``shard_size`` defaults to
    the run's recorded one (256 for a new run). Output under ``out``: ``run.json``,
    ``manifest.parquet``, ``scores/part-*.parquet`` (path, score, score_l<level>,
    is_anomaly, model_name, model_version, shard; image_score, patch_score with a patch
    model) and ``errors/*.parquet`` (path, reason, shard). With ``maps`` (the model needs a
    patch-level model), the overlay of every image above the threshold goes under
    ``maps/`` and is named in the table's ``map`` column.
    """
    wanted = requested_model(model, category)
    tracking = tracking_uri(home)
    mlflow.set_tracking_uri(tracking)
    out_dir = Path(out).resolve()
    with claim(out_dir):
        run, items, listing_errors = open_run(
            out_dir, source, wanted, shard_size, maps, pin_model, list_source_task
        )
        shards = run.shards(items)
        pinned = (run.model.uri, run.model.name, run.model.version)
        print(f"scoring {len(items)} images in {len(shards)} shard(s) with {run.model.uri}")
        with gpu_annotation():
            futures = [
                score_shard_task.submit(part, i, str(out_dir), pinned, tracking, loader, maps)
                for i, part in enumerate(shards)
                if not part_path(out_dir, "scores", i).exists()
            ]
        summary, errors = summarize(out_dir, run, listing_errors, [f.result() for f in futures])
    print(
        f"{summary['scored']} scored, {summary['anomalies']} anomalous, "
        f"{summary['errors']} errors ({summary['shards_run']} of {len(shards)} shards run now)"
    )
    if len(errors):
        print(errors[["path", "reason"]].head(20).to_string(index=False))
    create_table_artifact(
        [
            {
                "scored": summary["scored"],
                "anomalous": summary["anomalies"],
                "errors": summary["errors"],
                "model": summary["model"],
                "output folder": summary["out"],
            }
        ],
        key=artifact_key("score", _source_name(source)),
        description=f"Scoring of {source}: images scored, flagged and unreadable",
    )
    return summary
