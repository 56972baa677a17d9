"""Short names the registry writes: selection candidates' keys and MLflow UI links."""

from __future__ import annotations

import pytest

from gaussian_ad.evaluation.selection import Candidate, default_grid
from gaussian_ad.registry.mlflow_model import candidate_key, ui_url


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
