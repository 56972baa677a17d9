"""The Prefect flows against a real mlflow server, under Prefect's test harness."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from gaussian_ad_flows.options import TrainOptions
from mlflow.tracking import MlflowClient

from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.detection.detector import Detector
from gaussian_ad.export.onnx import SCORE_RTOL
from gaussian_ad.registry.mlflow_model import load_detector
from gaussian_ad.store.feature_store import FeatureStore
from tests.conftest import copy_new_normals

pytestmark = pytest.mark.integration

CATEGORY = "disc"
NAME = f"gaussian-ad-{CATEGORY}"


@pytest.fixture(scope="module")
def trained(small_dataset, prefect_harness, mlflow_uri, tmp_path_factory) -> dict:
    """One training flow run of the disc category, under a train-all flow run."""
    from gaussian_ad_flows.train import train_all

    home = tmp_path_factory.mktemp("home")
    options = TrainOptions(shard_size=16, home=str(home))
    [result] = train_all(str(small_dataset), [CATEGORY], options=options)
    return {**result, "home": str(home)}


HEADLINE_METRICS = {
    "auroc",
    "auroc_image",
    "threshold",
    "test_fpr",
    "test_recall",
    "heldout_fpr",
    "n_train",
    # the default detector has the (position-free) patch model:
    "auroc_patch",
    "auroc_fused",
    "pixel_auroc",
    "pro",
}


def flow_run_artifacts(flow_run_id: str) -> list:
    """The Prefect artifacts of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def flow_run_name(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def test_training_registers_a_tagged_champion(trained, mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.version == trained["version"]
    # A first version is the champion, and nothing challenges it.
    aliases = client.get_registered_model(NAME).aliases
    assert {alias: str(v) for alias, v in aliases.items()} == {"champion": trained["version"]}
    tags = version.tags
    for key in ("auroc", "threshold", "backbone", "levels", "n_train", "promoted"):
        assert tags[key], key
    assert max(len(value) for value in tags.values()) <= 64  # short tags, no JSON
    assert float(tags["auroc"]) == pytest.approx(trained["auroc"], abs=1e-6)
    assert float(tags["auroc"]) >= 0.9
    assert tags["backbone"] == "lite0"
    assert tags["levels"] == "1,2,3,4,5,6,7,8,9"
    assert (tags["input_size"], tags["standardize_levels"]) == ("352", "True")  # the defaults
    assert int(tags["n_train"]) == 25  # every train/good image (calibrated out of fold)
    assert len(tags["data_fingerprint"]) == 16
    assert tags["promoted"] == "True"
    # Among the first five tags by name, the ones MLflow's UI shows:
    assert sorted(tags).index("decision") < 5
    assert tags["decision"] == f"promoted; flagged when fused score > {trained['threshold']:.6g}"
    run = client.get_run(trained["run_id"])
    assert run.data.metrics["auroc"] == pytest.approx(trained["auroc"])
    assert set(run.data.metrics) == HEADLINE_METRICS
    assert run.data.metrics["n_train"] == 25
    assert 0 <= run.data.metrics["test_fpr"] <= 1 and run.data.metrics["test_recall"] >= 0.5
    assert run.data.params["data_fingerprint"].startswith(tags["data_fingerprint"])
    # The pooling "auto" chose, and its evidence: the disc sits inside the frame
    assert run.data.params["patch_pool_radius"] == "auto"
    assert run.data.params["patch_pool_chosen"] == "position-free"
    assert 0 <= float(run.data.params["border_peak_share"]) <= 0.5
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in client.list_artifacts(trained["run_id"])}
    assert {"report.html", "chi2_levels.json"} <= artifacts
    uri = f"runs:/{trained['run_id']}/chi2_levels.json"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path))
    levels = json.loads(Path(local).read_text())
    assert levels["levels"] == list(range(1, 10)) and len(levels["auroc"]) == 9
    sigma3 = levels["chi2"]["sigma3"]
    assert len(sigma3["threshold"]) == len(sigma3["observed_fpr"]) == len(sigma3["tpr"]) == 9
    assert sigma3["predicted_fpr"] == pytest.approx(0.0027, abs=1e-4)
    # The default model ranks, thresholds and promotes by the fused score.
    assert tags["score"] == "fused"
    assert run.data.metrics["auroc"] == pytest.approx(run.data.metrics["auroc_fused"])
    assert float(tags["threshold"]) == pytest.approx(run.data.metrics["threshold"], rel=1e-6)
    # Extraction shards ran on the local Dask cluster's workers.
    assert trained["shards"]
    assert all(s["worker"].startswith(("tcp://", "inproc://")) for s in trained["shards"])


