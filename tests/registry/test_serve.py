"""The registered model over HTTP: ``mlflow models serve`` from the registry on 127.0.0.1,
queried with image bytes and paths; its ONNX export fetched with ``mlflow artifacts``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.detection.detector import Detector
from gaussian_ad.evaluation.evaluate import split_records
from gaussian_ad.registry.mlflow_model import (
    ONNX_ARTIFACT,
    ONNX_FILE,
    assign_aliases,
    log_detector,
    register,
)
from tests.services import BIN, free_port, running, start, wait_http

pytestmark = pytest.mark.integration

NAME = "gaussian-ad-serve-test"


@pytest.fixture(scope="module")
def champion(small_dataset, mlflow_uri) -> dict:
    """A small detector logged with its ONNX export, registered, alias champion."""
    train, test = split_records(mvtec_manifest(small_dataset, "disc"))
    paths = [r.path for r in train][:10]
    detector = Detector(DetectorConfig(input_size=64), LoaderOptions(device="cpu")).fit(paths)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("serve-test")
    with mlflow.start_run():
        info = log_detector(detector, NAME, example=paths[0], onnx_check=paths[:2])
    version = register(info.model_uri, NAME, {}, MlflowClient()).version
    assign_aliases(NAME, version, True)
    return {"detector": detector, "test": [r.path for r in test][:3], "version": version}


def test_the_onnx_file_downloads_from_the_champion(champion, mlflow_uri, tmp_path):
    result = subprocess.run(
        [str(BIN / "mlflow"), "artifacts", "download", "--artifact-uri",
         f"models:/{NAME}@champion/{ONNX_ARTIFACT}", "--dst-path", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        env={"MLFLOW_TRACKING_URI": mlflow_uri, "PATH": str(BIN)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    onnx_file = Path(result.stdout.strip().splitlines()[-1])  # the command prints where
    assert onnx_file.name == ONNX_FILE and onnx_file.is_relative_to(tmp_path)
    from gaussian_ad.export.runtime import OnnxDetector

    got = OnnxDetector(onnx_file).score(champion["test"])
    want = champion["detector"].score(champion["test"])
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-4)


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_mlflow_models_serve_scores_bytes_and_paths(champion, mlflow_uri, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    command = [
        str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    paths = champion["test"]
    encoded = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths[:2]]
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{BIN}:{os.environ['PATH']}"}  # uvicorn
    with running(start(command, log, env)) as process:
        wait_http(f"http://127.0.0.1:{port}/ping", process, log, timeout=300)
        url = f"http://127.0.0.1:{port}/invocations"
        rows = [
            [None, encoded[0]],
            [None, encoded[1]],
            [paths[2], None],
            [None, base64.b64encode(b"not an image at all").decode()],
            [None, "%%% not base64 %%%"],
            [str(tmp_path / "missing.png"), None],
        ]
        status, body = post(url, {"dataframe_split": {"columns": ["path", "image"], "data": rows}})
        assert status == 200, (body, log.read_text()[-3000:])
        # Only paths: the input of the registered signature before the image column.
        status_paths, by_path = post(url, {"dataframe_records": [{"path": paths[0]}]})
    assert status_paths == 200, by_path
    predictions = body["predictions"]
    assert len(predictions) == len(rows)
    detector = champion["detector"]
    want = detector.score(paths)
    for row, expected in zip(predictions[:3], want.scores, strict=True):
        assert row["error"] == ""
        assert row["score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert row["threshold"] == pytest.approx(detector.threshold)
        assert 0.0 <= row["normalized_score"] <= 1.0
        assert row["is_anomaly"] == (row["score"] > detector.threshold)
    assert [p["path"] for p in predictions[:3]] == ["<image 0>", "<image 1>", paths[2]]
    assert "not an image" in predictions[3]["error"]
    assert "not valid base64" in predictions[4]["error"]
    assert "file not found" in predictions[5]["error"]
    assert all(p["score"] is None or np.isnan(p["score"]) for p in predictions[3:])
    assert by_path["predictions"][0]["score"] == pytest.approx(want.scores[0], rel=1e-4, abs=1e-4)
