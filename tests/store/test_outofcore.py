"""Real extraction into a feature store: resume, augmentation, CLI, equality with in-memory."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from gaussian_ad.backbones.models import load_backbone
from gaussian_ad.cli import app
from gaussian_ad.config import DEFAULT_LOADER, DetectorConfig
from gaussian_ad.data.augment import AugmentConfig
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.detection.detector import Detector, training_pass
from gaussian_ad.features.extract import extract
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.features.shards import augmented_moments, create_store, extract_shard
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.patch_gaussian import PatchGaussian
from gaussian_ad.store.feature_store import FeatureStore
from gaussian_ad.store.outofcore import fit_store, patch_moments

LEVELS = (3, 6, 9)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("lite0", LEVELS, image_size=DetectorConfig().image_size)


@pytest.fixture(scope="module")
def train_records(small_dataset):
    return mvtec_manifest(small_dataset, "weave", splits=("train",))


def test_interrupted_extraction_resumes_and_matches_in_memory_fit(
    tmp_path, backbone, train_records
):
    url = str(tmp_path / "weave.zarr")
    store = create_store(url, train_records, backbone, shard_size=7)
    for shard in store.pending_shards()[:2]:  # "interrupted" after two shards
        extract_shard(store, shard, backbone)
    resumed = create_store(url, train_records, backbone, shard_size=7)
    assert resumed.complete_shards() == [0, 1]
    infos = [extract_shard(resumed, s, backbone) for s in range(resumed.n_shards)]
    assert [i["skipped"] for i in infos] == [True, True] + [False] * (resumed.n_shards - 2)
    assert resumed.valid().sum() == len(train_records)
    manifest = resumed.full_manifest()
    assert manifest["path"].is_unique and manifest["content_hash"].notna().all()

    model = fit_store(resumed)
    detector = Detector(DetectorConfig("lite0", LEVELS)).fit([r.path for r in train_records])
    for ours, reference in zip(model.precisions_, detector.model_.precisions_, strict=True):
        assert rel_err(ours, reference) < 1e-6


def test_augmented_passes_change_the_model_and_stream_identically(
    tmp_path, backbone, train_records
):
    records = train_records[:10]
    passes = 3
    store = create_store(str(tmp_path / "aug.zarr"), records, backbone, augment_passes=passes)
    for shard in store.pending_shards():
        extract_shard(store, shard, backbone, seed=7)
    augmented = fit_store(store)
    assert augmented.n_samples_ == passes * len(records)
    plain = GaussianAD().fit(extract(backbone, [r.path for r in records]).pooled)
    assert rel_err(augmented.means_[2], plain.means_[2]) > 1e-3

    streamed = augmented_moments(
        backbone,
        [r.path for r in records],
        passes,
        AugmentConfig.for_category("weave"),
        seed=7,
    )
    assert streamed[0].n == passes * len(records)
    direct = GaussianAD().fit_moments(streamed)
    for ours, reference in zip(direct.precisions_, augmented.precisions_, strict=True):
        assert rel_err(ours, reference) < 1e-5


def test_cli_extract_then_fit_store_equals_cli_fit(tmp_path, small_dataset):
    runner = CliRunner()
    store = str(tmp_path / "cli.zarr")
    common = ["--levels", "7,9"]
    result = runner.invoke(
        app,
        [
            "extract",
            str(small_dataset),
            "--category",
            "grain",
            "--store",
            store,
            "--shard-size",
            "9",
        ]
        + common,
    )
    assert result.exit_code == 0, result.output
    assert FeatureStore.open(store).pending_shards() == []
    out_store = tmp_path / "store-model.safetensors"
    result = runner.invoke(app, ["fit", "--store", store, "--out", str(out_store)])
    assert result.exit_code == 0, result.output
    out_memory = tmp_path / "memory-model.safetensors"
    result = runner.invoke(
        app,
        ["fit", str(small_dataset), "--category", "grain", "--out", str(out_memory)] + common,
    )
    assert result.exit_code == 0, result.output
    a, b = Detector.load(out_store), Detector.load(out_memory)
    assert a.config == b.config and a.config.image_levels == (7, 9)
    # Both fit every image and calibrate on the same out-of-fold scores.
    feature_store = FeatureStore.open(store)
    assert a.model_.n_samples_ == b.model_.n_samples_ == feature_store.n_rows
    assert a.threshold == pytest.approx(b.threshold, rel=1e-6)
    assert a.calibration_.n_normals == b.calibration_.n_normals == feature_store.n_rows
    whole = GaussianAD().fit([feature_store.read_level(level) for level in feature_store.levels])
    for ours, memory, reference in zip(
        a.model_.precisions_, b.model_.precisions_, whole.precisions_, strict=True
    ):
        assert rel_err(ours, reference) < 1e-6 and rel_err(memory, reference) < 1e-6


def test_extraction_with_a_patch_layout_matches_in_memory_patch_fit(tmp_path, train_records):
    backbone = load_backbone("lite0", (3, 4, 5, 9))
    layout = PatchLayout.for_backbone(backbone, n_channels=20, seed=1)
    url = str(tmp_path / "patch.zarr")
    store = create_store(url, train_records, backbone, shard_size=9, patch_layout=layout)
    assert store.levels == [3, 4, 5, 9] and store.patch_layout == layout.to_dict()
    for shard in store.pending_shards():
        extract_shard(store, shard, backbone)
    assert PatchLayout.from_dict(store.patch_layout) == layout
    model = PatchGaussian().fit_moments(patch_moments(store))
    paths = [r.path for r in train_records]
    in_memory = training_pass(backbone, paths, DEFAULT_LOADER, layout)
    reference = PatchGaussian().fit_moments(in_memory.patch_sums)
    assert rel_err(model.means_, reference.means_) < 1e-5
    assert rel_err(model.precisions_, reference.precisions_) < 1e-4
    np.testing.assert_allclose(store.read_level(9), in_memory.pooled[3], rtol=1e-5, atol=1e-5)


def test_a_store_of_another_input_side_is_refused(tmp_path, train_records):
    native = load_backbone("lite0", LEVELS)  # 224 px, the default detector uses 352
    store = create_store(str(tmp_path / "native.zarr"), train_records[:6], native, shard_size=6)
    extract_shard(store, 0, native)
    with pytest.raises(ValueError, match="extracted at 224 px, the detector uses 352 px"):
        Detector(DetectorConfig("lite0", LEVELS, patch=False)).fit_store(
            FeatureStore.open(store.url)
        )
    fitted = Detector(DetectorConfig("lite0", LEVELS, input_size=224, patch=False)).fit_store(
        FeatureStore.open(store.url)
    )
    assert fitted.model_.n_samples_ == 6
