"""Tasks: fit from the store's statistics on Dask; calibrate and evaluate from stored rows."""

from __future__ import annotations

import numpy as np
from prefect import task

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.detection.detector import Detector
from gaussian_ad.evaluation.evaluate import Evaluation, evaluate_store
from gaussian_ad.store.feature_store import FeatureStore


@task(name="fit-statistics", retries=1, retry_delay_seconds=5)
def fit_statistics(
    url: str, rows: np.ndarray, config: DetectorConfig, model_path: str, base_path: str | None
) -> str:
    """Fit (or, from ``base_path``, merge into) a detector from the store's rows; saved."""
    detector = Detector(config) if base_path is None else Detector.load(base_path)
    detector.fit_store(FeatureStore.open(url), rows).save(model_path)
    return model_path


@task(name="evaluate", retries=1)
def evaluate(
    url: str,
    model_path: str,
    loader: LoaderOptions,
    heldout_rows: np.ndarray,
    test_rows: np.ndarray,
    target_fpr: float,
) -> Evaluation:
    """Calibrate on the held-out rows, evaluate on the test rows; saves the calibrated model."""
    detector = Detector.load(model_path, loader)
    evaluation = evaluate_store(
        detector, FeatureStore.open(url), heldout_rows, test_rows, target_fpr
    )
    detector.save(model_path)
    return evaluation
