"""Calibration: one threshold, on the chosen score of held-out normals."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gaussian_ad.stats.calibration import Calibration, combine
from gaussian_ad.stats.fusion import Standardizer, fuse


@pytest.fixture
def held():
    rng = np.random.default_rng(0)
    return rng.normal(100, 5, 50), rng.normal(3, 0.5, 50)


@pytest.mark.parametrize("kind", ["image", "patch", "fused"])
def test_threshold_is_the_quantile_of_the_chosen_score(held, kind):
    image, patch = held
    calibration = Calibration.fit(kind, image, patch, target_fpr=0.1)
    chosen = {"image": image, "patch": patch}.get(kind)
    if chosen is None:
        chosen = fuse(image, patch, Standardizer.fit(image, patch))
    assert calibration.threshold == pytest.approx(np.quantile(chosen, 0.9))
    assert calibration.n_normals == 50 and calibration.kind == kind
    assert np.mean(calibration.scores(image, patch) > calibration.threshold) <= 0.1


def test_without_patch_scores_only_the_image_score(held):
    image, _ = held
    calibration = Calibration.fit("image", image, None, 0.01)
    assert calibration.standardizer is None
    with pytest.raises(ValueError, match="patch scores"):
        Calibration.fit("fused", image, None, 0.01)
    with pytest.raises(ValueError, match="standardiser"):
        combine("fused", image, image, None)


def test_round_trip(held):
    calibration = Calibration.fit("fused", *held, 0.05)
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_too_few_normals_for_the_target_fpr_are_said(held, caplog):
    image, patch = held  # 50 normals: 1/50 = 0.02 is the smallest FPR they resolve
    caplog.set_level(logging.WARNING, logger="gaussian_ad.stats.calibration")
    assert Calibration.fit("image", image, None, 0.05).smallest_fpr == pytest.approx(0.02)
    assert not caplog.records
    Calibration.fit("image", image, None, 0.01)
    (record,) = caplog.records
    assert "50 normal images cannot resolve a false-positive rate of 0.01" in record.getMessage()
    assert "0.02" in record.getMessage()