def test_the_version_carries_its_onnx_export(trained, mlflow_uri, tmp_path):
    import onnx

    from gaussian_ad.registry.mlflow_model import ONNX_ARTIFACT

    uri = f"models:/{NAME}/{trained['version']}/{ONNX_ARTIFACT}"
    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path))
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    tags = MlflowClient(mlflow_uri).get_model_version(NAME, trained["version"]).tags
    assert float(props["threshold"]) == pytest.approx(float(tags["threshold"]), abs=1e-6)
    assert props["score_kind"] == tags["score"]


def test_descriptions_say_what_was_trained_and_why_it_was_promoted(trained, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version(NAME, trained["version"])
    assert "25 good images" in version.description and "AUROC 1.0000" in version.description
    assert "Promoted to champion: no champion yet" in version.description
    # The working point: threshold, held-out FPR, confusion matrix, recall per defect type,
    # the same numbers as the run's metrics.
    run = client.get_run(trained["run_id"])
    metrics = run.data.metrics
    point = re.search(
        r"flagged when its fused score > (\S+); held-out normals' FPR (\S+) \(\d+ images\)\. "
        r"On the test set: TP (\d+), FN (\d+), FP (\d+), TN (\d+) \(FPR (\S+), recall (\S+)\)",
        version.description,
    )
    assert point is not None, version.description
    assert float(point[1]) == pytest.approx(metrics["threshold"], rel=1e-5)
    assert float(point[2]) == pytest.approx(metrics["heldout_fpr"], abs=1e-3)
    tp, fn, fp, tn = (int(point[i]) for i in range(3, 7))
    assert float(point[7]) == pytest.approx(metrics["test_fpr"], abs=1e-3)
    assert tp / (tp + fn) == pytest.approx(metrics["test_recall"], abs=1e-3)
    assert fp / (fp + tn) == pytest.approx(metrics["test_fpr"], abs=1e-3)
    assert "Recall per defect type: " in version.description
    assert run.data.tags["mlflow.note.content"] == version.description
    model = client.get_registered_model(NAME)
    assert f"Champion: v{trained['version']}, AUROC" in model.description
    assert "no champion yet" in model.description


def test_run_spans_the_training(trained, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    # The store was written after the run started; the version registered before it ended.
    store_files = [f for f in Path(trained["store"]).rglob("*") if f.is_file()]
    assert run.info.start_time <= min(f.stat().st_mtime for f in store_files) * 1000
    version = client.get_model_version(NAME, trained["version"])
    assert run.info.end_time >= version.creation_timestamp
    duration = (run.info.end_time - run.info.start_time) / 1000
    assert duration >= max(s["seconds"] for s in trained["shards"])
    assert run.data.tags["prefect_flow_run_id"] == trained["flow_run_id"]
    # Named so that two runs of a category differ in the runs list.
    assert re.fullmatch(rf"{CATEGORY}-v{trained['version']}-fused-[\d-]{{15}}", run.info.run_name)


def test_train_all_names_its_run_by_date_and_summarises_each_category(trained):
    [artifact] = scoring_artifacts("train-all")[:1]
    assert re.fullmatch(r"train-all-\d{4}-\d\d-\d\d-\d{4}", flow_run_name(artifact.flow_run_id))
    row = (
        f"| {CATEGORY} | {NAME} v{trained['version']} | {trained['auroc']:.4f} (fused) | "
        f"yes: champion | no champion yet | `{trained['report']}` |"
    )
    assert row in artifact.data and "| category | model version |" in artifact.data


def test_logged_model_has_a_signature_and_the_category_name(trained, small_dataset, mlflow_uri):
    info = mlflow.models.get_model_info(f"models:/{NAME}/{trained['version']}")
    assert info.name == NAME
    signature = info.signature
    inputs = [(c.name, c.type.name, c.required) for c in signature.inputs.inputs]
    assert inputs == [("path", "string", False), ("image", "string", False)]
    outputs = {c.name: c.type.name for c in signature.outputs.inputs}
    levels = {f"score_l{level}": "double" for level in range(1, 10)}
    expected = {"path": "string", "score": "double", **levels, "is_anomaly": "boolean"}
    expected |= {"image_score": "double", "patch_score": "double"}  # the default patch model
    expected |= {"normalized_score": "double", "threshold": "double", "error": "string"}
    assert outputs == expected
    paths = [r.path for r in mvtec_manifest(small_dataset, CATEGORY, splits=("test",))][:2]
    table = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"path": paths}))
    assert list(table.columns) == list(outputs)


