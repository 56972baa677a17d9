"""Task: record a training run in MLflow and register (and maybe promote) its model."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from prefect import task

from gaussian_ad.detector import Detector
from gaussian_ad.evaluation import ModelEvaluation
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.metrics import auroc
from gaussian_ad.registry import TrainingRecord, ensure_experiment, record_training
from gaussian_ad.report import ReportData
from gaussian_ad.store import FeatureStore
from tasks.extract import BackboneConfig

SAME_FEATURES = ("backbone", "levels", "weights", "pretrained")


@task(name="register-model", retries=2, retry_delay_seconds=5)
def register_model(
    tracking_uri: str,
    experiment: str,
    artifact_location: str | None,
    url: str,
    backbone: BackboneConfig,
    model_path: str,
    evaluation: ModelEvaluation,
    test_rows: np.ndarray,
    params: dict[str, Any],
    category: str,
    tolerance: float,
) -> TrainingRecord:
    """Log the run, register the version with its tags, promote it if it does not lose."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, artifact_location)
    store = FeatureStore.open(url)
    model = GaussianAD.load(model_path)
    params = {**params, "n_train": model.n_samples_}
    detector = Detector(
        backbone.name,
        backbone.levels,
        model.reduction,
        model.variance_threshold,
        backbone.weights,
        backbone.pretrained,
        backbone.batch_size,
        backbone.workers,
        backbone.device,
    )
    detector.model_ = model
    test = store.manifest.iloc[test_rows]
    labels = test["label"].to_numpy()

    def champion_auroc(champion: Detector) -> float:
        """The champion on this run's test images (stored features when they fit it)."""
        if all(champion.config()[k] == detector.config()[k] for k in SAME_FEATURES):
            levels = [store.read_rows(level, test_rows) for level in store.levels]
            return auroc(labels, champion.fitted_model().anomaly_scores(levels))
        result = champion.score(test["path"].tolist())
        return auroc(labels[result.index], result.scores)

    report = ReportData(
        title=f"{category}: {detector.backbone}, levels {list(detector.levels)}",
        labels=labels,
        scores=evaluation.scores,
        level_scores=evaluation.level_scores,
        levels=list(detector.levels),
        paths=test["path"].tolist(),
        defects=test["defect"].tolist(),
        thresholds={
            k: v for k, v in evaluation.thresholds.thresholds.items() if k.startswith("empirical")
        },
        auroc=evaluation.auroc,
        auroc_levels=evaluation.auroc_levels,
        heldout_scores=evaluation.heldout_scores,
        params={**detector.config(), **params},
        metrics=evaluation.thresholds.metrics,
    )
    return record_training(
        detector, evaluation, report, params, category, champion_auroc, tolerance, experiment_id
    )
