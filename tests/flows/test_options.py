"""The training options' augmentation switches: validated, and reaching the extraction."""

from __future__ import annotations

import numpy as np
import pytest
from gaussian_ad_flows.options import TrainOptions
from gaussian_ad_tasks.extract import extract_shard_task
from pydantic import ValidationError

from gaussian_ad.backbones.models import load_backbone
from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.augment import AugmentConfig
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.features.shards import augmented_moments, create_plan_store
from gaussian_ad.store.feature_store import FeatureStore
from gaussian_ad.store.plan import TrainingPlan

NO_PHOTOMETRIC = AugmentConfig(photometric=False)


def test_augment_switches_validate_and_default_to_the_category():
    assert TrainOptions().augment is None
    options = TrainOptions(augment={"photometric": False, "max_degrees": 5.0})
    assert options.augment == AugmentConfig(photometric=False, max_degrees=5.0)
    with pytest.raises(ValidationError, match="blur"):
        TrainOptions(augment={"blur": False})
    with pytest.raises(ValidationError, match="flips"):
        TrainOptions(augment={"flips": "sometimes"})


def test_plan_keeps_the_chosen_augmentation_and_stores_it_apart(small_dataset, tmp_path):
    records = mvtec_manifest(small_dataset, "disc")
    config = DetectorConfig()
    default = TrainingPlan.from_manifest(records, 2)
    chosen = TrainingPlan.from_manifest(records, 2, NO_PHOTOMETRIC)
    assert default.augment is None and chosen.augment == NO_PHOTOMETRIC
    new = chosen.with_new_normals(str(small_dataset / "disc" / "train" / "good"), "disc")
    assert new.augment == NO_PHOTOMETRIC
    urls = {
        plan.store_url(tmp_path, "disc", "f" * 16, config)
        for plan in (default, chosen, TrainingPlan.from_manifest(records, 2, AugmentConfig()))
    }
    assert len(urls) == 3
    # Without augmented passes the transforms do not matter: the same store.
    plain = TrainingPlan.from_manifest(records, 0)
    unused = TrainingPlan.from_manifest(records, 0, NO_PHOTOMETRIC)
    assert plain.store_url(tmp_path, "disc", "f" * 16, config) == unused.store_url(
        tmp_path, "disc", "f" * 16, config
    )
    # Another input side extracts other features: another store.
    native = config.replace(input_size=224)
    assert plain.store_url(tmp_path, "disc", "f" * 16, native) != plain.store_url(
        tmp_path, "disc", "f" * 16, config
    )


def test_extraction_task_augments_with_the_plan_s_configuration(small_dataset, tmp_path):
    records = [r for r in mvtec_manifest(small_dataset, "disc") if r.split == "train"][:4]
    config = DetectorConfig(levels="7,9", patch=False)
    passes, loader = 2, LoaderOptions(device="cpu")
    backbone = load_backbone(
        "lite0", config.image_levels, device="cpu", image_size=config.image_size
    )
    plan = TrainingPlan(records, [], passes, augment=NO_PHOTOMETRIC)
    url = str(tmp_path / "aug.zarr")
    store = create_plan_store(url, plan, backbone, config, loader, shard_size=8)
    for shard in store.pending_shards():
        extract_shard_task.fn(url, shard, config, loader, plan.augment)
    features = FeatureStore.open(url).read_level(9)
    paths = [r.path for r in records]
    for augment, same in ((NO_PHOTOMETRIC, True), (AugmentConfig.for_category("disc"), False)):
        streamed = augmented_moments(backbone, paths, passes, augment, loader, config.seed)
        mean = streamed[config.image_levels.index(9)].mean
        assert np.allclose(features.mean(axis=0), mean, rtol=1e-4, atol=1e-5) == same


def test_cli_train_switches_augmentations_off_for_one_category_only(small_dataset):
    from typer.testing import CliRunner

    from gaussian_ad.cli import app

    result = CliRunner().invoke(app, ["train", str(small_dataset), "--no-flips"])
    assert result.exit_code == 2 and "exactly one --category" in result.output
