"""Choosing a configuration on synthetic defects: the defects, the tie rule, the selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaussian_ad.cli import app
from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.defects import KINDS, synthetic_defect, validation_set
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.evaluation.evaluate import split_records
from gaussian_ad.evaluation.selection import (
    DEFAULT_GRID,
    Candidate,
    Selection,
    best_candidate,
    select_configuration,
)


@pytest.fixture(scope="module")
def grain_train(small_dataset) -> list[str]:
    train, _ = split_records(mvtec_manifest(small_dataset, "grain"))
    return [r.path for r in train]


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_defect_is_seeded_local_and_sized(grain_train, kind):
    image = Image.open(grain_train[0]).convert("RGB")
    pixels = np.asarray(image).astype(int)
    for seed in range(5):
        out, mask = synthetic_defect(image, kind, np.random.default_rng(seed))
        again, mask_again = synthetic_defect(image, kind, np.random.default_rng(seed))
        assert out.size == image.size and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(again))
        assert np.array_equal(mask, mask_again)
        assert 0.002 <= mask.mean() <= 0.06, mask.mean()
        diff = np.abs(np.asarray(out).astype(int) - pixels).max(axis=-1)
        assert not diff[~mask].any()  # nothing changes outside the mask
        assert diff[mask].mean() > 5  # visible inside it
    other, _ = synthetic_defect(image, kind, np.random.default_rng(99))
    assert not np.array_equal(np.asarray(other), np.asarray(out))


def test_unknown_kinds_are_rejected(grain_train):
    image = Image.open(grain_train[0])
    with pytest.raises(ValueError, match="unknown defect kind"):
        synthetic_defect(image, "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown defect kinds"):
        validation_set(grain_train[:2], 1, seed=0, kinds=("dent",))


def test_validation_set_holds_normals_then_defective_copies(grain_train):
    images, labels, masks = validation_set(grain_train[:3], n_per_kind=2, seed=4, size=96)
    assert labels.tolist() == [0] * 3 + [1] * 2 * len(KINDS)
    assert all(image.size == (96, 96) for image in images)
    assert [bool(mask.any()) for mask in masks] == labels.astype(bool).tolist()
    again, _, _ = validation_set(grain_train[:3], n_per_kind=2, seed=4, size=96)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True)
    )


def test_candidates_are_validated():
    with pytest.raises(ValueError, match="patch candidate"):
        Candidate("1-9", None, "patch")
    with pytest.raises(ValueError, match="needs image-level levels"):
        Candidate(None, None, "fused")
    with pytest.raises(ValueError, match="score must be"):
        Candidate("7", None, "pixel")
    assert len(set(DEFAULT_GRID)) == len(DEFAULT_GRID)


def test_candidate_configures_a_detector():
    base = DetectorConfig(levels="3-5", seed=3, patch_channels=40)
    fused = Candidate("6-8", "npca", "fused").config(base)
    assert fused == base.replace(
        levels="6-8", reduction="npca", score="fused", patch=True, patch_pool_radius=0
    )
    assert Candidate("7", None, "image").config(base) == base.replace(levels="7", score="image")
    patch = Candidate(None, None, "patch").config(base)
    assert (patch.levels, patch.score, patch.patch) == ((3, 4, 5), "patch", True)


def test_ties_go_to_the_simpler_candidate():
    patch = Candidate(None, None, "patch")
    fused = Candidate("7", None, "fused")
    npca = Candidate("7", "npca", "image")
    many = Candidate("1-9", None, "image")
    one = Candidate("7", None, "image")
    results = [(patch, 0.9), (fused, 0.9), (npca, 0.9), (many, 0.9), (one, 0.9 + 1e-12)]
    assert best_candidate(results, 9) == one
    assert best_candidate(results[:4], 9) == many
    assert best_candidate(results[:3], 9) == npca
    assert best_candidate(results[:2], 9) == fused
    assert best_candidate([(one, 0.8), (patch, 0.81)], 9) == patch


def test_select_configuration_scores_every_candidate(grain_train):
    grid = [
        Candidate("6-8", None, "image"),
        Candidate("7", "npca", "fused"),
        Candidate(None, None, "patch"),
    ]
    selection = select_configuration(
        grain_train[:10],  # a small fit keeps the test fast
        grain_train[10:14],
        DetectorConfig(backbone="lite0"),
        grid,
        LoaderOptions(device="cpu", batch_size=16),
        n_per_kind=2,
    )
    assert [c for c, _ in selection.results] == grid
    assert all(0.0 <= value <= 1.0 for _, value in selection.results)
    assert selection.best == best_candidate(selection.results, 9)
    assert selection.counts == {
        "fit": 10,
        "standardize": 2,
        "validation_normal": 2,
        "validation_defective": 2 * len(KINDS),
    }
    restored = Selection.from_dict(json.loads(json.dumps(selection.to_dict())))
    assert restored == selection
    assert (selection.backbone, selection.seed) == ("lite0", 0)
    # Grid levels the backbone does not have are rejected before any image is read.
    with pytest.raises(ValueError, match=r"levels \[6, 7, 8, 9\] out of range"):
        select_configuration(
            grain_train[:20], grain_train[20:], DetectorConfig(backbone="resnet18"), DEFAULT_GRID
        )


def test_cli_select_writes_the_selection(small_dataset, tmp_path):
    out = tmp_path / "selection.json"
    result = CliRunner().invoke(
        app,
        [
            "select",
            str(small_dataset),
            "--category",
            "disc",
            "--n-per-kind",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    selection = Selection.from_dict(json.loads(out.read_text()))
    assert [c for c, _ in selection.results] == list(DEFAULT_GRID)
    assert "chosen:" in result.output
