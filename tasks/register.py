"""Task: record a training run in MLflow and register (and maybe promote) its model."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from prefect import task

from gaussian_ad.detector import Detector
from gaussian_ad.evaluation import ModelEvaluation
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
    selection: dict[str, Any] | None = None,
) -> TrainingRecord:
    """Log the run, register the version with its tags, promote it if it does not lose."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(experiment, artifact_location)
    store = FeatureStore.open(url)
    detector = Detector.load(
        model_path,
        batch_size=backbone.batch_size,
        workers=backbone.workers,
        device=backbone.device,
    )
    params = {**params, "n_train": detector.fitted_model().n_samples_}
    test_rows = test_rows[store.valid()[test_rows]]
    test = store.manifest.iloc[test_rows]
    labels = test["label"].to_numpy()
    kind = detector.score_kind

    def champion_auroc(champion: Detector) -> float:
        """The champion on this run's test images (stored features when they fit it)."""
        same = all(champion.config()[k] == detector.config()[k] for k in SAME_FEATURES)
        if same and champion.score_kind == "image":
            levels = [store.read_rows(level, test_rows) for level in store.levels]
            return auroc(labels, champion.fitted_model().anomaly_scores(levels))
        result = champion.score(test["path"].tolist())
        return auroc(labels[result.index], result.scores)

    patch = evaluation.patch
    paths = test["path"].tolist()
    if kind == "image":
        thresholds = {
            k: v for k, v in evaluation.thresholds.thresholds.items() if k.startswith("empirical")
        }
    else:
        thresholds = {f"{kind} (chosen)": detector.threshold_}
    test_patch, heldout_patch = (
        (None, None) if patch is None else (patch.patch_scores, patch.heldout_patch)
    )
    report = ReportData(
        title=f"{category}: {detector.backbone}, levels {list(detector.levels)}, {kind} score",
        labels=labels,
        scores=detector.combine(evaluation.scores, test_patch),
        level_scores=evaluation.level_scores,
        levels=list(detector.levels),
        paths=paths,
        defects=test["defect"].tolist(),
        thresholds=thresholds,
        auroc=evaluation.chosen_auroc(kind),
        auroc_levels=evaluation.auroc_levels,
        heldout_scores=detector.combine(evaluation.heldout_scores, heldout_patch),
        params={**detector.config(), **params},
        metrics={**evaluation.summary_metrics(kind), **evaluation.thresholds.metrics},
        maps=None if patch is None else {paths[i]: m for i, m in patch.maps.items()},
    )
    return record_training(
        detector,
        evaluation,
        report,
        params,
        category,
        champion_auroc,
        tolerance,
        experiment_id,
        selection,
    )
