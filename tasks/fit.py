"""Tasks: reduce the store's statistics on Dask and fit; evaluate the fitted model."""

from __future__ import annotations

import numpy as np
from prefect import task

from gaussian_ad.evaluation import ModelEvaluation, evaluate_model
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.outofcore import fit_store, store_moments
from gaussian_ad.store import FeatureStore


@task(name="fit-statistics", retries=1, retry_delay_seconds=5)
def fit_statistics(
    url: str,
    fit_rows: np.ndarray,
    reduction: str | None,
    variance_threshold: float,
    model_path: str,
    base_path: str | None = None,
) -> str:
    """Per-level statistics of ``fit_rows`` reduced on Dask, the Gaussian fit, saved.

    With ``base_path`` (a fitted model without reduction), the new statistics are
    merged into that model instead: the incremental retraining path. Models travel
    between tasks as files, not inside the task graph.
    """
    store = FeatureStore.open(url)
    selected = np.zeros(store.n_rows, dtype=bool)
    selected[fit_rows] = True
    if base_path is None:
        model = fit_store(store, reduction, variance_threshold, selected=selected)
    else:
        model = GaussianAD.load(base_path).merge_moments(store_moments(store, selected))
    model.save(model_path)
    return model_path


@task(name="evaluate", retries=1)
def evaluate(
    url: str,
    model_path: str,
    levels: list[int],
    heldout_rows: np.ndarray,
    test_rows: np.ndarray,
    target_fpr: float,
) -> ModelEvaluation:
    """Test AUROCs and thresholds; the saved model is calibrated at ``target_fpr``."""
    model = GaussianAD.load(model_path)
    store = FeatureStore.open(url)
    held = [store.read_rows(level, heldout_rows) for level in store.levels]
    test = [store.read_rows(level, test_rows) for level in store.levels]
    labels = store.manifest["label"].to_numpy()[test_rows]
    evaluation = evaluate_model(model, levels, held, test, labels, target_fpr)
    model.save(model_path)
    return evaluation
