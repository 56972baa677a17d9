"""Feature store and the out-of-core Dask fit, on generated feature arrays."""

import numpy as np
import pytest
from distributed import Client, LocalCluster
from sklearn.covariance import LedoitWolf

from gaussian_ad.data.images import ImageError, ImageRecord
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.patch_gaussian import PatchGaussian
from gaussian_ad.store.feature_store import FeatureStore
from gaussian_ad.store.outofcore import fit_store, patch_moments


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def make_store(path, n: int, dims: list[int], shard_size: int) -> tuple[FeatureStore, list]:
    records = [ImageRecord(path=f"img{i:04d}.png", split="train", label=0) for i in range(n)]
    return FeatureStore.create(
        str(path), records, list(range(1, len(dims) + 1)), dims, shard_size=shard_size
    ), records


def write_all(store: FeatureStore, levels: list[np.ndarray], shards=None) -> None:
    for s in range(store.n_shards) if shards is None else shards:
        rows = store.shard_rows(s)
        n = rows.stop - rows.start
        store.write_shard(s, [x[rows] for x in levels], np.ones(n, bool), ["h"] * n)


@pytest.fixture
def features() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(24, 24)) / 5
    return [
        (rng.normal(size=(300, 24)) @ mix + 1e3).astype(np.float32),
        rng.normal(size=(300, 40)).astype(np.float32),  # n_shard < d per chunk
    ]


@pytest.mark.parametrize("shard_size", [300, 7, 64])
def test_dask_fit_equals_in_memory_fit(tmp_path, features, shard_size):
    store, _ = make_store(tmp_path / "s.zarr", 300, [24, 40], shard_size)
    write_all(store, features)
    model = fit_store(FeatureStore.open(str(tmp_path / "s.zarr")))
    whole = GaussianAD().fit(features)
    for level, x in enumerate(features):
        ref = LedoitWolf().fit(x.astype(np.float64))
        assert rel_err(model.means_[level], ref.location_) < 1e-6
        assert rel_err(model.precisions_[level], ref.precision_) < 1e-6
        assert rel_err(model.precisions_[level], whole.precisions_[level]) < 1e-6
        assert model.shrinkages_[level] == pytest.approx(ref.shrinkage_, rel=1e-6)


@pytest.mark.parametrize("reduction", ["pca", "npca"])
def test_dask_fit_with_reduction_equals_in_memory(tmp_path, features, reduction):
    store, _ = make_store(tmp_path / "s.zarr", 300, [24, 40], 50)
    write_all(store, features)
    model = fit_store(store, reduction, 0.9)
    whole = GaussianAD(reduction=reduction, variance_threshold=0.9).fit(features)
    probe = [f[:20] + 0.5 for f in features]
    for ours, ref in zip(model.components_, whole.components_, strict=True):
        assert ours.shape == ref.shape
    assert rel_err(model.level_scores(probe), whole.level_scores(probe)) < 1e-6


def test_runs_on_a_local_cluster(tmp_path, features):
    store, _ = make_store(tmp_path / "s.zarr", 300, [24, 40], 40)
    write_all(store, features)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        model = fit_store(store)
    whole = GaussianAD().fit(features)
    assert rel_err(model.precisions_[1], whole.precisions_[1]) < 1e-6


def test_interrupted_store_resumes_with_each_row_once(tmp_path, features):
    url = str(tmp_path / "s.zarr")
    store, records = make_store(url, 300, [24, 40], 64)
    write_all(store, features, shards=[0, 1])
    # A shard whose data was written but whose marker was not (killed mid-write).
    rows = store.shard_rows(2)
    store.array(1)[rows] = features[0][rows]
    reopened = FeatureStore.create(url, records, [1, 2], [24, 40], shard_size=64)
    assert reopened.complete_shards() == [0, 1]
    assert reopened.pending_shards() == [2, 3, 4]
    with pytest.raises(ValueError, match="not extracted yet"):
        fit_store(reopened)
    write_all(reopened, features, shards=reopened.pending_shards())
    write_all(reopened, features, shards=[3])  # a duplicate write leaves one copy
    assert reopened.valid().sum() == 300
    np.testing.assert_array_equal(reopened.read_level(1), features[0])
    with pytest.raises(ValueError, match="other rows"):
        FeatureStore.create(url, records[:10], [1, 2], [24, 40], shard_size=64)


def test_invalid_rows_are_excluded_and_errors_kept(tmp_path, features):
    store, _ = make_store(tmp_path / "s.zarr", 300, [24, 40], 100)
    for s in range(3):
        rows = store.shard_rows(s)
        valid = np.ones(100, bool)
        errors = []
        if s == 1:
            valid[5] = False
            errors = [ImageError("img0105.png", "truncated")]
        store.write_shard(
            s,
            [np.where(valid[:, None], x[rows], np.nan) for x in features],
            valid,
            ["h"] * 100,
            errors,
        )
    model = fit_store(store)
    keep = np.ones(300, bool)
    keep[105] = False
    whole = GaussianAD().fit([x[keep] for x in features])
    assert model.n_samples_ == 299
    assert rel_err(model.precisions_[0], whole.precisions_[0]) < 1e-6
    assert store.errors() == [ImageError("img0105.png", "truncated")]
    assert store.full_manifest()["content_hash"].notna().all()


def test_patch_fit_from_the_store_equals_per_position_ledoit_wolf(tmp_path):
    rng = np.random.default_rng(3)
    n, grid, dim = 90, 3, 5
    mixing = rng.normal(size=(grid * grid, dim, dim)) / 3
    patches = np.einsum("npi,pij->npj", rng.normal(size=(n, grid * grid, dim)), mixing) + 1e3
    patches = patches.astype(np.float32)
    pooled = [rng.normal(size=(n, 4)).astype(np.float32)]
    records = [ImageRecord(path=f"img{i:03d}.png", split="train", label=0) for i in range(n)]
    layout = {"levels": [3, 4, 5], "grid": grid, "channels": list(range(dim))}
    store = FeatureStore.create(
        str(tmp_path / "p.zarr"), records, [1], [4], shard_size=16, patch_layout=layout
    )
    valid = np.ones(n, bool)
    valid[[5, 40]] = False  # undecodable rows are left out of the fit
    selected = np.ones(n, bool)
    selected[60:] = False  # and so are the rows outside the fit fold
    for s in range(store.n_shards):
        rows = store.shard_rows(s)
        k = rows.stop - rows.start
        store.write_shard(s, [pooled[0][rows]], valid[rows], ["h"] * k, patches=patches[rows])
    reopened = FeatureStore.open(store.url)
    assert reopened.patch_layout == layout
    np.testing.assert_array_equal(reopened.read_patches(np.array([7, 2])), patches[[7, 2]])
    moments = patch_moments(reopened, selected)
    keep = valid & selected
    assert moments.n == keep.sum()
    model = PatchGaussian().fit_moments(moments)
    covariances = model.covariances_
    for p in range(grid * grid):
        ref = LedoitWolf().fit(patches[keep, p].astype(np.float64))
        assert rel_err(model.means_[p], ref.location_) < 1e-6
        assert rel_err(covariances[p], ref.covariance_) < 1e-6
        assert rel_err(model.precisions_[p], ref.precision_) < 1e-6
    with pytest.raises(ValueError, match="patch features must be given"):
        reopened.write_shard(0, [pooled[0][:16]], valid[:16], ["h"] * 16)
    with pytest.raises(ValueError, match="patch layout"):
        FeatureStore.create(store.url, records, [1], [4], shard_size=16)
