"""Scores carry the normalised score: decide fills it, take/concat keep it, tables show it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from gaussian_ad.config import DetectorConfig
from gaussian_ad.detection.detector import Detector
from gaussian_ad.detection.scores import Scores, concat_scores
from gaussian_ad.scoring.tables import score_table
from gaussian_ad.stats.calibration import Calibration
from gaussian_ad.stats.gaussian import GaussianAD

LEVELS = (7, 8)


def level_scores(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).gamma(4.0, 3.0, (n, len(LEVELS)))


@pytest.fixture
def detector() -> Detector:
    detector = Detector(DetectorConfig(levels=LEVELS, score="image", patch=False))
    detector.calibration_ = Calibration.fit("image", level_scores(40, 0).sum(1), None, 0.1)
    return detector


def test_decide_fills_the_normalised_score_from_the_calibration(detector):
    scores = detector.decide(Scores(index=np.arange(6), level_scores=level_scores(6, 1)))
    normals = np.asarray(detector.calibration_.normal_scores)
    expected = (normals[None, :] < scores.image_scores[:, None]).mean(axis=1)
    np.testing.assert_array_equal(scores.normalized, expected)
    np.testing.assert_array_equal(scores.is_anomaly, scores.scores > detector.threshold)


def test_an_older_calibration_or_none_gives_no_normalised_score(detector):
    detector.calibration_ = replace(detector.calibration_, normal_scores=None)
    scores = detector.decide(Scores(index=np.arange(3), level_scores=level_scores(3, 1)))
    assert scores.normalized is None and scores.is_anomaly is not None
    table = score_table(["a", "b", "c"], scores, LEVELS)
    assert table["normalized_score"].isna().all() and table["is_anomaly"].notna().all()
    detector.calibration_ = None
    assert detector.decide(Scores(np.arange(3), level_scores(3, 1))).normalized is None


def test_take_and_concat_keep_the_normalised_score(detector):
    parts = [
        detector.decide(Scores(np.arange(i, i + n), level_scores(n, i)))
        for i, n in [(0, 4), (4, 0), (4, 3)]
    ]
    whole = concat_scores(parts, [])
    np.testing.assert_array_equal(whole.normalized, np.concatenate([p.normalized for p in parts]))
    rows = np.array([5, 1])
    picked = whole.take(rows)
    np.testing.assert_array_equal(picked.normalized, whole.normalized[rows])
    np.testing.assert_array_equal(picked.index, rows)
    parts[1].normalized = None  # one part without: unknown for all
    assert concat_scores(parts, []).normalized is None


def test_score_table_puts_the_normalised_score_next_to_the_decision(detector):
    scores = detector.decide(Scores(index=np.arange(4), level_scores=level_scores(4, 2)))
    table = score_table(list("abcd"), scores, LEVELS)
    assert list(table.columns) == [
        "path",
        "score",
        "score_l7",
        "score_l8",
        "is_anomaly",
        "normalized_score",
    ]
    np.testing.assert_array_equal(table["normalized_score"], scores.normalized)
    assert table["normalized_score"].between(0, 1).all()
    uncalibrated = Scores(np.arange(2), level_scores(2, 3), scores=np.ones(2))
    table = score_table(["a", "b"], uncalibrated, LEVELS)
    assert table["normalized_score"].isna().all() and table["is_anomaly"].dtype == pd.BooleanDtype()


def test_the_normalised_score_survives_saving_the_detector(detector, tmp_path):
    rng = np.random.default_rng(4)
    levels = [rng.normal(size=(30, 4)), rng.normal(size=(30, 3))]
    calibration = detector.calibration_
    detector.set_models(GaussianAD().fit(levels)).calibration_ = calibration
    loaded = Detector.load(detector.save(tmp_path / "det.safetensors"))
    assert loaded.calibration_ == calibration and loaded.calibration_.has_normalized
    scores = Scores(index=np.arange(5), level_scores=level_scores(5, 5))
    np.testing.assert_array_equal(
        loaded.decide(scores).normalized, calibration.normalized(scores.image_scores)
    )
