"""Short names the registry writes (selection candidates' keys, run names, MLflow UI links)
and the experiments it leaves."""

from __future__ import annotations

from datetime import datetime

import pytest
from mlflow.tracking import MlflowClient

from gaussian_ad.evaluation.selection import Candidate, default_grid
from gaussian_ad.registry.mlflow_model import (
    candidate_key,
    local_path,
    run_name,
    training_run,
    ui_url,
)


@pytest.mark.parametrize(
    ("candidate", "key"),
    [
        (Candidate("1-9", None, "image"), "image_L1-9"),
        (Candidate("1,3,5", "npca", "image"), "image_L1.3.5_npca"),
        (Candidate("1-9", None, "fused", 0), "fused_L1-9"),
        (Candidate("1-9", None, "fused", None), "fused_L1-9_free"),
        (Candidate("6-8", "npca", "fused", 2), "fused_L6-8_npca_pool2"),
        (Candidate(None, None, "patch", 0), "patch"),
        (Candidate(None, None, "patch", None), "patch_free"),
        (Candidate(None, None, "patch", 1), "patch_pool1"),
    ],
)
def test_candidate_key_names_levels_reduction_and_pooling(candidate, key):
    assert candidate_key(candidate.to_dict()) == key


def test_candidate_keys_tell_the_default_grid_apart():
    keys = [candidate_key(c.to_dict()) for c in default_grid()]
    assert len(set(keys)) == len(keys)


def test_candidate_key_of_a_selection_recorded_before_pooling():
    assert candidate_key({"levels": "1-9", "reduction": None, "score": "fused"}) == "fused_L1-9"


def test_ui_url_opens_the_model_training_workflow():
    url = ui_url("http://host:5000/", "experiments/3")
    assert url == "http://host:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_url("sqlite:///mlflow.db", "experiments/3") is None


def test_run_names_tell_two_runs_of_a_category_apart():
    started = datetime(2026, 12, 3, 11, 52)
    assert run_name("disc", "image", started, "2") == "disc-v2-image-2026-12-03-1152"
    assert run_name("disc", "fused", started) == "disc-fused-2026-12-03-1152"
    assert run_name("disc", "fused", started, "1") != run_name("disc", "image", started, "2")


def test_local_path_of_a_file_uri_only():
    assert local_path("file:///tmp/a%20b/report.html") == "/tmp/a b/report.html"
    assert local_path("mlflow-artifacts:/1/abc/artifacts/report.html").startswith("mlflow-")


def test_the_embedded_stores_empty_default_experiment_is_dropped(tmp_path):
    """On a real SQLite tracking store: Default stays while the store is not the project's
    own (no artifact location: a tracking server) or while it holds a run; then the next
    training's run deletes it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    with training_run(uri, "gaussian-ad", None, "r1", {}):
        pass
    assert client.get_experiment("0").lifecycle_stage == "active"
    in_default = client.create_run("0").info.run_id
    location = (tmp_path / "artifacts").as_uri()
    with training_run(uri, "gaussian-ad", location, "r2", {}):
        pass
    assert client.get_experiment("0").lifecycle_stage == "active"
    client.delete_run(in_default)
    with training_run(uri, "gaussian-ad", location, "r3", {}):
        pass
    assert client.get_experiment("0").lifecycle_stage == "deleted"
    assert [e.name for e in client.search_experiments()] == ["gaussian-ad"]
