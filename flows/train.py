"""Training flows: manifest -> MLflow run opened -> [configuration chosen on synthetic
defects] -> sharded extraction into Zarr -> Dask statistics -> fit -> evaluation -> logged
into the run, registered version, champion/challenger aliases -> run closed -> the headline
figures as a Prefect markdown artifact."""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any

from gaussian_ad_flows.options import TrainOptions
from gaussian_ad_flows.runtime import (
    artifact_key,
    artifact_location,
    dask_runner,
    gpu_annotation,
    tracking_uri,
    work_dir,
)
from gaussian_ad_tasks.extract import extract_shard_task, prepare_store
from gaussian_ad_tasks.fit import evaluate, fit_statistics
from gaussian_ad_tasks.manifest import build_manifest
from gaussian_ad_tasks.register import register_model
from gaussian_ad_tasks.select import select_task
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from gaussian_ad.data.augment import AugmentConfig
from gaussian_ad.data.images import mvtec_categories
from gaussian_ad.evaluation.selection import Selection
from gaussian_ad.registry.mlflow_model import (
    incremental_base,
    local_path,
    report_page,
    run_name,
    training_run,
    training_summary,
)
from gaussian_ad.store.plan import TrainingPlan

logger = logging.getLogger(__name__)
DEFAULTS = TrainOptions()


@flow(name="train", flow_run_name="train-{category}", log_prints=True, task_runner=dask_runner())
def train(data_root: str, category: str, options: TrainOptions = DEFAULTS) -> dict[str, Any]:
    """Train, evaluate and register the model of one MVTec-layout category (see TrainOptions).

    One MLflow run spans the training, from the selection or extraction to the registration;
    the flow run publishes the headline figures as the markdown artifact ``train-<category>``.
    """
    records, fingerprint = build_manifest(data_root, category)
    config, loader = options.detector, options.loader
    plan = TrainingPlan.from_manifest(records, options.augment_passes, options.augment)
    models = work_dir(options.home) / "models" / category
    base_path = None
    if options.incremental_from:
        base_path = str(models / f"base-{uuid.uuid4().hex}.safetensors")
        config = incremental_base(options.incremental_from, config, loader, base_path)
        plan = plan.with_new_normals(options.new_images, category)
    uri = tracking_uri(options.home)
    tags = {"category": category, "data_root": data_root, "prefect_flow_run_id": flow_run.get_id()}
    with training_run(
        uri,
        options.experiment,
        artifact_location(uri, options.home),
        run_name(category, config.score, datetime.now()),
        tags,
    ) as run_id:
        selection = None
        if options.select:
            selection = select_task.submit(
                [r.path for r in plan.fit],
                config,
                loader,
                options.select_per_kind,
                options.select_grid,
            ).result()
            config = Selection.from_dict(selection).best.config(config)
            print(f"[{category}] selected {selection['best']} of {len(selection['results'])}")
        url = plan.store_url(work_dir(options.home), category, fingerprint, config)
        pending = prepare_store(url, plan, config, loader, options.shard_size)
        n_rows = len(plan.rows()[0])
        print(f"[{category}] {n_rows} rows, {len(pending)} shard(s) to extract -> {url}")
        with gpu_annotation():
            futures = [
                extract_shard_task.submit(url, shard, config, loader, plan.augment)
                for shard in pending
            ]
        shards = [future.result() for future in futures]
        rows = plan.row_index()
        model_path = str(models / f"{uuid.uuid4().hex}.safetensors")
        heldout = fit_statistics.submit(
            url, rows["fit"], config, model_path, base_path, options.target_fpr
        ).result()
        evaluation = evaluate.submit(url, model_path, loader, heldout, rows["test"]).result()
        params = {
            "category": category,
            "data_root": data_root,
            "augment_passes": options.augment_passes,
            "augment": asdict(plan.augment or AugmentConfig.for_category(category)),
            "n_calibration": len(heldout),
            "n_test": len(plan.test),
            "data_fingerprint": fingerprint,
            "target_fpr": options.target_fpr,
            "incremental_from": options.incremental_from or "",
            "select": options.select,
        }
        run = {
            "params": params,
            "category": category,
            "tolerance": options.promotion_tolerance,
            "selection": selection,
        }
        record = register_model.submit((uri, run_id), url, model_path, loader, evaluation, run)
        record = record.result()
    create_markdown_artifact(
        training_summary(record, uri),
        key=artifact_key("train", category),
        description=f"{category}: headline figures and promotion decision of this training",
    )
    print(
        f"[{category}] {config.score} AUROC {record.auroc:.4f}; "
        f"registered {record.name} v{record.version}"
        f" ({'champion' if record.promoted else 'challenger'}): {record.reason}"
    )
    page = report_page(uri, record)
    print(
        f"[{category}] report: {local_path(record.report)}"
        + (f"  (MLflow: {page})" if page else "")
    )
    return {
        "category": category,
        **record.metrics,
        "score": config.score,
        "auroc_levels": evaluation.auroc_levels,
        "selection": selection,
        "name": record.name,
        "version": record.version,
        "promoted": record.promoted,
        "reason": record.reason,
        "report": local_path(record.report),
        "run_id": record.run_id,
        "experiment_id": record.experiment_id,
        "flow_run_id": flow_run.get_id(),
        "store": url,
        "shards": shards,
    }


def _train_all_name() -> str:
    return f"train-all-{datetime.now():%Y-%m-%d-%H%M}"


@flow(name="train-all", flow_run_name=_train_all_name, log_prints=True)
def train_all(
    data_root: str,
    categories: list[str] | None = None,
    dask_address: str | None = None,
    options: TrainOptions = DEFAULTS,
) -> list[dict[str, Any]]:
    """Train every category under ``data_root`` (or the given ones), each on Dask; the flow
    run (``train-all-<date>``) publishes one row per category as the markdown artifact
    ``train-all`` (:func:`train_all_summary`)."""
    names = categories or mvtec_categories(data_root)
    if not names:
        raise ValueError(f"{data_root}: no MVTec-layout categories found")
    runner = dask_runner(dask_address)
    results = [train.with_options(task_runner=runner)(data_root, name, options) for name in names]
    for r in results:
        print(f"{r['category']:<16} AUROC {r['auroc']:.4f}  {r['name']} v{r['version']}")
    create_markdown_artifact(
        train_all_summary(results),
        key="train-all",
        description=f"{len(results)} categories: version, AUROC, promoted or not and why",
    )
    return results


def train_all_summary(results: list[dict[str, Any]]) -> str:
    """One markdown row per trained category: model and version, AUROC, promoted or not,
    why, and where its report is."""
    rows = [
        f"| {r['category']} | {r['name']} v{r['version']} | {r['auroc']:.4f} ({r['score']}) | "
        f"{'yes: champion' if r['promoted'] else 'no: challenger'} | "
        f"{r['reason'].replace('|', '/')} | `{r['report']}` |"
        for r in results
    ]
    header = (
        "| category | model version | AUROC (score) | promoted | why | report |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    return "## Trained categories\n\n" + "\n".join([header, *rows]) + "\n"
