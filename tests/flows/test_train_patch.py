"""Training with the patch-level model and configuration selection, through the registry."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from gaussian_ad_flows.options import TrainOptions
from mlflow.tracking import MlflowClient
from PIL import Image

from gaussian_ad.data.images import load_masks, mvtec_manifest
from gaussian_ad.evaluation.selection import Selection
from gaussian_ad.export.onnx import SCORE_RTOL
from gaussian_ad.registry.mlflow_model import candidate_key, load_detector
from gaussian_ad.stats.metrics import auroc, pixel_auroc
from gaussian_ad.store.feature_store import FeatureStore
from tests.conftest import copy_new_normals

pytestmark = pytest.mark.integration

CATEGORY = "weave"
NAME = f"gaussian-ad-{CATEGORY}"


@pytest.fixture(scope="module")
def trained(small_dataset, prefect_harness, mlflow_uri, tmp_path_factory) -> dict:
    """One training run with the patch model and the selection on synthetic defects."""
    from gaussian_ad_flows.train import train

    home = tmp_path_factory.mktemp("home")
    options = TrainOptions.model_validate(
        {
            "shard_size": 16,
            "home": str(home),
            # 224 px (not the default 352): a third of the compute, the same assertions.
            "detector": {"patch": True, "input_size": 224},
            "select": True,
            "select_per_kind": 3,
            "select_grid": [
                {"levels": "1-9", "reduction": None, "score": "image"},
                {"levels": "6-8", "reduction": None, "score": "image"},
                {"levels": "1-9", "reduction": None, "score": "fused"},
                {"levels": None, "reduction": None, "score": "patch"},
            ],
        }
    )
    result = train(str(small_dataset), CATEGORY, options)
    return {**result, "home": str(home)}


def test_selection_is_logged_with_the_version_and_reloadable(trained, mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    version = client.get_model_version(NAME, trained["version"])
    selection = trained["selection"]
    assert version.tags["selection"] == candidate_key(selection["best"])
    assert version.tags["score"] == selection["best"]["score"] == trained["score"]
    # The candidates' AUROCs are in selection.json, not among the run's headline metrics.
    run = client.get_run(trained["run_id"])
    assert not [k for k in run.data.metrics if k.startswith("select_")]
    uri = f"runs:/{trained['run_id']}/selection.json"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path))
    reloaded = Selection.from_dict(json.loads(Path(local).read_text()))
    assert reloaded.to_dict() == selection and len(selection["results"]) == 4
    best_auroc = max(value for _, value in reloaded.results)
    assert dict((c, v) for c, v in reloaded.results)[reloaded.best] == best_auroc


def test_patch_metrics_reach_the_run(trained, mlflow_uri):
    metrics = MlflowClient(mlflow_uri).get_run(trained["run_id"]).data.metrics
    assert metrics["pixel_auroc"] >= 0.9
    assert 0.0 < metrics["pro"] <= 1.0
    best_part = max(metrics["auroc_image"], metrics["auroc_patch"])
    assert metrics["auroc_fused"] >= best_part - 0.01
    assert metrics["auroc"] == pytest.approx(metrics[f"auroc_{trained['score']}"])
    assert not [name for name in metrics if name.startswith("chi2_")]
    version = MlflowClient(mlflow_uri).get_model_version(NAME, trained["version"])
    assert float(version.tags["pro"]) == pytest.approx(metrics["pro"], abs=1e-6)
    signature = mlflow.models.get_model_info(f"models:/{NAME}/{trained['version']}").signature
    outputs = [c.name for c in signature.outputs.inputs]
    assert {"image_score", "patch_score"} <= set(outputs)


def test_registry_model_reproduces_scores_and_maps(trained, small_dataset, mlflow_uri):
    records = mvtec_manifest(small_dataset, CATEGORY, splits=("test",))
    paths = [r.path for r in records]
    detector = load_detector(f"models:/{NAME}/{trained['version']}")
    result = detector.score(paths, maps=True)
    assert len(result.index) == len(paths)
    # The flow computed its metrics from stored features; the registered model, from files.
    metrics = MlflowClient(mlflow_uri).get_run(trained["run_id"]).data.metrics
    labels = np.array([r.label for r in records])
    assert auroc(labels, result.patch_scores) == pytest.approx(metrics["auroc_patch"], abs=1e-9)
    assert auroc(labels, result.scores) == pytest.approx(metrics["auroc"], abs=1e-9)
    masks = load_masks([r.mask for r in records], result.maps.shape[-1])
    assert pixel_auroc(masks, result.maps) == pytest.approx(metrics["pixel_auroc"], abs=1e-4)
    store = FeatureStore.open(trained["store"])
    rows = np.flatnonzero(store.manifest["split"].to_numpy() == "test")
    _, stored_maps = detector.patch_model_.anomaly_maps(
        store.read_patches(rows), result.maps.shape[-1]
    )
    np.testing.assert_allclose(result.maps, stored_maps, rtol=1e-3, atol=1e-3)
    # The pyfunc wrapper gives the same scores (with onnxruntime, from the version's ONNX
    # export: within the tolerance the exporter checks before it writes the file).
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/{trained['version']}")
    table = pyfunc.predict(pd.DataFrame({"path": paths[:5]}))
    close = {"rtol": SCORE_RTOL, "atol": SCORE_RTOL}
    np.testing.assert_allclose(table["score"], result.scores[:5], **close)
    np.testing.assert_allclose(table["patch_score"], result.patch_scores[:5], **close)
    assert table["is_anomaly"].tolist() == (result.scores[:5] > detector.threshold).tolist()


def test_scoring_flow_writes_maps_of_the_anomalous_images(trained, small_dataset, tmp_path):
    from gaussian_ad_flows.score import score

    folder = small_dataset / CATEGORY / "test"
    out = tmp_path / "scores"
    model = f"models:/{NAME}/{trained['version']}"
    summary = score(
        str(folder), model=model, out=str(out), shard_size=8, maps=True, home=trained["home"]
    )
    table = pd.concat(pd.read_parquet(p) for p in (out / "scores").glob("part-*.parquet"))
    anomalous = table[table["is_anomaly"]]
    assert len(anomalous) >= 1 and summary["maps_written"] == len(anomalous)
    written = sorted((out / "maps").rglob("*.png"))
    assert len(written) == len(anomalous)
    assert set(anomalous["map"]) == {str(p.relative_to(out)) for p in written}
    assert (table.loc[~table["is_anomaly"], "map"] == "").all()
    for name, map_file in zip(anomalous["path"], anomalous["map"], strict=True):
        with Image.open(out / map_file) as overlay, Image.open(name) as image:
            # The image at the top, above its legend.
            assert overlay.width >= image.width and overlay.height > image.height
    assert {"image_score", "patch_score"} <= set(table.columns)
    assert not list(folder.rglob("*.png.png"))  # nothing written next to the sources


def test_incremental_retraining_merges_into_the_patch_model(
    trained, small_dataset, tmp_path, mlflow_uri
):
    from gaussian_ad_flows.train import train

    new_images = copy_new_normals(small_dataset, CATEGORY, 4, tmp_path / "new")
    base_uri = f"models:/{NAME}/{trained['version']}"
    options = TrainOptions(
        shard_size=16, home=trained["home"], incremental_from=base_uri, new_images=str(new_images)
    )
    result = train(str(small_dataset), CATEGORY, options)
    base, merged = load_detector(base_uri), load_detector(f"models:/{NAME}/{result['version']}")
    assert merged.patch_model_.n_samples_ == base.patch_model_.n_samples_ + 4
    assert merged.model_.n_samples_ == base.model_.n_samples_ + 4
    assert merged.patch_layout_ == base.patch_layout_
    assert merged.config == base.config
    assert MlflowClient(mlflow_uri).get_run(result["run_id"]).data.metrics["pixel_auroc"] >= 0.9
