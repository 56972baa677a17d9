"""Tasks: fit and calibrate from the store's statistics on Dask; evaluate from stored rows."""

from __future__ import annotations

import numpy as np
from gaussian_ad_tasks.retries import worth_retrying
from prefect import task

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.detection.detector import Detector
from gaussian_ad.detection.scores import Scores
from gaussian_ad.evaluation.evaluate import Evaluation, evaluate_store
from gaussian_ad.store.feature_store import FeatureStore


@task(name="fit-statistics", retries=1, retry_condition_fn=worth_retrying, retry_delay_seconds=5)
def fit_statistics(
    url: str,
    rows: np.ndarray,
    config: DetectorConfig,
    model_path: str,
    base_path: str | None,
    target_fpr: float,
) -> Scores:
    """Fit (or, from ``base_path``, merge into) a detector from the store's rows, calibrated
    out of fold, and save it; returns the out-of-fold scores of the rows."""
    detector = Detector(config) if base_path is None else Detector.load(base_path)
    detector.fit_store(FeatureStore.open(url), rows, target_fpr).save(model_path)
    return detector.oof_scores_


@task(name="evaluate", retries=1, retry_condition_fn=worth_retrying)
def evaluate(
    url: str, model_path: str, loader: LoaderOptions, heldout: Scores, test_rows: np.ndarray
) -> Evaluation:
    """Evaluate the calibrated model on the store's test rows."""
    detector = Detector.load(model_path, loader)
    return evaluate_store(detector, FeatureStore.open(url), heldout, test_rows)
