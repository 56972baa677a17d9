"""GaussianAD against scikit-learn and scipy float64 references."""

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.stats import chi2
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from gaussian_ad.gaussian import GaussianAD, select_components
from gaussian_ad.thresholds import empirical_threshold, sigma_to_fpr


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def correlated(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + offset + rng.normal(size=d)


@pytest.mark.parametrize(
    ("n", "d", "offset", "dtype"),
    [(200, 16, 0.0, np.float64), (12, 40, 0.0, np.float64), (300, 24, 1e3, np.float32)],
    ids=["n>d", "n<d", "offset1e3-float32"],
)
def test_matches_sklearn_ledoit_wolf(n, d, offset, dtype):
    rng = np.random.default_rng(0)
    x = correlated(rng, n, d, offset).astype(dtype)
    x_other = correlated(rng, n, 7).astype(dtype)
    model = GaussianAD().fit([x, x_other])
    for level, data in enumerate([x, x_other]):
        # The reference sees the same values in float64 (sklearn would otherwise
        # compute in float32 and lose the digits we are checking).
        ref = LedoitWolf().fit(data.astype(np.float64))
        assert rel_err(model.means_[level], ref.location_) < 1e-6
        assert rel_err(model.covariances_[level], ref.covariance_) < 1e-6
        assert rel_err(model.precisions_[level], ref.precision_) < 1e-6
        assert abs(model.shrinkages_[level] - ref.shrinkage_) < 1e-6 * max(ref.shrinkage_, 1e-3)


def test_scores_match_scipy_mahalanobis():
    rng = np.random.default_rng(1)
    train = [correlated(rng, 150, 10), correlated(rng, 150, 5)]
    test = [correlated(rng, 20, 10) * 2, correlated(rng, 20, 5)]
    model = GaussianAD().fit(train)
    scores = model.level_scores(test)
    assert scores.shape == (20, 2)
    for level in range(2):
        ref = [
            mahalanobis(row, model.means_[level], model.precisions_[level])
            for row in test[level].astype(np.float64)
        ]
        assert rel_err(scores[:, level], np.array(ref)) < 1e-5
    np.testing.assert_allclose(model.anomaly_scores(test), scores.sum(axis=1))


def test_thresholds_match_scipy_chi2():
    rng = np.random.default_rng(2)
    model = GaussianAD().fit([rng.normal(size=(50, 3)), rng.normal(size=(50, 30))])
    for fpr in (0.01, 0.001):
        expected = np.sqrt(chi2.ppf(1 - fpr, [3, 30]))
        np.testing.assert_allclose(model.thresholds(fpr=fpr), expected, rtol=1e-9)
    for sigma in (1, 2, 3, 4, 5):
        p = sigma_to_fpr(sigma)
        expected = np.sqrt(chi2.ppf(1 - p, [3, 30]))
        np.testing.assert_allclose(model.thresholds(sigma=sigma), expected, rtol=1e-9)
    assert sigma_to_fpr(1) == pytest.approx(0.31731050786291415, rel=1e-12)
    with pytest.raises(ValueError, match="exactly one"):
        model.thresholds()


def test_chi2_threshold_predicts_fpr_on_gaussian_data():
    rng = np.random.default_rng(3)
    d = 8
    model = GaussianAD().fit([rng.normal(size=(20000, d))])
    held_out = model.level_scores([rng.normal(size=(20000, d))])[:, 0]
    threshold = model.thresholds(fpr=0.05)[0]
    assert np.mean(held_out > threshold) == pytest.approx(0.05, abs=0.01)


def test_predict_and_empirical_threshold():
    rng = np.random.default_rng(4)
    model = GaussianAD().fit([rng.normal(size=(500, 4))])
    normal = model.anomaly_scores([rng.normal(size=(1000, 4))])
    model.threshold_ = empirical_threshold(normal, fpr=0.1)
    flagged = model.predict([rng.normal(size=(2000, 4))])
    assert flagged.mean() == pytest.approx(0.1, abs=0.03)
    assert model.predict([np.full((1, 4), 50.0)]).all()


@pytest.mark.parametrize("reduction", ["pca", "npca"])
@pytest.mark.parametrize(("n", "d"), [(400, 12), (10, 25)], ids=["n>d", "n<d"])
def test_reduction_keeps_the_reference_components(reduction, n, d):
    rng = np.random.default_rng(5)
    x = correlated(rng, n, d) * np.linspace(5, 0.1, d)
    t = 0.9
    model = GaussianAD(reduction=reduction, variance_threshold=t).fit([x])
    ref = PCA(n_components=None).fit(x)
    k = int((ref.explained_variance_ratio_.cumsum() > t).argmax())
    expected = ref.components_[: k + 1] if reduction == "pca" else ref.components_[k - 1 :]
    ours = model.components_[0]
    assert ours.shape == expected.shape
    # Same axes up to sign; with n < d the last reference axis spans the null space
    # (variance ~0) and is arbitrary, so only the others are comparable.
    comparable = ref.explained_variance_[len(ref.components_) - len(expected) :] > 1e-9
    if reduction == "pca":
        comparable = ref.explained_variance_[: len(expected)] > 1e-9
    cosines = np.abs(np.sum(ours * expected, axis=1))
    np.testing.assert_allclose(cosines[comparable], 1.0, atol=1e-6)
    # The Gaussian on the projected features is sklearn's LedoitWolf on them.
    projected = (x - ref.mean_) @ ours.T
    lw = LedoitWolf().fit(projected)
    assert rel_err(model.covariances_[0], lw.covariance_) < 1e-6
    assert rel_err(model.precisions_[0], lw.precision_) < 1e-6


def test_select_components_on_constructed_spectrum():
    # Ratios 0.5, 0.3, 0.15, 0.04, 0.01 -> cumulative 0.5, 0.8, 0.95, 0.99, 1.0
    spectrum = np.array([50.0, 30.0, 15.0, 4.0, 1.0])
    assert select_components(spectrum, 100, "pca", 0.9) == slice(0, 3)
    assert select_components(spectrum, 100, "npca", 0.9) == slice(1, 5)
    assert select_components(spectrum, 100, "npca", 0.96) == slice(2, 5)
    # k = 0 (first component already above t): NPCA keeps only the last component.
    assert select_components(spectrum, 100, "npca", 0.4) == slice(4, 5)
    assert select_components(spectrum, 100, "pca", 0.4) == slice(0, 1)
    # n < d: only min(n, d) = 3 components exist; ratios over them: 50/95, 80/95, 1.0
    assert select_components(spectrum, 3, "pca", 0.9) == slice(0, 3)
    assert select_components(spectrum, 3, "npca", 0.9) == slice(1, 3)


@pytest.mark.parametrize("reduction", [None, "npca"])
def test_save_load_round_trip(tmp_path, reduction):
    rng = np.random.default_rng(6)
    train = [correlated(rng, 80, 6), correlated(rng, 80, 9)]
    test = [correlated(rng, 15, 6), correlated(rng, 15, 9)]
    model = GaussianAD(reduction=reduction).fit(train)
    model.threshold_ = 3.5
    path = model.save(tmp_path / "model.safetensors", metadata={"backbone": "lite0"})
    loaded = GaussianAD.load(path)
    np.testing.assert_array_equal(loaded.level_scores(test), model.level_scores(test))
    assert loaded.threshold_ == 3.5
    assert loaded.metadata_ == {"backbone": "lite0"}
    assert loaded.reduction == reduction
    assert b"pickle" not in path.read_bytes()[:2000]


def test_bad_input_is_named():
    rng = np.random.default_rng(7)
    model = GaussianAD().fit([rng.normal(size=(30, 4))])
    with pytest.raises(ValueError, match="dimension 5"):
        model.level_scores([rng.normal(size=(3, 5))])
    with pytest.raises(ValueError, match="reduction"):
        GaussianAD(reduction="svd").fit([rng.normal(size=(30, 4))])
    with pytest.raises(ValueError, match="different image counts"):
        GaussianAD().fit([rng.normal(size=(30, 4)), rng.normal(size=(31, 4))])
