"""Task: record a training in its MLflow run and register (and maybe promote) its model."""

from __future__ import annotations

from typing import Any

import mlflow
from gaussian_ad_tasks.retries import worth_retrying
from prefect import task

from gaussian_ad.config import LoaderOptions
from gaussian_ad.detection.detector import Detector
from gaussian_ad.evaluation.evaluate import Evaluation
from gaussian_ad.registry.mlflow_model import TrainingRecord, record_training
from gaussian_ad.store.feature_store import FeatureStore


@task(name="register-model", retries=2, retry_condition_fn=worth_retrying, retry_delay_seconds=5)
def register_model(
    tracking: tuple[str, str],
    url: str,
    model_path: str,
    loader: LoaderOptions,
    evaluation: Evaluation,
    run: dict[str, Any],
) -> TrainingRecord:
    """Log into the training's run, register the version with its tags and description,
    promote it if it does not lose.

    ``tracking`` is (tracking URI, run id of the training's run); ``run`` holds the
    category, the promotion tolerance, the selection and the run's parameters.
    """
    uri, run_id = tracking
    mlflow.set_tracking_uri(uri)
    return record_training(
        run_id,
        Detector.load(model_path, loader),
        evaluation,
        FeatureStore.open(url),
        run["params"],
        run["category"],
        run["tolerance"],
        run["selection"],
    )
