"""Mergeable statistics: exact against in-memory references for any chunking and order."""

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.moments import BatchMoments, Moments, ledoit_wolf, shrunk_precision


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def uneven_chunks(x: np.ndarray, n_chunks: int, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=n_chunks - 1, replace=False))
    return np.split(x, cuts)


@pytest.fixture
def offset_data() -> np.ndarray:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(20, 20)) / 4
    return (rng.normal(size=(500, 20)) @ mixing + 1e3).astype(np.float32)


@pytest.mark.parametrize("n_chunks", [1, 3, 50])
def test_chunking_and_merge_order_do_not_matter(offset_data, n_chunks):
    rng = np.random.default_rng(n_chunks)
    parts = [Moments.from_array(c) for c in uneven_chunks(offset_data, n_chunks, rng)]
    rng.shuffle(parts)
    merged = sum(parts)
    ref = LedoitWolf().fit(offset_data.astype(np.float64))
    covariance, shrinkage = ledoit_wolf(merged)
    assert merged.n == len(offset_data)
    assert rel_err(merged.mean, ref.location_) < 1e-6
    assert rel_err(covariance, ref.covariance_) < 1e-6
    assert shrinkage == pytest.approx(ref.shrinkage_, rel=1e-6)

    # Same model as the in-memory estimator, and pairwise merges in another tree shape.
    model = GaussianAD().fit_moments([merged])
    whole = GaussianAD().fit([offset_data])
    assert rel_err(model.precisions_[0], whole.precisions_[0]) < 1e-6
    tree = parts
    while len(tree) > 1:
        tree = [sum(tree[i : i + 2]) for i in range(0, len(tree), 2)]
    assert rel_err(tree[0].covariance, merged.covariance) < 1e-9


def test_fourth_moment_is_exact_with_foreign_shifts(offset_data):
    x = offset_data.astype(np.float64)
    expected = np.sum(np.sum((x - x.mean(0)) ** 2, axis=1) ** 2)
    # Shifts a few standard deviations off the mean: a row of the other chunk, and
    # one shifted by a further 3 in every dimension.
    a = Moments.from_array(x[:100], shift=x[-1] + 3.0)
    b = Moments.from_array(x[100:], shift=x[0])
    assert (a + b).centred_fourth_moment == pytest.approx(expected, rel=1e-8)
    assert (b + a).centred_fourth_moment == pytest.approx(expected, rel=1e-8)


def test_n_less_than_d_and_single_feature():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 30)) + 5
    merged = Moments.from_array(x[:3]) + Moments.from_array(x[3:])
    ref = LedoitWolf().fit(x)
    assert rel_err(ledoit_wolf(merged)[0], ref.covariance_) < 1e-6
    one = rng.normal(size=(40, 1))
    assert (
        rel_err(ledoit_wolf(Moments.from_array(one))[0], LedoitWolf().fit(one).covariance_) < 1e-9
    )


@pytest.mark.parametrize(("n", "d", "offset"), [(24, 300, 0.0), (48, 480, 50.0)])
def test_precision_from_the_rows_equals_the_inverse(n, d, offset):
    """Fewer rows than dimensions: the precision from the rows' thin SVD is the inverse of
    the Ledoit-Wolf covariance (scikit-learn's ``pinvh``), exactly symmetric, and a fit from
    the rows gives the model a fit from their statistics alone gives."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d)) + offset).astype(
        np.float32
    )
    covariance, shrinkage = ledoit_wolf(Moments.from_array(x))
    assert 0.0 < shrinkage < 1.0
    from_rows = shrunk_precision(covariance, shrinkage, x)
    assert np.array_equal(from_rows, from_rows.T)
    assert rel_err(from_rows, LedoitWolf().fit(x.astype(np.float64)).precision_) < 1e-9
    from_sums = GaussianAD().fit_moments([Moments.from_array(x)])
    assert rel_err(GaussianAD().fit([x]).precisions_[0], from_sums.precisions_[0]) < 1e-9


def test_precision_from_the_rows_falls_back_to_the_inverse():
    """As many rows as dimensions, or no shrinkage: the plain inverse."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 30))
    covariance, shrinkage = ledoit_wolf(Moments.from_array(x))
    np.testing.assert_array_equal(
        shrunk_precision(covariance, shrinkage, x), shrunk_precision(covariance)
    )
    thin = rng.normal(size=(5, 30))
    unshrunk = np.cov(thin.T, bias=True) + np.eye(30)
    np.testing.assert_array_equal(shrunk_precision(unshrunk, 0.0, thin), shrunk_precision(unshrunk))


def test_incremental_fit_equals_full_refit():
    rng = np.random.default_rng(2)
    old = [rng.normal(size=(120, 6)) + 3, rng.normal(size=(120, 11))]
    new = [rng.normal(size=(37, 6)) + 3.5, rng.normal(size=(37, 11))]
    incremental = GaussianAD().fit(old).partial_fit(new)
    full = GaussianAD().fit([np.vstack(pair) for pair in zip(old, new, strict=True)])
    probe = [rng.normal(size=(10, 6)), rng.normal(size=(10, 11))]
    assert incremental.n_samples_ == 157
    assert rel_err(incremental.level_scores(probe), full.level_scores(probe)) < 1e-9
    with pytest.raises(ValueError, match="reduction=None"):
        GaussianAD(reduction="npca").fit(old).partial_fit(new)


def test_merging_checks_dimensions_and_empty():
    a = Moments.from_array(np.ones((3, 4)))
    with pytest.raises(ValueError, match="dimension"):
        a + Moments.from_array(np.ones((3, 5)))
    assert (a + Moments.empty(4)).n == 3
    with pytest.raises(ValueError, match="no rows"):
        _ = Moments.empty(4).mean


def test_subtracting_a_fold_equals_the_statistics_of_the_other_folds():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(53, 7)) * 2.5 + 1e3  # a large common offset
    folds = rng.integers(0, 5, size=len(x))
    parts = [Moments.from_array(x[folds == k], shift=x[folds == k][-1]) for k in range(5)]
    total = sum(parts[::-1])
    for k in range(5):
        left_out = total - parts[k]
        covariance, shrinkage = ledoit_wolf(left_out)
        reference = LedoitWolf().fit(x[folds != k])
        assert left_out.n == int((folds != k).sum())
        np.testing.assert_allclose(left_out.mean, x[folds != k].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(covariance, reference.covariance_, rtol=1e-9, atol=1e-12)
        assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    with pytest.raises(ValueError, match="cannot remove"):
        parts[0] - total


def test_batch_moments_subtract_position_by_position():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6, 5)) + 50.0
    held = np.arange(40) % 4 == 0
    left_out = BatchMoments.from_array(x) - BatchMoments.from_array(x[held])
    reference = BatchMoments.from_array(x[~held])
    np.testing.assert_allclose(left_out.covariance, reference.covariance, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(left_out.ledoit_wolf()[0], reference.ledoit_wolf()[0], rtol=1e-9)
