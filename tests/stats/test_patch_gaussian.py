"""PatchGaussian against scikit-learn and torch references, and sklearn's estimator contract."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.base import clone
from sklearn.covariance import LedoitWolf

from gaussian_ad.stats.arrayfile import read_arrays, write_arrays
from gaussian_ad.stats.estimator import NotFittedError
from gaussian_ad.stats.moments import BatchMoments
from gaussian_ad.stats.patch_gaussian import (
    PatchGaussian,
    gaussian_matrix,
    pool_positions,
    upsample_bilinear,
)


def patches(rng: np.random.Generator, n: int, p: int, d: int, offset: float = 0.0) -> np.ndarray:
    """(n, P, d) features, correlated and with a different mean at every position."""
    mixing = rng.normal(size=(p, d, d)) / np.sqrt(d)
    return np.einsum("npi,pij->npj", rng.normal(size=(n, p, d)), mixing) + (
        offset + rng.normal(size=(p, d))
    )


def test_init_stores_keyword_parameters_only():
    assert vars(PatchGaussian()) == {"sigma": None, "pool_radius": 0}
    marker = object()
    assert PatchGaussian(sigma=marker).sigma is marker
    with pytest.raises(TypeError):
        PatchGaussian(2.0)
    assert not hasattr(PatchGaussian(), "layout_")


def test_get_params_set_params_clone_round_trip():
    rng = np.random.default_rng(0)
    x = patches(rng, 20, 4, 3)
    model = PatchGaussian(sigma=2.0)
    assert model.get_params() == {"sigma": 2.0, "pool_radius": 0}
    assert repr(model) == "PatchGaussian(sigma=2.0)"
    assert model.set_params(sigma=1.5) is model and model.sigma == 1.5
    model.fit(x)
    copy = clone(model)
    assert copy.get_params() == {"sigma": 1.5, "pool_radius": 0}
    assert not [name for name in vars(copy) if name.endswith("_")]
    with pytest.raises(NotFittedError):
        copy.score_maps(x)
    np.testing.assert_array_equal(copy.fit(x).score_maps(x), model.score_maps(x))
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(layout=None)


def test_not_fitted_error_names_the_class(tmp_path):
    model = PatchGaussian()
    x = np.zeros((2, 4, 3))
    calls = {
        "score_maps": lambda: model.score_maps(x),
        "anomaly_maps": lambda: model.anomaly_maps(x, 8),
        "covariances_": lambda: model.covariances_,
        "save": lambda: model.save(tmp_path / "patch.safetensors"),
    }
    for name, call in calls.items():
        with pytest.raises(NotFittedError, match="PatchGaussian"):
            call()
        assert not (tmp_path / "patch.safetensors").exists(), name
    for name in ("means_", "precisions_", "covariances_", "moments_", "grid_", "layout_"):
        assert not hasattr(model, name)


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), "4", True])
def test_invalid_sigma_is_rejected_at_fit_by_name(sigma):
    x = patches(np.random.default_rng(1), 10, 4, 3)
    model = PatchGaussian(sigma=sigma)  # no validation in __init__
    with pytest.raises(ValueError, match="sigma"):
        model.fit(x)
    with pytest.raises(ValueError, match="sigma"):
        PatchGaussian(sigma=sigma).fit_moments(BatchMoments.from_array(x))
    fitted = PatchGaussian().fit(x)
    with pytest.raises(ValueError, match="sigma"):
        fitted.set_params(sigma=sigma).anomaly_maps(x, 8)


def test_sigma_zero_does_not_smooth():
    rng = np.random.default_rng(2)
    x = patches(rng, 30, 9, 4)
    model = PatchGaussian(sigma=0).fit(x)
    scores, maps = model.anomaly_maps(x[:3], 6)
    np.testing.assert_allclose(maps, upsample_bilinear(model.score_maps(x[:3]), 6), rtol=1e-6)
    np.testing.assert_allclose(scores, maps.reshape(3, -1).max(axis=1), rtol=1e-6)


# --------------------------------------------------------------------- references
@pytest.mark.parametrize(
    ("n", "p", "d", "offset", "dtype"),
    [
        (60, 9, 5, 0.0, np.float64),
        (12, 16, 20, 0.0, np.float64),
        (80, 4, 6, 1e3, np.float32),
        (25, 1, 1, 0.0, np.float64),
    ],
    ids=["n>d", "n<d", "offset1e3-float32", "one-feature"],
)
def test_matches_sklearn_ledoit_wolf_per_position(n, p, d, offset, dtype):
    rng = np.random.default_rng(3)
    x = patches(rng, n, p, d, offset).astype(dtype)
    model = PatchGaussian().fit(x)
    assert model.grid_**2 == p and model.n_samples_ == n
    covariances = model.covariances_
    for position in range(p):
        ref = LedoitWolf().fit(x[:, position].astype(np.float64))
        np.testing.assert_allclose(model.means_[position], ref.location_, rtol=1e-6)
        np.testing.assert_allclose(model.precisions_[position], ref.precision_, rtol=1e-6)
        np.testing.assert_allclose(covariances[position], ref.covariance_, rtol=1e-6)
        assert model.shrinkages_[position] == pytest.approx(ref.shrinkage_, rel=1e-6, abs=1e-9)


def test_score_maps_are_the_mahalanobis_distance_per_position():
    rng = np.random.default_rng(4)
    x = patches(rng, 50, 9, 4)
    test = patches(rng, 5, 9, 4)
    model = PatchGaussian().fit(x)
    maps = model.score_maps(test)
    assert maps.shape == (5, 3, 3)
    diff = test - model.means_
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", diff, model.precisions_, diff))
    np.testing.assert_allclose(maps.reshape(5, 9), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="expected"):
        model.score_maps(test[:, :4])


def test_incremental_fit_equals_full_fit():
    rng = np.random.default_rng(5)
    x = patches(rng, 40, 4, 3, offset=10.0)
    full = PatchGaussian().fit(x)
    incremental = PatchGaussian().partial_fit(x[:13]).partial_fit(x[13:30]).partial_fit(x[30:])
    merged = PatchGaussian().merge_moments(BatchMoments.from_array(x[:7]))
    merged.merge_moments(BatchMoments.from_array(x[7:]))
    for model in (incremental, merged):
        np.testing.assert_allclose(model.means_, full.means_, rtol=1e-10)
        np.testing.assert_allclose(model.precisions_, full.precisions_, rtol=1e-8)
        assert model.n_samples_ == 40


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((3, 4, 4), 8),
        ((2, 4, 4), 7),
        ((2, 28, 28), 224),
        ((1, 9, 9), 4),
        ((2, 10, 10), 3),
        ((2, 5, 3), (11, 7)),
        ((1, 6, 10), (4, 3)),
        ((2, 3, 8), (9, 2)),
        ((1, 1, 1), 5),
        ((2, 5, 7), (5, 7)),
    ],
    ids=str,
)
def test_upsample_bilinear_matches_torch(shape, size):
    grids = np.random.default_rng(6).normal(size=shape)
    ours = upsample_bilinear(grids, size)
    hw = (size, size) if isinstance(size, int) else size
    ref = F.interpolate(
        torch.from_numpy(grids)[:, None], size=hw, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    assert ours.shape == ref.shape == (shape[0], *hw)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


def test_anomaly_maps_match_the_torch_pipeline():
    rng = np.random.default_rng(7)
    x = patches(rng, 40, 16, 5)
    test = patches(rng, 3, 16, 5)
    test[1, 6] += 8.0
    model = PatchGaussian(sigma=4.0).fit(x)
    scores, maps = model.anomaly_maps(test, 64)
    grids = torch.from_numpy(model.score_maps(test))[:, None]
    upsampled = F.interpolate(grids, size=(64, 64), mode="bilinear")[:, 0].numpy()
    ref = gaussian_filter(upsampled, sigma=(0.0, 4.0, 4.0))
    assert maps.dtype == np.float32 and maps.shape == (3, 64, 64)
    np.testing.assert_allclose(maps, ref.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(scores, ref.reshape(3, -1).max(axis=1), rtol=1e-12)
    assert scores.argmax() == 1


def test_default_smoothing_is_one_grid_cell_of_the_output(tmp_path):
    rng = np.random.default_rng(9)
    x, test = patches(rng, 40, 16, 5), patches(rng, 3, 16, 5)  # a 4 x 4 grid
    default = PatchGaussian().fit(x)
    for size in (32, 64):  # cells of 8 and 16 pixels
        cell = PatchGaussian(sigma=size / 4).fit(x)
        np.testing.assert_array_equal(
            default.anomaly_maps(test, size)[1], cell.anomaly_maps(test, size)[1]
        )
    assert not np.allclose(
        default.anomaly_maps(test, 64)[1], PatchGaussian(sigma=4.0).fit(x).anomaly_maps(test, 64)[1]
    )
    loaded = PatchGaussian.load(default.save(tmp_path / "patch.safetensors"))
    assert loaded.sigma is None


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    x = patches(rng, 30, 9, 4)
    test = patches(rng, 4, 9, 4)
    model = PatchGaussian(sigma=2.0).fit(x)
    path = model.save(tmp_path / "patch.safetensors", metadata={"category": "weave"})
    loaded = PatchGaussian.load(path)
    assert loaded.sigma == 2.0 and loaded.get_params() == model.get_params()
    assert loaded.metadata_ == {"category": "weave"}
    assert not hasattr(loaded, "layout_")
    np.testing.assert_array_equal(loaded.score_maps(test), model.score_maps(test))
    loaded_scores, loaded_maps = loaded.anomaly_maps(test, 24)
    scores, maps = model.anomaly_maps(test, 24)
    np.testing.assert_array_equal(loaded_scores, scores)
    np.testing.assert_array_equal(loaded_maps, maps)
    assert b"pickle" not in path.read_bytes()[:2000]


def test_load_ignores_the_layout_of_a_format_1_file(tmp_path):
    rng = np.random.default_rng(9)
    x = patches(rng, 20, 4, 3)
    model = PatchGaussian(sigma=3.0).fit(x)
    header, arrays = read_arrays(
        model.save(tmp_path / "new.safetensors"), "gaussian_ad_patch", 2, "patch-level model"
    )
    layout = {"levels": [3, 4], "grid": 2, "channels": [0, 1, 2]}
    old = write_arrays(
        tmp_path / "old.safetensors",
        arrays,
        "gaussian_ad_patch",
        {**header, "format_version": 1, "layout": layout},
    )
    loaded = PatchGaussian.load(old)
    np.testing.assert_array_equal(loaded.score_maps(x), model.score_maps(x))
    assert not hasattr(loaded, "layout_") and loaded.sigma == 3.0


def test_positions_must_form_a_square_grid():
    x = patches(np.random.default_rng(10), 10, 6, 3)
    with pytest.raises(ValueError, match="square grid"):
        PatchGaussian().fit(x)
    with pytest.raises(ValueError, match="at least 2 training images"):
        PatchGaussian().fit(x[:1, :4])


# ------------------------------------------------------------------- degenerate data
@pytest.mark.parametrize(
    "make",
    [
        lambda rng, shape: np.broadcast_to(rng.normal(size=shape[1:]), shape),
        lambda rng, shape: np.broadcast_to(rng.normal(size=shape[1:]) + 1e3, shape).astype(
            np.float32
        ),
        lambda rng, shape: np.zeros(shape),
    ],
    ids=["identical", "identical-offset-float32", "zeros"],
)
def test_identical_training_images_at_a_position_are_rejected(make):
    rng = np.random.default_rng(11)
    x = patches(rng, 10, 16, 4)
    x[:, [5, 11]] = make(rng, (10, 2, 4))  # positions 5 (row 1, col 1) and 11 (row 2, col 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError,
            match=r"training images are \(numerically\) identical at 2 of 16 grid positions, "
            r"the first at position 5 \(row 1, column 1",
        ):
            PatchGaussian().fit(x)
    parts = BatchMoments.from_array(x[:4]) + BatchMoments.from_array(x[4:])
    with pytest.raises(ValueError, match="identical at 2 of 16"):
        PatchGaussian().fit_moments(parts)


def test_near_identical_and_rank_one_positions_fit_and_rank():
    # Position 0: ten images that differ by 1e-6 of their magnitude; position 1: features
    # on a line (rank 1); positions 2-3: ordinary. All must fit, match sklearn, and rank.
    rng = np.random.default_rng(12)
    n, d = 10, 6
    x = patches(rng, n, 4, d)
    base = rng.normal(size=d) + 100.0
    scale = 1e-6 * np.linalg.norm(base) / np.sqrt(d)
    x[:, 0] = base + scale * rng.normal(size=(n, d))
    direction, centre = rng.normal(size=d), rng.normal(size=d)
    x[:, 1] = rng.normal(size=(n, 1)) * direction + centre
    model = PatchGaussian().fit(x)
    for position in (0, 1):
        ref = LedoitWolf().fit(x[:, position])
        np.testing.assert_allclose(model.precisions_[position], ref.precision_, rtol=1e-6)
    near, far = patches(rng, 20, 4, d), patches(rng, 20, 4, d)
    near[:, 0] = base + scale * rng.normal(size=(20, d))
    far[:, 0] = base + 100 * scale * rng.normal(size=(20, d))
    near[:, 1] = rng.uniform(-1, 1, size=(20, 1)) * direction + centre
    far[:, 1] = centre + 0.5 * rng.normal(size=(20, d))
    near_maps, far_maps = model.score_maps(near), model.score_maps(far)
    assert np.isfinite(near_maps).all() and np.isfinite(far_maps).all()
    for position in (0, 1):
        row, column = divmod(position, 2)
        assert near_maps[:, row, column].max() < far_maps[:, row, column].min()
    scores, maps = model.anomaly_maps(far, 16)
    assert np.isfinite(scores).all() and np.isfinite(maps).all()


def test_stats_core_imports_no_torch_prefect_or_mlflow():
    code = (
        "import importlib, pkgutil, sys\n"
        "import gaussian_ad.stats as stats\n"
        "for m in pkgutil.iter_modules(stats.__path__):\n"
        "    importlib.import_module('gaussian_ad.stats.' + m.name)\n"
        "heavy = ('torch', 'torchvision', 'timm', 'prefect', 'mlflow', 'dask', 'zarr')\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in heavy))\n"
        "print(sorted(k for k in sys.modules if k.startswith('gaussian_ad.')"
        " and not k.startswith('gaussian_ad.stats')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == ["[]", "[]"], out


def test_position_free_model_is_ledoit_wolf_on_every_patch():
    rng = np.random.default_rng(7)
    x = patches(rng, 12, 9, 4)
    model = PatchGaussian(pool_radius=None).fit(x)
    reference = LedoitWolf().fit(x.reshape(-1, 4))
    assert model.means_.shape == (1, 4) and model.precisions_.shape == (1, 4, 4)
    np.testing.assert_allclose(model.means_[0], reference.location_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.covariances_[0], reference.covariance_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.shrinkages_[0], reference.shrinkage_, rtol=1e-9)
    test = patches(rng, 3, 9, 4)
    expected = np.sqrt(reference.mahalanobis(test.reshape(-1, 4))).reshape(3, 3, 3)
    np.testing.assert_allclose(model.score_maps(test), expected, rtol=1e-8)
    assert model.n_samples_ == 12 and model.moments_.n_sets == 1  # it keeps the pooled sums


def test_neighbourhood_pooling_is_ledoit_wolf_on_the_window_with_edges_repeated():
    rng = np.random.default_rng(8)
    x = patches(rng, 10, 16, 3)  # a 4 x 4 grid
    model = PatchGaussian(pool_radius=1).fit(x)
    grid = x.reshape(10, 4, 4, 3)
    for row, column in [(1, 2), (0, 0), (3, 1)]:
        rows = np.clip(np.arange(row - 1, row + 2), 0, 3)
        columns = np.clip(np.arange(column - 1, column + 2), 0, 3)
        window = grid[:, rows][:, :, columns].reshape(-1, 3)  # edge positions repeat
        reference = LedoitWolf().fit(window)
        position = row * 4 + column
        np.testing.assert_allclose(model.means_[position], reference.location_, rtol=1e-9)
        np.testing.assert_allclose(
            model.covariances_[position], reference.covariance_, rtol=1e-8, atol=1e-12
        )
    assert pool_positions(model.moments_, 0) is model.moments_


def test_pooled_leave_fold_out_model_equals_a_fit_on_the_other_folds():
    rng = np.random.default_rng(9)
    x = patches(rng, 20, 9, 3)
    total = BatchMoments.from_array(x)
    held = BatchMoments.from_array(x[:5], total.shift)
    for radius in (None, 1):
        subtracted = PatchGaussian(pool_radius=radius).fit_moments(total - held)
        direct = PatchGaussian(pool_radius=radius).fit(x[5:])
        np.testing.assert_allclose(subtracted.precisions_, direct.precisions_, rtol=1e-9)
        np.testing.assert_allclose(subtracted.means_, direct.means_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("radius", [-1, 1.5, True, "all"])
def test_invalid_pool_radius_is_rejected_by_name(radius):
    with pytest.raises(ValueError, match="pool_radius"):
        PatchGaussian(pool_radius=radius).fit(patches(np.random.default_rng(1), 5, 4, 2))


def test_pool_radius_survives_save_and_load(tmp_path):
    x = patches(np.random.default_rng(2), 8, 4, 2)
    model = PatchGaussian(pool_radius=None).fit(x)
    loaded = PatchGaussian.load(model.save(tmp_path / "p.safetensors"))
    assert loaded.pool_radius is None
    np.testing.assert_array_equal(loaded.score_maps(x), model.score_maps(x))


def test_position_free_model_keeps_pooled_sums_that_merge_and_subtract_exactly(tmp_path):
    rng = np.random.default_rng(10)
    x = patches(rng, 30, 16, 3)  # a 4 x 4 grid
    test = patches(rng, 3, 16, 3)
    full = PatchGaussian(pool_radius=None).fit(x)
    merged = PatchGaussian(pool_radius=None).fit(x[:12]).partial_fit(x[12:20]).partial_fit(x[20:])
    assert merged.n_samples_ == 30 and merged.moments_.n_sets == 1 and merged.grid_ == 4
    np.testing.assert_allclose(merged.precisions_, full.precisions_, rtol=1e-9)
    np.testing.assert_allclose(merged.score_maps(test), full.score_maps(test), rtol=1e-9)
    # leave-fold-out from kept (pooled) sums, as the out-of-core fit does
    parts = [full.kept_moments(BatchMoments.from_array(x[i : i + 10])) for i in (0, 10, 20)]
    held_out = PatchGaussian(pool_radius=None).fit_moments(sum(parts) - parts[0], grid=4)
    direct = PatchGaussian(pool_radius=None).fit(x[10:])
    assert held_out.n_samples_ == 20
    np.testing.assert_allclose(held_out.precisions_, direct.precisions_, rtol=1e-9)
    np.testing.assert_allclose(held_out.score_maps(test), direct.score_maps(test), rtol=1e-9)
    # the file holds the pooled sums (1 set) and the grid
    loaded = PatchGaussian.load(full.save(tmp_path / "free.safetensors"))
    assert loaded.moments_.n_sets == 1 and loaded.grid_ == 4 and loaded.n_samples_ == 30
    np.testing.assert_array_equal(loaded.score_maps(test), full.score_maps(test))
    with pytest.raises(ValueError, match="positions"):
        merged.partial_fit(patches(rng, 5, 9, 3))  # another grid
    with pytest.raises(ValueError, match="grid is required|square|rows"):
        PatchGaussian(pool_radius=None).fit_moments(parts[0], grid=3)


def test_position_free_file_of_per_position_sums_still_loads(tmp_path):
    x = patches(np.random.default_rng(11), 8, 9, 2)
    model = PatchGaussian(pool_radius=None).fit(x)
    header = {"format_version": 2, "sigma": None, "pool_radius": None, "metadata": {}}
    path = tmp_path / "old.safetensors"  # as saved before: the per-position sums, no grid
    write_arrays(
        path, BatchMoments.from_array(x).to_arrays("moments."), "gaussian_ad_patch", header
    )
    loaded = PatchGaussian.load(path)
    assert loaded.grid_ == 3 and loaded.n_samples_ == 8
    np.testing.assert_allclose(loaded.score_maps(x), model.score_maps(x), rtol=1e-9)


@pytest.mark.parametrize(("n", "sigma"), [(64, 4.0), (44, 8.0), (7, 5.5), (5, 0.0), (1, 3.0)])
def test_gaussian_matrix_is_scipys_reflecting_filter(n, sigma):
    from scipy.ndimage import gaussian_filter1d

    signal = np.random.default_rng(12).normal(size=(3, n))
    expected = gaussian_filter1d(signal, sigma, axis=1, mode="reflect") if sigma else signal
    np.testing.assert_allclose(signal @ gaussian_matrix(n, sigma).T, expected, atol=1e-12)
