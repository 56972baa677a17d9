"""GaussianAD against scikit-learn and scipy float64 references, and sklearn's contract."""

import json
import warnings

import numpy as np
import pytest
from safetensors import safe_open
from scipy.spatial.distance import mahalanobis
from scipy.stats import chi2
from sklearn.base import clone
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from gaussian_ad.stats.arrayfile import read_arrays, write_arrays
from gaussian_ad.stats.estimator import NotFittedError
from gaussian_ad.stats.gaussian import GaussianAD, select_components, zero_variance
from gaussian_ad.stats.moments import Moments
from gaussian_ad.stats.thresholds import empirical_threshold, sigma_to_fpr


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
    threshold = empirical_threshold(normal, fpr=0.1)
    flagged = model.predict([rng.normal(size=(2000, 4))], threshold)
    assert flagged.mean() == pytest.approx(0.1, abs=0.03)
    assert model.predict([np.full((1, 4), 50.0)], threshold=threshold).all()
    # The threshold is the caller's (the detector's calibration): no default, no attribute.
    assert not hasattr(model, "threshold_")
    with pytest.raises(TypeError):
        model.predict([rng.normal(size=(3, 4))])
    with pytest.raises(ValueError, match="threshold"):
        model.predict([rng.normal(size=(3, 4))], None)


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
    path = model.save(tmp_path / "model.safetensors", metadata={"backbone": "lite0"})
    loaded = GaussianAD.load(path)
    np.testing.assert_array_equal(loaded.level_scores(test), model.level_scores(test))
    assert loaded.metadata_ == {"backbone": "lite0"}
    assert loaded.reduction == reduction
    assert loaded.get_params() == model.get_params()
    assert not hasattr(loaded, "threshold_")
    assert b"pickle" not in path.read_bytes()[:2000]
    with safe_open(str(path), framework="numpy") as f:
        assert "threshold" not in json.loads(f.metadata()["gaussian_ad"])


@pytest.mark.parametrize("reduction", [None, "npca"])
def test_load_ignores_the_threshold_of_a_format_1_file(tmp_path, reduction):
    rng = np.random.default_rng(16)
    train = [correlated(rng, 60, 5), correlated(rng, 60, 7)]
    test = [correlated(rng, 10, 5), correlated(rng, 10, 7)]
    model = GaussianAD(reduction=reduction).fit(train)
    header, arrays = read_arrays(
        model.save(tmp_path / "new.safetensors"), "gaussian_ad", 2, "gaussian-ad model"
    )
    old = write_arrays(
        tmp_path / "old.safetensors",
        arrays,
        "gaussian_ad",
        {**header, "format_version": 1, "threshold": 3.5, "metadata": {"a": 1}},
    )
    loaded = GaussianAD.load(old)
    np.testing.assert_array_equal(loaded.level_scores(test), model.level_scores(test))
    assert not hasattr(loaded, "threshold_")
    assert loaded.metadata_ == {"a": 1}


def test_bad_input_is_named():
    rng = np.random.default_rng(7)
    model = GaussianAD().fit([rng.normal(size=(30, 4))])
    with pytest.raises(ValueError, match="dimension 5"):
        model.level_scores([rng.normal(size=(3, 5))])
    with pytest.raises(ValueError, match="reduction"):
        GaussianAD(reduction="svd").fit([rng.normal(size=(30, 4))])
    with pytest.raises(ValueError, match="different image counts"):
        GaussianAD().fit([rng.normal(size=(30, 4)), rng.normal(size=(31, 4))])


def test_init_stores_keyword_parameters_only():
    assert vars(GaussianAD()) == {"reduction": None, "variance_threshold": 0.99}
    marker = object()  # stored as given, not validated or copied
    assert GaussianAD(reduction=marker).reduction is marker
    with pytest.raises(TypeError):
        GaussianAD("pca")
    with pytest.raises(TypeError):
        GaussianAD(None, 0.9)


def test_get_params_set_params_clone_round_trip():
    rng = np.random.default_rng(8)
    train = [correlated(rng, 40, 6)]
    model = GaussianAD(reduction="npca", variance_threshold=0.9)
    assert model.get_params() == {"reduction": "npca", "variance_threshold": 0.9}
    assert repr(model) == "GaussianAD(reduction='npca', variance_threshold=0.9)"
    assert model.set_params(variance_threshold=0.8) is model
    assert model.variance_threshold == 0.8
    model.fit(train)
    copy = clone(model)
    assert copy.get_params() == model.get_params()
    assert not [name for name in vars(copy) if name.endswith("_")]
    with pytest.raises(NotFittedError):
        copy.anomaly_scores(train)
    np.testing.assert_array_equal(copy.fit(train).level_scores(train), model.level_scores(train))
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(threshold=3.0)


