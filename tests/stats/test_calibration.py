"""Calibration: one threshold, on the chosen score of held-out normals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from gaussian_ad.stats.calibration import MAX_NORMAL_SCORES, Calibration, combine
from gaussian_ad.stats.fusion import SPREAD_FLOOR, LevelStandardizer, Standardizer, fuse


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


@pytest.mark.parametrize("kind", ["image", "patch", "fused"])
def test_normalized_is_the_fraction_of_calibration_normals_below(held, kind):
    image, patch = held
    calibration = Calibration.fit(kind, image, patch, target_fpr=0.1)
    chosen = calibration.scores(image, patch)
    probes = np.concatenate([chosen, np.linspace(chosen.min() - 1, chosen.max() + 1, 101)])
    expected = (chosen[None, :] < probes[:, None]).mean(axis=1)
    np.testing.assert_array_equal(calibration.normalized(probes), expected)
    ordered = calibration.normalized(np.sort(probes))
    assert np.all(np.diff(ordered) >= 0) and ordered[0] == 0.0 and ordered[-1] == 1.0
    assert calibration.normalized(np.array([calibration.threshold]))[0] == pytest.approx(0.9)


def test_normalized_keeps_nan_and_shape(held):
    calibration = Calibration.fit("image", held[0], None, 0.1)
    out = calibration.normalized(np.array([np.nan, 1e9]))
    assert np.isnan(out[0]) and out[1] == 1.0
    assert calibration.normalized(np.empty(0)).shape == (0,)


def test_many_normals_keep_quantiles_close_to_the_exact_fraction():
    rng = np.random.default_rng(1)
    image = rng.gamma(3.0, 2.0, MAX_NORMAL_SCORES * 20)
    calibration = Calibration.fit("image", image, None, 0.01)
    assert len(calibration.normal_scores) == MAX_NORMAL_SCORES
    assert calibration.n_normals == image.size
    probes = np.quantile(image, np.linspace(0, 1, 333)) + 1e-3
    exact = (image[None, :] < probes[:, None]).mean(axis=1)
    np.testing.assert_allclose(calibration.normalized(probes), exact, atol=2e-3)
    assert np.all(np.diff(calibration.normalized(np.sort(probes))) >= 0)


def test_normal_scores_round_trip_through_json(held):
    calibration = Calibration.fit("fused", *held, 0.05)
    restored = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert restored == calibration and restored.has_normalized
    probes = np.linspace(-5, 5, 41)
    np.testing.assert_array_equal(restored.normalized(probes), calibration.normalized(probes))


def test_an_older_dict_without_normal_scores_loads_without_normalized(held):
    old = Calibration.fit("image", held[0], None, 0.05).to_dict()
    del old["normal_scores"]
    calibration = Calibration.from_dict(old)
    assert calibration.normal_scores is None and not calibration.has_normalized
    assert calibration.threshold == old["threshold"]
    with pytest.raises(ValueError, match="no normal scores"):
        calibration.normalized(np.array([1.0]))


def test_standardised_levels_sum_each_levels_z_score():
    rng = np.random.default_rng(3)
    # Level 2 spreads 6x wider than level 1 on the normals (as a d > n level does), so the
    # plain sum is mostly level 2; the standardised sum weights both alike.
    held = np.column_stack([rng.normal(4, 1, 60), rng.normal(35, 6, 60)])
    levels = LevelStandardizer.fit(held)
    np.testing.assert_allclose(levels.means, held.mean(axis=0))
    np.testing.assert_allclose(levels.stds, held.std(axis=0, ddof=1))
    new = np.array([[8.0, 35.0], [4.0, 47.0]])  # 4 sigma on level 1; 2 sigma on level 2
    expected = ((new - held.mean(0)) / held.std(0, ddof=1)).sum(axis=1)
    np.testing.assert_allclose(levels.image_scores(new), expected)
    assert levels.image_scores(new)[0] > levels.image_scores(new)[1]  # the plain sum disagrees
    assert new[0].sum() < new[1].sum()
    calibration = Calibration.fit("image", levels.image_scores(held), None, 0.1, levels)
    np.testing.assert_allclose(calibration.image_scores(new), expected)
    np.testing.assert_allclose(
        Calibration.fit("image", held.sum(1), None, 0.1).image_scores(new), new.sum(1)
    )
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration


def test_standardised_levels_refuse_flat_or_mismatched_scores():
    with pytest.raises(ValueError, match=r"level scores \(column 1\) have no spread"):
        LevelStandardizer.fit(np.column_stack([np.arange(5.0), np.ones(5)]))
    with pytest.raises(ValueError, match="n >= 2"):
        LevelStandardizer.fit(np.ones((1, 3)))
    levels = LevelStandardizer.fit(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        levels.image_scores(np.ones((2, 4)))


def test_a_near_zero_spread_is_floored_with_a_warning(caplog):
    rounding = np.array([10.0, 10.0 + 1e-9, 10.0 - 1e-9, 10.0])  # float rounding, not images
    with caplog.at_level(logging.WARNING, logger="gaussian_ad.stats.fusion"):
        standardizer = Standardizer.fit(np.array([1.0, 2.0, 3.0, 4.0]), rounding)
        levels = LevelStandardizer.fit(np.column_stack([np.arange(4.0), rounding]))
    assert standardizer.patch_std == pytest.approx(SPREAD_FLOOR * 10.0)
    assert levels.stds[1] == pytest.approx(SPREAD_FLOOR * 10.0)
    assert levels.stds[0] == pytest.approx(np.arange(4.0).std(ddof=1))  # a real spread stays
    assert "barely spread" in caplog.text and "patch scores" in caplog.text
    new_image = np.array([[1.5, 10.0 + 1e-6]])  # rounding-sized change: not an outlier
    assert abs(levels.image_scores(new_image)[0]) < 1.0


def test_with_standardised_levels_the_patch_z_score_counts_as_one_more_level(held):
    image, patch = held  # image: as if a sum of level z-scores
    levels = LevelStandardizer((0.0,), (1.0,))
    calibration = Calibration.fit("fused", image, patch, 0.05, levels=levels)
    assert calibration.standardizer.image_std == 1.0
    expected = image - image.mean() + (patch - patch.mean()) / patch.std(ddof=1)
    np.testing.assert_allclose(calibration.scores(image, patch), expected)
    summed = Calibration.fit("fused", image, patch, 0.05)  # the paper's sum: both rescaled
    assert summed.standardizer.image_std == pytest.approx(image.std(ddof=1))
