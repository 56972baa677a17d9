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
    base: GaussianAD | None = None,
) -> GaussianAD:
    """Per-level statistics of ``fit_rows`` reduced on Dask, then the Gaussian fit.

    With ``base`` (a fitted model without reduction), the new statistics are merged
    into it instead: the incremental retraining path.
    """
    store = FeatureStore.open(url)
    selected = np.zeros(store.n_rows, dtype=bool)
    selected[fit_rows] = True
    if base is None:
        return fit_store(store, reduction, variance_threshold, selected=selected)
    return base.merge_moments(store_moments(store, selected))


@task(name="evaluate", retries=1)
def evaluate(
    url: str,
    model: GaussianAD,
    levels: list[int],
    heldout_rows: np.ndarray,
    test_rows: np.ndarray,
    target_fpr: float,
) -> tuple[GaussianAD, ModelEvaluation]:
    """Test AUROCs and thresholds; returns the model calibrated at ``target_fpr``."""
    store = FeatureStore.open(url)
    held = [store.read_rows(level, heldout_rows) for level in store.levels]
    test = [store.read_rows(level, test_rows) for level in store.levels]
    labels = store.manifest["label"].to_numpy()[test_rows]
    evaluation = evaluate_model(model, levels, held, test, labels, target_fpr)
    return model, evaluation
