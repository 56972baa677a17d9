"""Patch-level Gaussian: exact streamed fit, persistence, pixel metrics, fusion."""

import numpy as np
import pytest
import torch
from scipy.linalg import pinvh
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from gaussian_ad.backbones.models import load_backbone
from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.images import load_masks, mvtec_manifest
from gaussian_ad.data.synthetic import CATEGORIES
from gaussian_ad.detection.detector import Detector, training_pass
from gaussian_ad.evaluation.evaluate import split_records
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.features.patches import patch_features
from gaussian_ad.stats.arrayfile import ModelFileError
from gaussian_ad.stats.fusion import Standardizer, fuse
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.metrics import auroc, pixel_auroc, pro_auc
from gaussian_ad.stats.moments import BatchMoments, Moments
from gaussian_ad.stats.patch_gaussian import PatchGaussian


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def offset_patches(n: int, positions: int = 16, dim: int = 6, seed: int = 0) -> np.ndarray:
    """(n, P, d) correlated data, a different covariance per position, offset by 1e3."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(positions, dim, dim)) / 3
    z = rng.normal(size=(n, positions, dim))
    return (np.einsum("npi,pij->npj", z, mixing) + 1e3).astype(np.float32)


@pytest.mark.parametrize("n", [5, 80])
def test_streamed_fit_equals_sklearn_per_position(n):
    x = offset_patches(n)
    rng = np.random.default_rng(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=3, replace=False))
    parts = [BatchMoments.from_array(chunk) for chunk in np.split(x, cuts)]
    rng.shuffle(parts)
    model = PatchGaussian().fit_moments(sum(parts))
    assert model.grid_ == 4 and model.n_samples_ == n
    covariances = model.covariances_
    for p in range(x.shape[1]):
        ref = LedoitWolf().fit(x[:, p].astype(np.float64))
        assert rel_err(model.means_[p], ref.location_) < 1e-6
        assert rel_err(covariances[p], ref.covariance_) < 1e-6
        assert rel_err(model.precisions_[p], ref.precision_) < 1e-6
        assert rel_err(model.precisions_[p], pinvh(covariances[p])) < 1e-9
        assert model.shrinkages_[p] == pytest.approx(ref.shrinkage_, rel=1e-6)
        # The batched sums are the per-set Moments.
        single = Moments.from_array(x[:, p].astype(np.float64))
        merged = sum(parts)[p]
        assert merged.centred_fourth_moment == pytest.approx(single.centred_fourth_moment, rel=1e-8)


def test_incremental_fit_equals_full_fit():
    x = offset_patches(50)
    full = PatchGaussian().fit(x)
    incremental = PatchGaussian().fit(x[:17]).partial_fit(x[17:31]).partial_fit(x[31:])
    assert incremental.n_samples_ == 50
    assert rel_err(incremental.means_, full.means_) < 1e-9
    assert rel_err(incremental.precisions_, full.precisions_) < 1e-9
    test = offset_patches(4, seed=1)
    assert rel_err(incremental.score_maps(test), full.score_maps(test)) < 1e-9


def test_save_load_reproduces_scores_and_maps_exactly(tmp_path):
    x = offset_patches(30)
    model = PatchGaussian(sigma=2.0).fit(x)
    # The layout belongs to the detector now; it travels as JSON metadata.
    layout = PatchLayout(levels=(3, 4), grid=4, channel_index=(0, 2, 3, 5, 7, 8))
    metadata = {"category": "weave", "layout": layout.to_dict()}
    path = model.save(tmp_path / "patch.safetensors", metadata=metadata)
    loaded = PatchGaussian.load(path)
    assert PatchLayout.from_dict(loaded.metadata_["layout"]) == layout and loaded.sigma == 2.0
    assert loaded.metadata_ == metadata
    test = offset_patches(3, seed=2) + np.float32(0.5)
    scores, maps = model.anomaly_maps(test, size=20)
    loaded_scores, loaded_maps = loaded.anomaly_maps(test, size=20)
    assert maps.shape == (3, 20, 20)
    assert np.array_equal(scores, loaded_scores) and np.array_equal(maps, loaded_maps)
    assert rel_err(maps.reshape(3, -1).max(axis=1), scores) < 1e-6  # the score is the maximum


def test_patch_features_resize_concatenate_and_select():
    big = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    small = torch.ones(2, 2, 2, 2)
    features = patch_features([big, small], grid=4, channel_index=np.array([1, 3, 4]))
    assert features.shape == (2, 16, 3) and features.dtype == np.float32
    assert np.array_equal(features[:, :, 0], big[:, 1].reshape(2, 16).numpy())
    assert np.all(features[:, :, 1:] == 1.0)


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 9, 7)) > 0.8
    maps = rng.normal(size=masks.shape) + masks
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    tied = np.round(maps, 1).astype(np.float32)  # many ties, the maps' dtype
    expected = roc_auc_score(masks.ravel(), tied.ravel())
    assert pixel_auroc(masks, tied) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="both normal and anomalous pixels"):
        pixel_auroc(np.zeros_like(masks), maps)


def brute_force_pro_auc(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """PRO by definition at every distinct threshold, then the same cut trapezoid."""
    from scipy.ndimage import label

    regions = []
    for i, mask in enumerate(masks):
        labels, count = label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labels == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0), (1.0, 1.0)]
    for t in np.unique(maps):
        above = maps >= t
        fpr = (above & ~masks).sum() / (~masks).sum()
        pro = np.mean([(above[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    points.sort()
    fprs, pros = np.array(points).T
    grid = np.linspace(0, max_fpr, 200001)
    return float(np.trapezoid(np.interp(grid, fprs, pros), grid) / max_fpr)


def test_pro_auc_matches_definition():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:11, 8:10] = True  # a second region in the same image
    masks[1, 5:9, 1:3] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1)  # rounding makes ties
    expected = brute_force_pro_auc(masks, maps, 0.3)
    assert pro_auc(masks, maps, 0.3) == pytest.approx(expected, abs=1e-6)
    assert pro_auc(masks, masks.astype(float) + 0.0, 0.3) == pytest.approx(1.0)


def test_standardizer_round_trip_and_fusion():
    standardizer = Standardizer.fit(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 50.0]))
    assert Standardizer.from_dict(standardizer.to_dict()) == standardizer
    fused = fuse(np.array([2.0, 4.0]), np.array([30.0, 70.0]), standardizer)
    assert fused == pytest.approx([0.0, 4.0])
    with pytest.raises(ValueError, match="no spread"):
        Standardizer.fit(np.ones(3), np.arange(3.0))


def test_patch_fit_streams_merges_and_skips_broken_images():
    backbone = load_backbone("lite0", levels=(3, 4, 5), device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(7)]
    layout = PatchLayout.for_backbone(backbone, grid=7, n_channels=20)
    passed = training_pass(backbone, images, LoaderOptions(batch_size=3), layout)
    whole = PatchGaussian().fit_moments(passed.patch_sums)
    assert passed.pooled[0].shape == (7, 24) and len(passed.index) == 7
    pairs = LoaderOptions(batch_size=2)
    first = training_pass(backbone, [*images[:4], b"not an image"], pairs, layout)
    assert first.index.tolist() == [0, 1, 2, 3] and len(first.errors) == 1
    more = training_pass(backbone, images[4:], pairs, layout)
    updated = PatchGaussian().fit_moments(first.patch_sums).merge_moments(more.patch_sums)
    assert updated.n_samples_ == 7
    assert rel_err(updated.precisions_, whole.precisions_) < 1e-9

    # The detector fits the same patch model (and layout) in its one pass, and scores with it.
    config = DetectorConfig(
        levels="3-5",
        patch=True,
        patch_grid=7,
        patch_channels=20,
        patch_pool_radius=0,
        input_size=224,
    )  # per position, at the native side, as the models above
    detector = Detector(config, LoaderOptions(device="cpu", batch_size=3)).fit(images)
    assert detector.patch_layout_ == layout
    assert rel_err(detector.patch_model_.precisions_, whole.precisions_) < 1e-9
    scored = detector.score([images[0], b"broken"], maps=True)
    assert scored.maps.shape == (1, 224, 224) and scored.index.tolist() == [0]
    assert len(scored.errors) == 1


# ------------------------------------------------------------------ synthetic end to end
@pytest.fixture(scope="module")
def synthetic_results(small_dataset):
    """Per category: image-level, patch-level and fused AUROCs, and pixel metrics.

    One backbone pass per image set gives both the pooled levels 1-9 (image level) and the
    patch features of levels 3-5.
    """
    config = DetectorConfig(backbone="lite0", patch=True, score="fused")
    results = {}
    for category in CATEGORIES:
        train, test = split_records(mvtec_manifest(small_dataset, category))
        detector = Detector(config, LoaderOptions(device="cpu"))
        detector.fit([r.path for r in train])  # calibrated on every image's out-of-fold scores
        scored = detector.score([r.path for r in test], maps=True)
        assert len(scored.index) == len(test) and not scored.errors

        image_test = scored.image_scores
        standardizer = detector.calibration_.standardizer
        fused = fuse(image_test, scored.patch_scores, standardizer)
        np.testing.assert_allclose(scored.scores, fused)

        labels = np.array([r.label for r in test])
        masks = load_masks([r.mask for r in test], config.image_size)
        results[category] = {
            "grid": detector.patch_model_.grid_,
            "image": auroc(labels, image_test),
            "patch": auroc(labels, scored.patch_scores),
            "fused": auroc(labels, fused),
            "pixel": pixel_auroc(masks, scored.maps),
            "pro": pro_auc(masks, scored.maps),
        }
    print(results)
    return results


def test_pixel_auroc_on_synthetic_data(synthetic_results):
    for category, result in synthetic_results.items():
        assert result["grid"] == DetectorConfig().image_size // 8  # stride-8 grid
        assert result["pixel"] >= 0.9, (category, result)


def test_fusion_does_not_lose_to_the_better_score(synthetic_results):
    for category, result in synthetic_results.items():
        assert result["fused"] >= max(result["image"], result["patch"]) - 0.01, (category, result)


def test_detector_with_patch_model_round_trips_scores_maps_and_threshold(small_dataset, tmp_path):
    from gaussian_ad.detection.detector import patch_path

    train, test = split_records(mvtec_manifest(small_dataset, "grain"))
    paths = [r.path for r in train]
    config = DetectorConfig("lite0", "7-9", patch=True, score="fused", patch_channels=40)
    detector = Detector(config).fit(paths[:15])
    # The fused score needs the standardiser of a calibration: none without one.
    uncalibrated = Detector(config).set_models(
        detector.model_, detector.patch_model_, detector.patch_layout_
    )
    early = uncalibrated.score([r.path for r in test[:2]])
    assert early.scores is None and early.is_anomaly is None and uncalibrated.threshold is None
    assert early.patch_scores.shape == (2,) and early.level_scores.shape == (2, 3)
    assert detector.calibration_.n_normals == 15  # out-of-fold scores of every image
    detector.calibrate(paths[15:], target_fpr=0.2)  # or explicitly on held-out normals
    assert detector.calibration_.n_normals == len(paths) - 15
    assert detector.backbone_levels == (3, 4, 5, 7, 8, 9)
    result = detector.score([r.path for r in test], maps=True)
    assert result.maps.shape == (len(test), config.image_size, config.image_size)
    assert result.level_scores.shape == (len(test), 3)
    standardizer = detector.calibration_.standardizer
    np.testing.assert_allclose(
        result.scores, fuse(result.image_scores, result.patch_scores, standardizer)
    )
    np.testing.assert_array_equal(result.is_anomaly, result.scores > detector.threshold)
    np.testing.assert_allclose(result.patch_scores, result.maps.reshape(len(test), -1).max(1))
    saved = detector.save(tmp_path / "det.safetensors")
    assert patch_path(saved).is_file()
    loaded = Detector.load(saved)
    assert loaded.config == detector.config and loaded.threshold == detector.threshold
    assert loaded.calibration_ == detector.calibration_
    assert loaded.patch_layout_ == detector.patch_layout_
    again = loaded.score([r.path for r in test], maps=True)
    np.testing.assert_allclose(again.scores, result.scores, rtol=1e-12)  # refitted from the sums
    np.testing.assert_allclose(again.maps, result.maps, rtol=1e-6)
    patch_path(saved).unlink()
    with pytest.raises(ModelFileError, match="its patch-level model .* is missing"):
        Detector.load(saved)


def test_detector_without_patch_model_refuses_maps_and_patch_scores():
    with pytest.raises(ValueError, match="patch=True"):
        Detector(DetectorConfig("lite0", score="fused", patch=False))
    with pytest.raises(ValueError, match="score: must be one of"):
        Detector(DetectorConfig("lite0", score="max"))
    detector = Detector(DetectorConfig("lite0", "9", patch=False))
    detector.set_models(GaussianAD().fit([np.random.default_rng(0).normal(size=(20, 1280))]))
    with pytest.raises(ValueError, match="patch-level model"):
        detector.score([np.zeros((32, 32, 3), np.uint8)], maps=True)


def test_a_model_that_flags_its_own_training_images_is_refused():
    features = np.random.default_rng(0).normal(size=(40, 4))
    folds = np.arange(40) % 5
    detector = Detector(DetectorConfig("lite0", "9", patch=False, score="image"))

    def fold_models(k):
        return GaussianAD().fit([features[folds != k]]), None

    def fold_scores(model, k):
        rows = np.flatnonzero(folds == k)
        return model.score_features([features[rows]], index=rows)

    detector.set_models(GaussianAD().fit([features + 10.0]))  # broken: fitted elsewhere
    with pytest.raises(ValueError, match="flags 8 of 8 of its own training images"):
        detector.calibrate_out_of_fold(fold_models, fold_scores, folds, 0.1)
    detector.set_models(GaussianAD().fit([features]))
    assert detector.calibrate_out_of_fold(fold_models, fold_scores, folds, 0.1).threshold > 0


def extracted_store(path, records, detector: Detector):
    """A feature store of ``records`` with ``detector``'s levels and patch layout, in shards
    of 10 rows."""
    from gaussian_ad.features.shards import create_store, extract_shard
    from gaussian_ad.store.feature_store import FeatureStore

    backbone = detector.backbone_module()
    store = create_store(
        str(path),
        records,
        backbone,
        levels=detector.config.image_levels,
        shard_size=10,
        patch_layout=detector.patch_layout_,
    )
    for shard in store.pending_shards():
        extract_shard(store, shard, backbone)
    return FeatureStore.open(store.url)


def test_a_store_fit_chooses_the_pooling_as_the_in_memory_fit(small_dataset, tmp_path):
    """A texture fills the frame, so the backbone's zero padding sets its border apart: both
    fits choose the per-position model (the store's from pooled sums, then its per-position
    sums in a second pass) and calibrate alike."""
    records = mvtec_manifest(small_dataset, "weave", splits=("train",))
    config = DetectorConfig("lite0", "8-9", patch_channels=20, input_size=160)
    detector = Detector(config).fit([r.path for r in records], target_fpr=0.1)
    store = extracted_store(tmp_path / "s.zarr", records, detector)
    out_of_core = Detector(config).fit_store(store, target_fpr=0.1)
    assert detector.pool_choice_.radius == 0 and out_of_core.pool_choice_ == detector.pool_choice_
    assert out_of_core.patch_model_.means_.shape == detector.patch_model_.means_.shape
    np.testing.assert_allclose(
        out_of_core.oof_scores_.patch_scores, detector.oof_scores_.patch_scores, rtol=1e-4
    )
    assert out_of_core.threshold == pytest.approx(detector.threshold, rel=1e-4)


def test_out_of_fold_scores_equal_models_fitted_without_each_fold(small_dataset, tmp_path):
    """Cross-fitting by subtraction, in memory and out-of-core, against direct refits."""
    from gaussian_ad.store.plan import fold_ids

    records = mvtec_manifest(small_dataset, "disc", splits=("train",))
    paths = [r.path for r in records]
    config = DetectorConfig("lite0", "8-9", patch=True, score="fused", patch_channels=20)
    detector = Detector(config).fit(paths, target_fpr=0.1)
    folds = fold_ids(paths, seed=config.seed)
    store = extracted_store(tmp_path / "s.zarr", records, detector)
    out_of_core = Detector(config).fit_store(store, target_fpr=0.1)
    for k in range(5):
        rows = np.flatnonzero(folds == k)
        direct = Detector(config).fit([paths[i] for i in np.flatnonzero(folds != k)])
        scored = direct.score([paths[i] for i in rows])
        oof = detector.oof_scores_.take(rows)
        np.testing.assert_allclose(oof.level_scores, scored.level_scores, rtol=1e-9)
        np.testing.assert_allclose(oof.patch_scores, scored.patch_scores, rtol=1e-6)
        stored = out_of_core.oof_scores_.take(rows)
        np.testing.assert_allclose(stored.level_scores, scored.level_scores, rtol=1e-4)
        np.testing.assert_allclose(stored.patch_scores, scored.patch_scores, rtol=1e-4)
    assert out_of_core.pool_choice_ == detector.pool_choice_  # pooling chosen the same way
    assert detector.calibration_.n_normals == out_of_core.calibration_.n_normals == len(paths)
    assert out_of_core.threshold == pytest.approx(detector.threshold, rel=1e-4)


def test_position_free_patch_model_at_a_larger_input_size(small_dataset, tmp_path):
    """input_size resizes to a larger square (finer grid, maps at that size); pool_radius=None
    fits one Gaussian on every training patch, calibrated out of fold, and survives save/load."""
    train, test = split_records(mvtec_manifest(small_dataset, "weave"))
    config = DetectorConfig(
        "lite0",
        "8-9",
        patch=True,
        score="fused",
        patch_channels=24,
        patch_pool_radius=None,
        input_size=256,
    )
    detector = Detector(config).fit([r.path for r in train], target_fpr=0.1)
    assert detector.backbone_module().spec.image_size == 256
    assert detector.patch_layout_.grid == 32  # 256 / 8
    assert detector.patch_model_.means_.shape == (1, 24)
    assert detector.patch_model_.moments_.n_sets == 1  # it keeps the pooled sums only
    assert detector.patch_model_.grid_ == 32
    result = detector.score([r.path for r in test], maps=True)
    assert result.maps.shape == (len(test), 256, 256)
    labels = np.array([r.label for r in test])[result.index]
    assert auroc(labels, result.patch_scores) > 0.8
    loaded = Detector.load(detector.save(tmp_path / "free.safetensors"))
    assert loaded.config == config and loaded.patch_model_.pool_radius is None
    again = loaded.score([r.path for r in test[:3]], maps=True)
    np.testing.assert_allclose(again.scores, result.scores[:3], rtol=1e-10)
    with pytest.raises(ValueError, match="pools radius"):
        Detector(config.replace(patch_pool_radius=0)).set_models(
            detector.model_, detector.patch_model_, detector.patch_layout_
        )


def test_standardised_levels_use_the_out_of_fold_normals_scale(small_dataset, tmp_path):
    """standardize_levels: the image score sums each level's z-score on the out-of-fold
    normal scores; it ranks, thresholds, fuses and survives save/load; without it the
    image score is the paper's sum."""
    train, test = split_records(mvtec_manifest(small_dataset, "disc"))
    config = DetectorConfig("lite0", "7-9", patch=True, score="fused", standardize_levels=True)
    detector = Detector(config).fit([r.path for r in train], target_fpr=0.1)
    oof = detector.oof_scores_.level_scores
    mean, std = oof.mean(axis=0), oof.std(axis=0, ddof=1)
    result = detector.score([r.path for r in test])
    expected = ((result.level_scores - mean) / std).sum(axis=1)
    np.testing.assert_allclose(result.image_scores, expected, rtol=1e-12)
    standardizer = detector.calibration_.standardizer
    np.testing.assert_allclose(result.scores, fuse(expected, result.patch_scores, standardizer))
    held = ((oof - mean) / std).sum(axis=1)
    assert standardizer.image_mean == pytest.approx(held.mean(), abs=1e-9)
    image_only = Detector(config.replace(score="image")).set_models(
        detector.model_, detector.patch_model_, detector.patch_layout_
    )
    image_only.calibrate_scores(detector.oof_scores_, target_fpr=0.1)
    assert image_only.threshold == pytest.approx(np.quantile(held, 0.9))
    np.testing.assert_allclose(image_only.score([r.path for r in test]).scores, expected)
    loaded = Detector.load(detector.save(tmp_path / "std.safetensors"))
    assert loaded.config.standardize_levels
    np.testing.assert_allclose(loaded.score([r.path for r in test]).scores, result.scores)
    paper = Detector(config.replace(score="image", standardize_levels=False)).set_models(
        detector.model_, detector.patch_model_, detector.patch_layout_
    )
    paper.calibrate_scores(detector.oof_scores_, target_fpr=0.1)
    plain = paper.score([r.path for r in test])
    np.testing.assert_allclose(plain.scores, plain.level_scores.sum(axis=1))
    # Scores decided by one detector and then another carry the second one's image score,
    # and a calibration from decided scores uses their level distances.
    np.testing.assert_allclose(detector.decide(plain).image_scores, expected, rtol=1e-12)
    np.testing.assert_allclose(paper.decide(plain).scores, plain.level_scores.sum(axis=1))
    decided = detector.decide(detector.oof_scores_.take(np.arange(len(oof))))
    paper.calibrate_scores(decided, target_fpr=0.1)
    assert paper.threshold == pytest.approx(np.quantile(oof.sum(axis=1), 0.9))


def test_the_default_score_is_fused_with_the_patch_model_and_image_without():
    assert (DetectorConfig().score, DetectorConfig(patch=False).score) == ("fused", "image")
    assert DetectorConfig(score="image").score == "image"
    with pytest.raises(ValueError, match="score: 'fused' needs the patch-level model"):
        DetectorConfig().replace(patch=False)  # resolved: it names its score from then on


def test_configurations_saved_before_an_option_keep_their_old_behaviour():
    from gaussian_ad.detection.detector import saved_config

    old = {"backbone": "lite0", "levels": [1, 2, 3], "input_size": None}  # before both options
    config = DetectorConfig.from_dict(saved_config(old))
    assert (config.input_size, config.standardize_levels, config.score) == (224, False, "image")
    new = DetectorConfig(levels="1-3").to_dict()
    assert DetectorConfig.from_dict(saved_config(new)) == DetectorConfig(levels="1-3")
    assert (new["input_size"], new["standardize_levels"], new["score"]) == (352, True, "fused")
    b4 = DetectorConfig.from_dict(saved_config({"backbone": "b4", "input_size": None}))
    assert b4.input_size is None and b4.image_size == 380  # no default side: native, as before
