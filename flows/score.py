"""Scoring flow: source -> listing -> shard plan -> score (model loaded once per worker) ->
per-shard Parquet parts written atomically -> summary, published as the Prefect table
artifact ``score-<source name>``. The output folder records the run (source listing, shard
plan, pinned model version, threshold): a rerun continues exactly that plan or is refused;
a second run on the same folder at the same time is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import mlflow
import pandas as pd
from gaussian_ad_flows.runtime import artifact_key, dask_runner, gpu_annotation, tracking_uri
from gaussian_ad_tasks.score import list_source_task, score_shard_task
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from gaussian_ad.config import DEFAULT_LOADER, LoaderOptions
from gaussian_ad.registry.mlflow_model import pin_model, requested_model
from gaussian_ad.scoring.outputs import part_path
from gaussian_ad.scoring.run import claim, open_run, summarize

N_ERRORS_SHOWN = 20


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
    maps: bool | Literal["all"] = False,
) -> dict[str, Any]:
    """Score every image of ``source`` (folder, glob, tar/zip archive or fsspec URL).

    ``model`` is a model URI or file, by default ``models:/gaussian-ad-<category>@champion``;
    it is resolved once and the run is pinned to that version. ``shard_size`` defaults to
    the run's recorded one (256 for a new run). Output under ``out``: ``run.json``,
    ``manifest.parquet``, ``scores/part-*.parquet`` (path, score, score_l<level>,
    is_anomaly, model_name, model_version, shard; image_score, patch_score with a patch
    model) and ``errors/*.parquet`` (path, reason, shard). With ``maps`` (the model needs a
    patch-level model), the overlay of every image above the threshold (``maps="all"``:
    of every image, the good ones too) goes under ``maps/`` and is named in the table's
    ``map`` column. The run publishes its summary as the table artifact
    ``score-<source name>`` and the unreadable files (the first 20, with their reasons)
    and where the maps are as the markdown artifact ``score-<source name>-errors``.
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
    create_markdown_artifact(
        scoring_notes(summary, errors, maps),
        key=artifact_key("score", _source_name(source), "errors"),
        description=f"Scoring of {source}: the unreadable files and where the maps are",
    )
    return summary


def scoring_notes(summary: dict[str, Any], errors: pd.DataFrame, maps: bool | str) -> str:
    """Markdown: where the scores and the overlays are, and the first ``N_ERRORS_SHOWN``
    unreadable files with their reasons."""
    out = Path(summary["out"])
    which = "every image" if maps == "all" else "the flagged images"
    where = (
        f"Overlays of {which}: `{out / 'maps'}` ({summary['maps_written']} written now; the "
        "`map` column of the scores names each)"
        if maps
        else "No overlays: score with maps to get them"
    )
    text = f"Scores: `{out / 'scores'}`\n\n{where}\n\n"
    if not len(errors):
        return text + "No unreadable files.\n"
    shown = errors.head(N_ERRORS_SHOWN)
    rows = "\n".join(
        f"| `{_cell(path)}` | {_cell(reason)} |"
        for path, reason in zip(shown["path"], shown["reason"], strict=True)
    )
    more = f" (the first {N_ERRORS_SHOWN})" if len(errors) > N_ERRORS_SHOWN else ""
    return (
        text + f"## {len(errors)} unreadable file(s){more}\n\n| file | reason |\n"
        f"| --- | --- |\n{rows}\n\nAll of them: `{out / 'errors'}`\n"
    )


def _cell(text: str) -> str:
    """Text for one markdown table cell: no pipes or line breaks."""
    return str(text).replace("|", "/").replace("\n", " ")