def test_training_publishes_its_headline_figures_to_prefect(trained, mlflow_uri):
    assert flow_run_name(trained["flow_run_id"]) == f"train-{CATEGORY}"
    [artifact] = flow_run_artifacts(trained["flow_run_id"])
    assert artifact.key == f"train-{CATEGORY}" and artifact.type == "markdown"
    text = artifact.data
    for figure in ("AUROC", "threshold", "FPR at the threshold", "recall", "promoted"):
        assert figure in text, figure
    assert f"| AUROC (fused score, ranks and promotes) | {trained['auroc']:.4f} |" in text
    experiment = MlflowClient(mlflow_uri).get_run(trained["run_id"]).info.experiment_id
    ml = "?workflowType=machine_learning"  # MLflow 3's UI, else in its GenAI view
    assert f"{mlflow_uri}/#/experiments/{experiment}/runs/{trained['run_id']}{ml})" in text
    assert f"{mlflow_uri}/#/models/{NAME}/versions/{trained['version']}{ml})" in text


def test_logged_report_shows_the_registry_verdict(trained, mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    html = Path(client.download_artifacts(trained["run_id"], "report.html", str(tmp_path)))
    text = html.read_text()
    assert f"model version <b>{trained['version']}</b>" in text
    assert f"category <b>{CATEGORY}</b>" in text
    assert '<span class="badge champion">champion</span>' in text
    assert trained["reason"] == "no champion yet" and "no champion yet" in text
    assert "first version of this model" in text and trained["report"].endswith("/report.html")
    assert "Technical configuration: lite0 at 352 px" in text
    assert f'<b id="threshold">{trained["threshold"]:.6g}</b>' in text
    # Its target FPR came from the detector's calibration.
    assert "for a target FPR of 0.01" in text


def test_cli_report_prints_where_the_champions_report_is(
    trained, mlflow_uri, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from gaussian_ad.cli import app

    monkeypatch.setenv("GAUSSIAN_AD_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["report", CATEGORY])
    assert result.exit_code == 0, result.output
    first, page = result.output.splitlines()  # no download progress bar in between
    assert first.startswith(f"models:/{NAME}@champion: ")
    path = Path(first.split(": ", 1)[1])  # downloaded: the server keeps the artifacts
    assert path.name == "report.html" and path.is_relative_to(tmp_path / "home" / "reports")
    assert f"model version <b>{trained['version']}</b>" in path.read_text()
    run = f"experiments/{trained['experiment_id']}/runs/{trained['run_id']}"
    ml = "?workflowType=machine_learning"
    assert page == f"MLflow: {mlflow_uri}/#/{run}/artifacts/report.html{ml}"
    result = CliRunner().invoke(app, ["report", f"models:/{NAME}/{trained['version']}"])
    assert result.exit_code == 0 and str(path.name) in result.output


def test_pyfunc_champion_scores_like_the_detector(trained, small_dataset, mlflow_uri):
    paths = [r.path for r in mvtec_manifest(small_dataset, CATEGORY, splits=("test",))][:6]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    table = pyfunc.predict(pd.DataFrame({"path": paths}))
    detector = load_detector(f"models:/{NAME}@champion")
    direct = detector.score(paths)
    # The champion carries its ONNX export and the pyfunc scores with onnxruntime: equal to
    # the torch path within the tolerance the exporter checks before it writes the file.
    close = {"rtol": SCORE_RTOL, "atol": SCORE_RTOL}
    np.testing.assert_allclose(table["score"].to_numpy(), direct.scores, **close)
    np.testing.assert_allclose(table["score_l7"].to_numpy(), direct.level_scores[:, 6], **close)
    assert table["is_anomaly"].tolist() == direct.is_anomaly.tolist()
    assert isinstance(detector, Detector) and detector.threshold is not None


def test_loading_a_registered_model_leaves_no_download_behind(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where downloads go by default
    detector = load_detector(f"models:/{NAME}/{trained['version']}")
    assert detector.threshold is not None and list(tmp_path.iterdir()) == []


def test_worse_model_does_not_take_champion(trained, small_dataset, tmp_path, mlflow_uri):
    from gaussian_ad_flows.train import train

    # Mislabeled training set: the test anomalies are copied into train/good.
    bad_root = tmp_path / "mislabeled"
    shutil.copytree(small_dataset / CATEGORY, bad_root / CATEGORY)
    good = bad_root / CATEGORY / "train" / "good"
    for record in mvtec_manifest(small_dataset, CATEGORY, splits=("test",)):
        if record.label == 1:
            for copy in range(3):
                target = good / f"bad_{record.defect}_{copy}_{Path(record.path).name}"
                shutil.copy(record.path, target)
    result = train(str(bad_root), CATEGORY, TrainOptions(shard_size=32, home=trained["home"]))
    client = MlflowClient(mlflow_uri)
    assert not result["promoted"]
    assert result["auroc"] < trained["auroc"]
    assert client.get_model_version_by_alias(NAME, "champion").version == trained["version"]
    assert client.get_model_version_by_alias(NAME, "challenger").version == result["version"]
    assert "champion kept" in client.get_run(result["run_id"]).data.tags["promotion_reason"]
    metrics = client.get_run(result["run_id"]).data.metrics
    assert set(metrics) == HEADLINE_METRICS | {"champion_auroc"}
    description = client.get_model_version(NAME, result["version"]).description
    assert f"the champion (v{trained['version']}) scored" in description
    assert "Not promoted: AUROC" in description and "champion kept" in description
    model = client.get_registered_model(NAME).description
    assert f"Champion: v{trained['version']}" in model
    assert f"Last training: v{result['version']}, not promoted" in model
    [artifact] = flow_run_artifacts(result["flow_run_id"])
    assert "| promoted | no |" in artifact.data and "**Not promoted**: AUROC" in artifact.data
    report = client.download_artifacts(result["run_id"], "report.html", str(tmp_path))
    text = Path(report).read_text()
    assert f"model version <b>{result['version']}</b>" in text
    assert '<span class="badge challenger">not promoted</span>' in text
    assert "champion kept" in text


@pytest.fixture
def archive(small_dataset, tmp_path) -> tuple[Path, int]:
    """A tar of the disc test images plus a corrupt member and a path-traversal member."""
    path = tmp_path / "batch.tar"
    records = mvtec_manifest(small_dataset, CATEGORY, splits=("test",))
    with tarfile.open(path, "w") as tar:
        for r in records:
            tar.add(r.path, arcname=f"{r.defect}/{Path(r.path).name}")
        for name, data in [("broken/corrupt.png", b"\x89PNG\r\n\x1a\nnope"), ("../evil.png", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, len(records)


def test_scoring_flow_resumes_with_each_image_once(trained, archive, tmp_path):
    from gaussian_ad_flows.score import score

    path, n_images = archive
    out = tmp_path / "scores"
    summary = score(str(path), category=CATEGORY, out=str(out), shard_size=5, home=trained["home"])
    assert summary["scored"] == n_images
    parts = sorted((out / "scores").glob("part-*.parquet"))
    assert len(parts) == summary["shards"] == -(-(n_images + 1) // 5)
    table = pd.concat(pd.read_parquet(p) for p in parts)
    assert table["path"].is_unique and len(table) == n_images
    assert set(table["model_version"]) == {trained["version"]}
    errors = pd.concat(pd.read_parquet(p) for p in (out / "errors").glob("*.parquet"))
    reasons = dict(zip(errors["path"].str.rsplit("!", n=1).str[-1], errors["reason"], strict=True))
    assert (
        "corrupt" in reasons["broken/corrupt.png"]
        or "not an image" in reasons["broken/corrupt.png"]
    )
    assert "traversal" in reasons["../evil.png"]

    # Interrupted job: two shards' outputs are gone (never written), a stale temp is left.
    for part in parts[1:3]:
        part.unlink()
    (out / "scores" / ".part-00001.parquet.123.tmp").write_bytes(b"partial")
    rerun = score(str(path), category=CATEGORY, out=str(out), shard_size=5, home=trained["home"])
    assert rerun["shards_run"] == 2
    table = pd.concat(pd.read_parquet(p) for p in sorted((out / "scores").glob("part-*.parquet")))
    assert len(table) == n_images and table["path"].is_unique
    # Each scoring flow run published its summary table under the source's key.
    second, first = scoring_artifacts("score-batch-tar")[:2]
    assert {flow_run_name(a.flow_run_id) for a in (first, second)} == {"score-batch.tar"}
    assert first.type == "table"
    [row] = json.loads(second.data)
    assert row["scored"] == n_images and row["errors"] == 2
    [notes] = scoring_artifacts("score-batch-tar-errors")[:1]
    assert "| file | reason |" in notes.data and f"`{out / 'scores'}`" in notes.data
    assert "broken/corrupt.png" in notes.data and "traversal" in notes.data
    assert row["anomalous"] == int(table["is_anomaly"].sum())
    assert row["output folder"] == str(out)


def scoring_artifacts(key: str) -> list:
    """The artifacts stored under ``key``, newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
        )


def test_nightly_deployment_has_the_configured_cron(small_dataset):
    from gaussian_ad_flows.nightly import deployments

    made = deployments(str(small_dataset), categories=["disc", "weave"], cron="30 1 * * *")
    nightly = {d.name: d for d in made if d.name.startswith("nightly-")}
    assert set(nightly) == {"nightly-disc", "nightly-weave"}
    schedule = nightly["nightly-disc"].schedules[0].schedule
    assert schedule.cron == "30 1 * * *"
    assert nightly["nightly-disc"].parameters["categories"] == ["disc"]
    assert any(d.name == "score-archive" for d in made)


def test_incremental_retraining_merges_new_images_into_the_champion(
    trained, small_dataset, tmp_path, mlflow_uri
):
    from gaussian_ad_flows.train import train

    new_images = copy_new_normals(small_dataset, CATEGORY, 6, tmp_path / "new")
    champion = load_detector(f"models:/{NAME}@champion")
    options = TrainOptions(
        shard_size=16,
        home=trained["home"],
        incremental_from=f"models:/{NAME}@champion",
        new_images=str(new_images),
    )
    result = train(str(small_dataset), CATEGORY, options)
    merged = load_detector(f"models:/{NAME}/{result['version']}")
    assert merged.model_.n_samples_ == champion.model_.n_samples_ + 6
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result["run_id"])
    assert run.data.params["incremental_from"] == f"models:/{NAME}@champion"


def test_cli_train_and_score_archive_flags_reach_the_flows(
    small_dataset, prefect_harness, mlflow_uri, tmp_path, monkeypatch, archive
):
    import gaussian_ad_flows.train  # noqa: F401
    from typer.testing import CliRunner

    from gaussian_ad.cli import app

    # The CLI imports Prefect lazily; imported inside the first invoke, Prefect's console
    # log handler would keep that invoke's captured (then closed) stream for the next one.
    monkeypatch.setenv("GAUSSIAN_AD_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    args = ["train", str(small_dataset), "--category", "grain", "--levels", "7-9"]
    args += ["--target-fpr", "0.05", "--shard-size", "8", "--seed", "1", "--batch-size", "9"]
    result = runner.invoke(app, [*args, "--no-photometric"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias("gaussian-ad-grain", "champion")
    assert version.tags["levels"] == "7,8,9"
    run = client.get_run(version.run_id)
    assert run.data.params["target_fpr"] == "0.05" and run.data.params["seed"] == "1"
    augment = run.data.params["augment"]
    assert "'photometric': False" in augment and "'flips': True" in augment
    store = FeatureStore.open(_store_of(tmp_path / "home"))
    assert store.n_shards == -(-store.n_rows // 8)
    path, n_images = archive
    out = tmp_path / "scores"
    args = ["score-archive", str(path), "--category", "grain", "--out", str(out)]
    result = runner.invoke(app, [*args, "--shard-size", "4", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "scores").glob("part-*.parquet"))) == -(-(n_images + 1) // 4)
    result = runner.invoke(app, [*args, "--shard-size", "0"])
    assert result.exit_code == 2 and "shard-size" in result.output


def _store_of(home: Path) -> str:
    (store,) = (home / "stores" / "grain").glob("*.zarr")
    return str(store)