def test_learned_attributes_exist_only_after_fitting():
    model = GaussianAD()
    for name in ("means_", "precisions_", "covariances_", "moments_", "dims_", "threshold_"):
        assert not hasattr(model, name)
    model.fit([np.random.default_rng(9).normal(size=(20, 3))])
    for name in ("means_", "precisions_", "covariances_", "moments_", "dims_", "n_samples_"):
        assert hasattr(model, name)
    assert not hasattr(model, "threshold_")


def test_not_fitted_error_names_the_class(tmp_path):
    model = GaussianAD()
    levels = [np.zeros((2, 3))]
    calls = {
        "level_scores": lambda: model.level_scores(levels),
        "anomaly_scores": lambda: model.anomaly_scores(levels),
        "thresholds": lambda: model.thresholds(fpr=0.01),
        "predict": lambda: model.predict(levels, 1.0),
        "transform": lambda: model.transform(levels),
        "dims_expected": lambda: model.dims_expected(),
        "dims_": lambda: model.dims_,
        "save": lambda: model.save(tmp_path / "model.safetensors"),
    }
    for name, call in calls.items():
        with pytest.raises(NotFittedError, match="GaussianAD"):
            call()
        assert not (tmp_path / "model.safetensors").exists(), name


def test_after_fit_components_only_transform_works():
    rng = np.random.default_rng(10)
    x = correlated(rng, 30, 6)
    model = GaussianAD(reduction="pca", variance_threshold=0.9).fit_components(
        [Moments.from_array(x)]
    )
    assert model.transform([x])[0].shape[1] == model.components_[0].shape[0]
    with pytest.raises(NotFittedError, match="GaussianAD"):
        model.level_scores([x])
    with pytest.raises(ValueError, match="fit_components"):
        GaussianAD(reduction="pca").fit_moments([Moments.from_array(x)])


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"reduction": "svd"}, "reduction"),
        ({"reduction": "PCA"}, "reduction"),
        ({"variance_threshold": 0.0}, "variance_threshold"),
        ({"variance_threshold": 1.0}, "variance_threshold"),
        ({"variance_threshold": -0.5}, "variance_threshold"),
        ({"variance_threshold": float("nan")}, "variance_threshold"),
        ({"variance_threshold": "0.9"}, "variance_threshold"),
        ({"variance_threshold": True}, "variance_threshold"),
        ({"variance_threshold": None}, "variance_threshold"),
        ({"reduction": "npca", "variance_threshold": 2.0}, "variance_threshold"),
    ],
)
def test_invalid_parameters_are_rejected_at_fit_by_name(params, name):
    x = np.random.default_rng(11).normal(size=(30, 4))
    model = GaussianAD(**params)  # no validation in __init__
    with pytest.raises(ValueError, match=name):
        model.fit([x])
    with pytest.raises(ValueError, match=name):
        GaussianAD(**params).fit_moments([Moments.from_array(x)])
    with pytest.raises(ValueError, match=name):
        GaussianAD().fit([x]).set_params(**params).fit([x])


