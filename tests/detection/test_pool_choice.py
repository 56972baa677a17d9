"""patch_pool_radius="auto": the pooling chosen from where the normals' out-of-fold maps peak."""

import numpy as np
import pytest

from gaussian_ad.config import DetectorConfig
from gaussian_ad.detection.detector import Detector, TrainingPass
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.stats.estimator import NotFittedError
from gaussian_ad.stats.moments import BatchMoments
from gaussian_ad.stats.pooling import BORDER_PEAK_LIMIT, PoolChoice, peaks_on_border

GRID, DIM, N = 12, 4, 40
CONFIG = DetectorConfig(levels="8-9", input_size=96)  # the defaults: fused, pooling "auto"


def border_mask(grid: int = GRID) -> np.ndarray:
    ring = np.zeros((grid, grid), dtype=bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    return ring.ravel()


def framed_patches(seed: int = 0) -> np.ndarray:
    """Every image shows the same frame: its border cells differ from the inner ones (one
    direction for the top and bottom rows, another for the sides), and only there."""
    patches = np.random.default_rng(seed).normal(size=(N, GRID * GRID, DIM))
    rows, columns = np.divmod(np.arange(GRID * GRID), GRID)
    patches[:, (rows == 0) | (rows == GRID - 1), 0] += 6.0
    patches[:, (columns == 0) | (columns == GRID - 1), 1] += 6.0
    return patches.astype(np.float32)


def shifted_object_patches(seed: int = 0) -> np.ndarray:
    """A 2 x 2-cell part on a plain background, at another inner place in every image."""
    rng = np.random.default_rng(seed)
    patches = rng.normal(size=(N, GRID, GRID, DIM))
    for image, (row, column) in enumerate(rng.integers(2, GRID - 3, size=(N, 2))):
        patches[image, row : row + 2, column : column + 2, 2] += 6.0
    return patches.reshape(N, GRID * GRID, DIM).astype(np.float32)


def fit_on(patches: np.ndarray, config: DetectorConfig = CONFIG) -> Detector:
    rng = np.random.default_rng(1)
    pooled = [rng.normal(size=(N, 3)).astype(np.float32) for _ in config.image_levels]
    passed = TrainingPass(
        pooled,
        config.image_levels,
        np.arange(N),
        patches,
        BatchMoments.from_array(patches),
        [],
    )
    layout = PatchLayout((3, 4, 5), GRID, tuple(range(DIM)))
    keys = [f"good/{i:03d}.png" for i in range(N)]
    return Detector(config).fit_pass(passed, keys, layout, None, target_fpr=0.1)


def test_peaks_on_border_finds_the_outermost_ring():
    maps = np.zeros((GRID * GRID, GRID, GRID))
    maps.reshape(GRID * GRID, -1)[np.arange(GRID * GRID), np.arange(GRID * GRID)] = 1.0
    np.testing.assert_array_equal(peaks_on_border(maps), border_mask())


@pytest.mark.parametrize(
    ("on_border", "radius"),
    [([1, 1, 0], 0), ([1, 0], None), ([0, 0, 0], None), ([1, 1, 1, 1], 0)],
)
def test_more_than_half_on_the_border_chooses_the_per_position_model(on_border, radius):
    choice = PoolChoice.from_peaks(np.array(on_border, dtype=bool), grid=GRID)
    assert choice.radius == radius
    assert choice.border_peak_share == pytest.approx(np.mean(on_border))
    assert (choice.border_peak_share > BORDER_PEAK_LIMIT) == (radius == 0)
    assert PoolChoice.from_dict(choice.to_dict()) == choice


def test_a_grid_without_inner_cells_keeps_the_position_free_model():
    choice = PoolChoice.from_peaks(np.ones(5, dtype=bool), grid=2)
    assert choice.radius is None and np.isnan(choice.border_peak_share)
    assert choice.to_dict()["border_peak_share"] is None  # JSON has no NaN
    assert np.isnan(PoolChoice.from_dict(choice.to_dict()).border_peak_share)


def test_a_frame_that_is_normal_only_at_the_border_chooses_per_position_maps(tmp_path):
    detector = fit_on(framed_patches())
    assert detector.pool_choice_.radius == 0 and detector.pool_choice_.n_images == N
    assert detector.pool_choice_.border_peak_share > 0.75
    assert detector.patch_model_.pool_radius == 0 and detector.pool_radius == 0
    assert detector.patch_model_.means_.shape == (GRID * GRID, DIM)  # one per position
    share = f"{detector.pool_choice_.border_peak_share:.0%}"
    assert detector.describe().endswith(
        f"per-position maps (auto: {share} of the good images peak on the border)"
    )
    # The chosen model is one of the two kinds, and the file keeps the evidence
    loaded = Detector.load(detector.save(tmp_path / "framed.safetensors"))
    assert loaded.config.patch_pool_radius == "auto"
    assert loaded.pool_choice_ == detector.pool_choice_
    assert loaded.patch_model_.pool_radius == 0
    fresh = framed_patches(seed=5)
    np.testing.assert_allclose(
        loaded.patch_model_.score_maps(fresh), detector.patch_model_.score_maps(fresh)
    )


def test_a_part_that_moves_chooses_position_free_maps():
    detector = fit_on(shifted_object_patches())
    assert detector.pool_choice_.radius is None
    assert detector.pool_choice_.border_peak_share < 0.2
    assert detector.patch_model_.means_.shape == (1, DIM)
    assert "position-free maps (auto: " in detector.describe()


@pytest.mark.parametrize(
    ("patches", "radius"), [(framed_patches, 0), (shifted_object_patches, None)]
)
def test_the_chosen_model_is_the_one_fitted_with_that_pooling(patches, radius):
    """Auto is a choice between the two existing models, nothing else: its calibration and
    scores equal those of the configuration that names the chosen pooling (position-free:
    with the choice's fold models and patch scores reused)."""
    patches = patches()
    auto, named = fit_on(patches), fit_on(patches, CONFIG.replace(patch_pool_radius=radius))
    assert named.pool_choice_ is None and auto.pool_radius == radius
    assert auto.threshold == pytest.approx(named.threshold, rel=1e-12)
    np.testing.assert_allclose(auto.oof_scores_.patch_scores, named.oof_scores_.patch_scores)
    np.testing.assert_allclose(auto.oof_scores_.level_scores, named.oof_scores_.level_scores)


def test_a_named_pooling_is_not_chosen_and_auto_needs_a_fit():
    detector = fit_on(framed_patches(), CONFIG.replace(patch_pool_radius=None))
    assert detector.pool_choice_ is None and detector.patch_model_.pool_radius is None
    with pytest.raises(NotFittedError, match="chosen at fit"):
        _ = Detector(CONFIG).pool_radius
    with pytest.raises(ValueError, match="pools radius 1"):
        Detector(CONFIG).set_models(
            detector.model_,
            detector.patch_model_.set_params(pool_radius=1),
            detector.patch_layout_,
        )
