"""Pixel metrics at the ground truth's resolution, against sklearn and a direct computation."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from gaussian_ad.evaluation.evaluate import pixel_metrics
from gaussian_ad.stats.metrics import pro_auc
from gaussian_ad.stats.patch_gaussian import upsample_bilinear


def write_mask(path, mask: np.ndarray) -> str:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return str(path)


def test_pixel_metrics_are_taken_at_the_masks_resolution(tmp_path):
    rng = np.random.default_rng(0)
    height, width = 30, 45  # not square: the maps are stretched back to the image's shape
    maps = rng.random((3, 16, 16)).astype(np.float32)
    maps[1, 4:8, 6:10] += 2.0
    mask = np.zeros((height, width), bool)
    mask[8:15, 17:28] = True
    paths = [None, write_mask(tmp_path / "m.png", mask), None]
    pixel, pro, (fpr, curve) = pixel_metrics(maps, paths)
    truth = np.stack([np.zeros_like(mask), mask, np.zeros_like(mask)])
    resized = upsample_bilinear(maps, (height, width)).astype(np.float32)
    assert pixel == pytest.approx(roc_auc_score(truth.ravel(), resized.ravel()), abs=1e-12)
    assert pro == pytest.approx(pro_auc(truth, resized), abs=1e-12)
    assert pixel > 0.9 and fpr[0] == 0.0 and fpr[-1] == 1.0 and np.all(np.diff(curve) >= 0)


def test_pixel_metrics_cap_the_longer_side_and_resize_odd_masks(tmp_path):
    maps = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32)
    big = np.zeros((40, 80), bool)
    big[10:20, 30:50] = True
    odd = np.zeros((20, 20), bool)
    odd[5:10, 5:10] = True
    paths = [write_mask(tmp_path / "a.png", big), write_mask(tmp_path / "b.png", odd)]
    capped = pixel_metrics(maps, paths, max_side=40)
    small = np.asarray(Image.fromarray(big).resize((40, 20), Image.Resampling.NEAREST))
    other = np.asarray(Image.fromarray(odd).resize((40, 20), Image.Resampling.NEAREST))
    truth = np.stack([small, other])
    resized = upsample_bilinear(maps, (20, 40))
    assert capped[0] == pytest.approx(roc_auc_score(truth.ravel(), resized.ravel()), abs=1e-6)