# ------------------------------------------------------------------- degenerate data
def identical_rows(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    return np.tile(rng.normal(size=(1, d)) + offset, (n, 1))


@pytest.mark.parametrize("reduction", [None, "pca", "npca"])
@pytest.mark.parametrize(
    "make",
    [
        lambda rng: identical_rows(rng, 10, 6),
        lambda rng: identical_rows(rng, 10, 6, offset=1e3).astype(np.float32),
        lambda rng: np.zeros((10, 6)),
        lambda rng: identical_rows(rng, 10, 6) * (1 + 1e-12 * rng.normal(size=(10, 6))),
    ],
    ids=["identical", "identical-offset-float32", "zeros", "1e-12-relative"],
)
def test_identical_training_images_are_rejected_naming_the_level(make, reduction):
    rng = np.random.default_rng(12)
    good = correlated(rng, 10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by a zero variance on the way
        with pytest.raises(ValueError, match=r"level 2 of 2: the training images are \(num"):
            GaussianAD(reduction=reduction).fit([good, make(rng)])


def test_identical_images_are_rejected_from_merged_or_far_shifted_statistics():
    rng = np.random.default_rng(13)
    x = identical_rows(rng, 12, 5, offset=1e3)
    parts = Moments.from_array(x[:5]) + Moments.from_array(x[5:])
    far = Moments.from_array(x, shift=np.zeros(5))  # cancellation at 1e6 scale
    for moments in (parts, far):
        assert zero_variance(moments)
        with pytest.raises(ValueError, match=r"level 1 of 1: the training images are"):
            GaussianAD().fit_moments([moments])
    fitted = GaussianAD().fit([correlated(rng, 12, 5)])
    with pytest.raises(ValueError, match="at least 2 training images"):
        GaussianAD().fit([x[:1]])
    assert hasattr(fitted, "means_")


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("reduction", [None, "pca", "npca"])
def test_near_identical_images_fit_and_rank(offset, reduction):
    # Ten images that differ by noise of 1e-6 of their magnitude: near-singular, not
    # degenerate; the fit must match sklearn and rank larger deviations higher.
    rng = np.random.default_rng(14)
    d = 16
    base = rng.normal(size=d) + offset
    scale = 1e-6 * np.linalg.norm(base) / np.sqrt(d)
    x = base + scale * rng.normal(size=(10, d))
    assert not zero_variance(Moments.from_array(x))
    model = GaussianAD(reduction=reduction).fit([x])
    if reduction is None:
        ref = LedoitWolf().fit(x)
        assert rel_err(model.covariances_[0], ref.covariance_) < 1e-6
        assert rel_err(model.precisions_[0], ref.precision_) < 1e-6
    near = model.anomaly_scores([base + scale * rng.normal(size=(20, d))])
    far = model.anomaly_scores([base + 100 * scale * rng.normal(size=(20, d))])
    assert np.isfinite(near).all() and np.isfinite(far).all()
    assert near.max() < far.min()
    assert len(np.unique(near)) == len(near)


@pytest.mark.parametrize("reduction", [None, "pca"])
def test_rank_one_training_data_fits_and_ranks(reduction):
    rng = np.random.default_rng(15)
    d = 8
    direction, centre = rng.normal(size=d), rng.normal(size=d)
    x = rng.normal(size=(50, 1)) * direction + centre
    model = GaussianAD(reduction=reduction).fit([x])
    if reduction is None:
        ref = LedoitWolf().fit(x)
        assert rel_err(model.covariances_[0], ref.covariance_) < 1e-6
        assert rel_err(model.precisions_[0], ref.precision_) < 1e-6
        off_line = centre + 0.5 * rng.normal(size=(20, d))
    else:
        off_line = centre + 5.0 * direction * rng.choice([-1, 1], size=(20, 1))
    on_line = rng.uniform(-1, 1, size=(20, 1)) * direction + centre
    near, far = model.anomaly_scores([on_line]), model.anomaly_scores([off_line])
    assert np.isfinite(near).all() and np.isfinite(far).all()
    assert near.max() < far.min()


def test_zero_variance_on_the_kept_components_is_named():
    # Raw features vary along the first axis only; NPCA keeps one of the (exactly) empty
    # axes, so the projected features are all zero: rejected, not fitted to zeros.
    rng = np.random.default_rng(17)
    x = np.zeros((20, 3))
    x[:, 0] = rng.normal(size=20)
    with pytest.raises(ValueError, match=r"level 1 of 1: .*zero variance on the kept 'npca'"):
        GaussianAD(reduction="npca").fit([x])
    assert np.isfinite(GaussianAD(reduction="pca").fit([x]).level_scores([x])).all()


@pytest.mark.parametrize("reduction", [None, "npca"])
def test_load_uses_the_saved_precisions_and_files_without_them_still_load(tmp_path, reduction):
    from gaussian_ad.stats.arrayfile import ModelFileError, read_arrays, write_arrays
    from gaussian_ad.stats.gaussian import FORMAT_VERSION

    rng = np.random.default_rng(3)
    levels = [rng.normal(size=(40, 6)), rng.normal(size=(40, 4)) @ rng.normal(size=(4, 4))]
    model = GaussianAD(reduction=reduction).fit(levels)
    path = model.save(tmp_path / "m.safetensors")
    loaded = GaussianAD.load(path)
    for saved, again in zip(model.precisions_, loaded.precisions_, strict=True):
        np.testing.assert_array_equal(again, saved)  # read, not inverted again
    np.testing.assert_array_equal(loaded.level_scores(levels), model.level_scores(levels))
    header, arrays = read_arrays(path, "gaussian_ad", FORMAT_VERSION, "model")
    older = {k: v for k, v in arrays.items() if not k.endswith(".precision")}
    write_arrays(tmp_path / "old.safetensors", older, "gaussian_ad", header)
    refitted = GaussianAD.load(tmp_path / "old.safetensors")
    np.testing.assert_allclose(
        refitted.level_scores(levels), model.level_scores(levels), rtol=1e-12
    )
    arrays["level0.precision"] = np.eye(3)
    write_arrays(tmp_path / "bad.safetensors", arrays, "gaussian_ad", header)
    with pytest.raises(ModelFileError, match="precisions"):
        GaussianAD.load(tmp_path / "bad.safetensors")
