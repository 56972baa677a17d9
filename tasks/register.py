"""Task: record a training run in MLflow and register (and maybe promote) its model."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import task

from gaussian_ad.config import LoaderOptions
from gaussian_ad.detection.detector import Detector
from gaussian_ad.evaluation.evaluate import Evaluation
from gaussian_ad.registry.mlflow_model import TrainingRecord, ensure_experiment, record_training
from gaussian_ad.store.feature_store import FeatureStore


@task(name="register-model", retries=2, retry_delay_seconds=5)
def register_model(
    tracking: tuple[str, str, str | None],
    url: str,
    model_path: str,
    loader: LoaderOptions,
    evaluation: Evaluation,
    run: dict[str, Any],
) -> TrainingRecord:
    """Log the run, register the version with its tags, promote it if it does not lose.

    ``tracking`` is (tracking URI, experiment, artifact location); ``run`` holds the
    category, the promotion tolerance, the selection and the run's parameters.
    """
    uri, experiment, artifact_location = tracking
    mlflow.set_tracking_uri(uri)
    return record_training(
        Detector.load(model_path, loader),
        evaluation,
        FeatureStore.open(url),
        run["params"],
        run["category"],
        run["tolerance"],
        ensure_experiment(experiment, artifact_location),
        run["selection"],
    )
