"""Tasks: reduce the store's statistics on Dask and fit; evaluate and calibrate the detector."""

from __future__ import annotations

import numpy as np
from prefect import task

from gaussian_ad.backbones import BACKBONES
from gaussian_ad.detector import Detector, patch_path
from gaussian_ad.evaluation import ModelEvaluation, evaluate_model, evaluate_patch_model
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.outofcore import fit_store, patch_moments, store_moments
from gaussian_ad.patch import DEFAULT_N_CHANNELS, PatchGaussian, PatchLayout
from gaussian_ad.store import FeatureStore
from tasks.extract import BackboneConfig


@task(name="fit-statistics", retries=1, retry_delay_seconds=5)
def fit_statistics(
    url: str,
    fit_rows: np.ndarray,
    reduction: str | None,
    variance_threshold: float,
    model_path: str,
    base_path: str | None = None,
) -> str:
    """Per-level (and per-position) statistics of ``fit_rows`` reduced on Dask, fitted, saved.

    With ``base_path`` (a detector saved without reduction), the new statistics are
    merged into its models instead: the incremental retraining path. A store with patch
    features also gets a patch-level model, saved next to ``model_path``. Models travel
    between tasks as files, not inside the task graph.
    """
    store = FeatureStore.open(url)
    selected = np.zeros(store.n_rows, dtype=bool)
    selected[fit_rows] = True
    if base_path is None:
        model = fit_store(store, reduction, variance_threshold, selected=selected)
    else:
        model = GaussianAD.load(base_path).merge_moments(store_moments(store, selected))
    if store.patch_layout is not None:
        layout = PatchLayout.from_dict(store.patch_layout)
        base_patch = None if base_path is None else patch_path(base_path)
        patch_model = PatchGaussian()
        if base_patch is not None and base_patch.is_file():
            patch_model = PatchGaussian.load(base_patch)
            if patch_model.layout_ != layout:
                raise ValueError(f"{base_patch}: fitted with another patch layout than {url}")
        patch_model.layout_ = layout
        patch_model.merge_moments(patch_moments(store, selected)).save(patch_path(model_path))
    model.save(model_path)
    return model_path


@task(name="evaluate", retries=1)
def evaluate(
    url: str,
    model_path: str,
    backbone: BackboneConfig,
    score: str,
    heldout_rows: np.ndarray,
    test_rows: np.ndarray,
    target_fpr: float,
    seed: int = 0,
) -> ModelEvaluation:
    """Test AUROCs (image, patch, fused, pixel), thresholds; saves the calibrated Detector.

    Rows whose image did not decode are left out. The detector ranks images by ``score``
    and is calibrated at ``target_fpr`` on the held-out normals; it replaces the model
    file at ``model_path``.
    """
    store = FeatureStore.open(url)
    valid = store.valid()
    heldout_rows, test_rows = heldout_rows[valid[heldout_rows]], test_rows[valid[test_rows]]
    model = GaussianAD.load(model_path)
    held = [store.read_rows(level, heldout_rows) for level in store.levels]
    test = [store.read_rows(level, test_rows) for level in store.levels]
    manifest = store.manifest.iloc[test_rows]
    labels = manifest["label"].to_numpy()
    evaluation = evaluate_model(model, store.levels, held, test, labels, target_fpr)
    patch = store.patch_layout is not None
    detector = Detector(
        backbone.name,
        store.levels,
        model.reduction,
        model.variance_threshold,
        backbone.weights,
        backbone.pretrained,
        backbone.batch_size,
        backbone.workers,
        backbone.device,
        patch=patch,
        score=score,
        patch_grid=store.patch_layout["grid"] if patch else None,
        patch_channels=len(store.patch_layout["channels"]) if patch else DEFAULT_N_CHANNELS,
        seed=seed,
    )
    detector.model_ = model
    heldout_patch = None
    if patch:
        detector.patch_model_ = PatchGaussian.load(patch_path(model_path))
        evaluation.patch = evaluate_patch_model(
            detector.patch_model_,
            store.read_patches,
            heldout_rows,
            test_rows,
            evaluation.heldout_scores,
            evaluation.scores,
            labels,
            [m if isinstance(m, str) else None for m in manifest["mask"]],
            BACKBONES[backbone.name].image_size,
            rank_by=score,
        )
        heldout_patch = evaluation.patch.heldout_patch
    detector.calibrate_scores(evaluation.heldout_scores, heldout_patch, target_fpr)
    evaluation.threshold = detector.threshold_
    detector.save(model_path)
    return evaluation
