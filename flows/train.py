"""Training flows: manifest -> [configuration chosen on synthetic defects] -> sharded
extraction into Zarr -> Dask statistics -> fit -> evaluation -> MLflow run, registered
version, challenger/champion aliases."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import numpy as np
from prefect import flow

from flows.runtime import artifact_location, dask_runner, gpu_annotation, tracking_uri, work_dir
from gaussian_ad.backbones import BACKBONES, parse_levels
from gaussian_ad.detector import SCORE_KINDS
from gaussian_ad.evaluation import holdout_split
from gaussian_ad.extraction import augmented_rows
from gaussian_ad.images import (
    ImageRecord,
    folder_manifest,
    manifest_fingerprint,
    mvtec_categories,
)
from gaussian_ad.patch import DEFAULT_N_CHANNELS, default_patch_levels
from gaussian_ad.registry import load_detector
from gaussian_ad.selection import DEFAULT_N_PER_KIND
from tasks.extract import BackboneConfig, extract_shard_task, prepare_store
from tasks.fit import evaluate, fit_statistics
from tasks.manifest import build_manifest
from tasks.register import register_model
from tasks.select import select_task


def _store_rows(
    fit: list[ImageRecord], held: list[ImageRecord], test: list[ImageRecord], passes: int
) -> tuple[list[ImageRecord], list[int], dict[str, np.ndarray]]:
    """Store rows: fit images (once, or once per augmentation pass), held-out, test."""
    fit_rows, fit_passes = augmented_rows(fit, passes)
    records = fit_rows + held + test
    passes_all = fit_passes + [-1] * (len(held) + len(test))
    start_held, start_test = len(fit_rows), len(fit_rows) + len(held)
    index = {
        "fit": np.arange(start_held),
        "held": np.arange(start_held, start_test),
        "test": np.arange(start_test, len(records)),
    }
    return records, passes_all, index


@flow(name="train", log_prints=True, task_runner=dask_runner())
def train(
    data_root: str,
    category: str,
    backbone: str = "lite0",
    levels: str = "1-9",
    reduction: str | None = None,
    variance_threshold: float = 0.99,
    augment_passes: int = 0,
    seed: int = 0,
    shard_size: int = 64,
    target_fpr: float = 0.01,
    promotion_tolerance: float = 0.0,
    incremental_from: str | None = None,
    new_images: str | None = None,
    patch: bool = False,
    score: str = "image",
    select: bool = False,
    select_per_kind: int = DEFAULT_N_PER_KIND,
    select_grid: list[dict[str, Any]] | None = None,
    patch_grid: int | None = None,
    patch_channels: int = DEFAULT_N_CHANNELS,
    weights: str | None = None,
    pretrained: bool = True,
    device: str | None = None,
    batch_size: int = 32,
    workers: int = 2,
    home: str | None = None,
    experiment: str = "gaussian-ad",
) -> dict[str, Any]:
    """Train, evaluate and register the model of one MVTec-layout category.

    The fit uses 4/5 of train/good (fold 0 of KFold(5, shuffle, seed)); the other
    fifth calibrates thresholds. With ``incremental_from`` (a model URI, e.g.
    ``models:/gaussian-ad-<category>@champion``) and ``new_images`` (a folder of new
    normal images), the new images' statistics are merged into that model instead, with
    its configuration.

    Beyond the paper: ``patch`` also fits the patch-level model (anomaly maps, pixel
    AUROC and PRO where masks exist); ``score`` ("image", "patch", "fused") is the score
    that ranks and thresholds images; ``select`` first chooses levels, reduction and score
    on synthetic defects made from the held-out fold (see gaussian_ad.selection) and logs
    every candidate's validation AUROC (``select_grid``: candidates as dicts of levels,
    reduction, score; default :data:`gaussian_ad.selection.DEFAULT_GRID`).
    """
    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    if select and incremental_from:
        raise ValueError("select chooses a configuration for a full fit, not an incremental one")
    records, fingerprint = build_manifest(data_root, category)
    train_good = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    fit_idx, held_idx = holdout_split(len(train_good), seed=seed)
    fit_records = [train_good[i] for i in fit_idx]
    held = [train_good[i] for i in held_idx]
    models = work_dir(home) / "models" / category
    base_path = None
    if incremental_from:
        if not new_images:
            raise ValueError("incremental_from needs new_images (a folder of new normal images)")
        champion = load_detector(incremental_from)
        if champion.reduction is not None:
            raise ValueError(
                f"{incremental_from} uses reduction {champion.reduction!r}: incremental "
                "retraining merges raw statistics and needs reduction=None; retrain in full"
            )
        backbone, levels = champion.backbone, ",".join(map(str, champion.levels))
        weights, pretrained = champion.weights, champion.pretrained
        patch, score = champion.patch, champion.score_kind
        patch_grid, patch_channels = champion.patch_grid, champion.patch_channels
        seed = champion.seed
        base_path = str(models / f"base-{uuid.uuid4().hex}.safetensors")
        champion.save(base_path)
        fit_records = [
            ImageRecord(r.path, category, "train", 0, "good") for r in folder_manifest([new_images])
        ]
    config = BackboneConfig(backbone, None, weights, pretrained, device, batch_size, workers)
    selection = None
    if select:
        selection = select_task.submit(
            [r.path for r in fit_records],
            [r.path for r in held],
            config,
            select_per_kind,
            seed,
            select_grid,
        ).result()
        best = selection["best"]
        print(f"[{category}] selected {best} of {len(selection['results'])} candidates")
        score = best["score"]
        if best["levels"] is not None:
            levels, reduction = best["levels"], best["reduction"]
    patch = patch or score != "image"
    image_levels = parse_levels(levels, BACKBONES[backbone].n_levels)
    patch_levels = default_patch_levels(BACKBONES[backbone]) if patch else ()
    config = replace(config, levels=tuple(sorted(set(image_levels) | set(patch_levels))))
    patch_options = {"grid": patch_grid, "n_channels": patch_channels, "seed": seed}
    rows, passes, index = _store_rows(fit_records, held, test, augment_passes)
    level_tag = "-".join(map(str, image_levels))
    patch_tag = f"-patch{patch_grid or 'auto'}x{patch_channels}" if patch else ""
    store_url = str(
        work_dir(home)
        / "stores"
        / category
        / f"{fingerprint[:16]}-{backbone}-L{level_tag}{patch_tag}-aug{augment_passes}-seed{seed}"
        f"{f'-inc{manifest_fingerprint(fit_records)[:12]}' if base_path else ''}.zarr"
    )
    pending = prepare_store(
        store_url,
        rows,
        passes,
        config,
        shard_size,
        {"category": category},
        image_levels,
        patch_options if patch else None,
    )
    print(f"[{category}] {len(rows)} rows, {len(pending)} shard(s) to extract -> {store_url}")
    with gpu_annotation():
        futures = [extract_shard_task.submit(store_url, s, config, seed) for s in pending]
    shards = [f.result() for f in futures]
    model_path = str(models / f"{uuid.uuid4().hex}.safetensors")
    fit_statistics.submit(
        store_url, index["fit"], reduction, variance_threshold, model_path, base_path
    ).result()
    evaluation = evaluate.submit(
        store_url, model_path, config, score, index["held"], index["test"], target_fpr, seed
    ).result()
    uri = tracking_uri(home)
    params = {
        "category": category,
        "augment_passes": augment_passes,
        "seed": seed,
        "n_heldout": len(held),
        "n_test": len(test),
        "data_fingerprint": fingerprint,
        "target_fpr": target_fpr,
        "incremental_from": incremental_from or "",
        "select": select,
    }
    record = register_model.submit(
        uri,
        experiment,
        artifact_location(uri, home),
        store_url,
        config,
        model_path,
        evaluation,
        index["test"],
        params,
        category,
        promotion_tolerance,
        selection,
    ).result()
    metrics = evaluation.summary_metrics(score)
    print(
        f"[{category}] {score} AUROC {metrics['auroc']:.4f}; "
        f"registered {record.name} v{record.version}"
        f" ({'champion' if record.promoted else 'challenger'}): {record.reason}"
    )
    return {
        "category": category,
        **metrics,
        "score": score,
        "auroc_levels": evaluation.auroc_levels,
        "threshold": evaluation.threshold,
        "selection": selection,
        "name": record.name,
        "version": record.version,
        "promoted": record.promoted,
        "reason": record.reason,
        "run_id": record.run_id,
        "store": store_url,
        "shards": shards,
    }


@flow(name="train-all", log_prints=True)
def train_all(
    data_root: str,
    categories: list[str] | None = None,
    dask_address: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every category under ``data_root`` (or the given ones), each on Dask.

    ``options`` are keyword arguments of :func:`train` (backbone, levels, ...).
    """
    names = categories or mvtec_categories(data_root)
    if not names:
        raise ValueError(f"{data_root}: no MVTec-layout categories found")
    runner = dask_runner(dask_address)
    results = [
        train.with_options(task_runner=runner)(data_root, name, **(options or {})) for name in names
    ]
    for r in results:
        print(f"{r['category']:<16} AUROC {r['auroc']:.4f}  {r['name']} v{r['version']}")
    return results
