"""Overlays: the map on its image above a legend (verdict, scores, fixed colour bar)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from gaussian_ad.detection.scores import Scores
from gaussian_ad.scoring.overlays import (
    MIN_WIDTH,
    SCALE_SDS,
    VERDICT_COLOURS,
    Verdict,
    annotated,
    legend,
    map_range,
    overlay,
    overlay_name,
    write_overlay,
    write_overlays,
)
from gaussian_ad.stats.fusion import Standardizer

NORMAL = Standardizer(image_mean=100.0, image_std=5.0, patch_mean=10.0, patch_std=2.0)
FLAGGED = Verdict(score=7.5, threshold=4.0, normalized=0.995, is_anomaly=True)
JET_LOW, JET_HIGH = (
    tuple(int(c) for c in (np.asarray(colormaps["jet"](v)[:3]) * 255).astype(np.uint8))
    for v in (0.0, 1.0)
)


def picture(width: int = 400, height: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hot_map(size: int = 8) -> np.ndarray:
    anomaly_map = np.full((size, size), 9.0, np.float32)
    anomaly_map[2:4, 5:7] = 20.0
    return anomaly_map


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}


def test_the_png_is_the_overlay_above_a_legend_with_a_colour_bar(tmp_path):
    image = picture()
    path = write_overlay(image, hot_map(), tmp_path / "a.png", NORMAL, FLAGGED)
    with Image.open(path) as written:
        written = written.convert("RGB")
    panel = legend(400, (10.0, 10.0 + SCALE_SDS * 2.0), True, FLAGGED)
    assert written.size == (400, 300 + panel.height) and panel.height >= 30
    top = overlay(Image.fromarray(image), hot_map(), (10.0, 10.0 + SCALE_SDS * 2.0))
    np.testing.assert_array_equal(np.asarray(written)[:300], np.asarray(top))
    np.testing.assert_array_equal(np.asarray(written)[300:], np.asarray(panel))
    # The colour bar: a row runs through the whole jet ramp, from blue on the left to red.
    for row in np.asarray(panel):
        pixels = [tuple(c) for c in row]
        if JET_LOW in pixels and JET_HIGH in pixels and len(set(pixels)) > 200:
            assert pixels.index(JET_LOW) < pixels.index(JET_HIGH)
            break
    else:
        raise AssertionError("no colour bar in the legend")


def test_a_narrow_image_is_padded_to_the_legend_width(tmp_path):
    path = write_overlay(picture(40, 30), hot_map(), tmp_path / "n.png", NORMAL, FLAGGED)
    with Image.open(path) as written:
        assert written.width == MIN_WIDTH and written.height > 30


def test_the_verdict_and_the_numbers_are_drawn_as_text():
    plain = legend(400, (10.0, 16.0), True)
    flagged = legend(400, (10.0, 16.0), True, FLAGGED)
    normal = legend(400, (10.0, 16.0), True, Verdict(3.0, 4.0, 0.5, False))
    assert flagged.height > plain.height and flagged.size == normal.size
    assert VERDICT_COLOURS[True] in colours(flagged) and VERDICT_COLOURS[True] not in colours(plain)
    assert VERDICT_COLOURS[False] in colours(normal) and VERDICT_COLOURS[False] not in colours(
        flagged
    )
    other = legend(400, (10.0, 16.0), True, Verdict(7.5, 4.0, 0.97, True))
    assert not np.array_equal(np.asarray(flagged), np.asarray(other))  # another normalised score
    unknown = legend(400, (10.0, 16.0), True, Verdict(7.5, 4.0, None, True))
    assert not np.array_equal(np.asarray(flagged), np.asarray(unknown))


def test_the_colour_scale_is_fixed_per_model_not_per_image():
    assert map_range(hot_map(), NORMAL) == (10.0, 10.0 + SCALE_SDS * 2.0, True)
    assert map_range(hot_map()) == (9.0, 20.0, False)
    image = Image.fromarray(picture())
    fixed = [annotated(image, m, NORMAL, FLAGGED) for m in (hot_map(), hot_map() * 3)]
    own = [annotated(image, m, None, FLAGGED) for m in (hot_map(), hot_map() * 3)]
    legend_rows = slice(300, None)
    assert np.array_equal(np.asarray(fixed[0])[legend_rows], np.asarray(fixed[1])[legend_rows])
    assert not np.array_equal(np.asarray(own[0])[legend_rows], np.asarray(own[1])[legend_rows])


def test_a_flat_map_below_the_normal_peak_is_all_blue():
    image = Image.fromarray(picture())
    flat = annotated(image, np.full((8, 8), 7.0, np.float32), NORMAL, FLAGGED)
    blue = Image.blend(image, Image.new("RGB", image.size, JET_LOW), 0.5)
    np.testing.assert_array_equal(np.asarray(flat)[:300], np.asarray(blue))


def test_write_overlays_writes_the_flagged_images_under_their_relative_names(tmp_path):
    names = ["data/good/000.png", "data/crack/000.png", "set.tar!scratch/left/007.png"]
    sources = [picture(seed=i) for i in range(3)]
    maps = np.stack([hot_map(), hot_map() * 2, hot_map() * 3])
    scores = Scores(
        index=np.array([0, 1, 2]),
        level_scores=np.zeros((3, 1)),
        maps=maps,
        scores=np.array([1.0, 6.0, 9.0]),
        is_anomaly=np.array([False, True, True]),
        normalized=np.array([0.4, 0.99, 1.0]),
    )
    written = write_overlays(scores, sources, names, tmp_path, "maps", NORMAL, threshold=4.0)
    assert written == {1: overlay_name("maps", names[1]), 2: overlay_name("maps", names[2])}
    assert "crack__000-" in written[1] and "scratch__left__007-" in written[2]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(
        w.split("/")[1] for w in written.values()
    )
    with Image.open(tmp_path / written[1]) as png:
        expected = annotated(
            Image.fromarray(sources[1]), maps[1], NORMAL, Verdict(6.0, 4.0, 0.99, True)
        )
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))


def test_every_writes_the_good_images_overlays_too_with_their_normal_verdict(tmp_path):
    names = ["good/000.png", "crack/000.png"]
    sources = [picture(seed=i) for i in range(2)]
    scores = Scores(
        index=np.array([0, 1]),
        level_scores=np.zeros((2, 1)),
        maps=np.stack([hot_map(), hot_map() * 2]),
        scores=np.array([1.0, 6.0]),
        is_anomaly=np.array([False, True]),
        normalized=np.array([0.4, 0.99]),
    )
    flagged = write_overlays(scores, sources, names, tmp_path / "a", "maps", NORMAL, 4.0)
    every = write_overlays(scores, sources, names, tmp_path / "b", "maps", NORMAL, 4.0, every=True)
    assert set(flagged) == {1} and set(every) == {0, 1}
    with Image.open(tmp_path / "b" / every[0]) as png:
        expected = annotated(
            Image.fromarray(sources[0]), scores.maps[0], NORMAL, Verdict(1.0, 4.0, 0.4, False)
        )
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))


def test_without_decisions_nothing_is_written_and_without_maps_it_refuses(tmp_path):
    scores = Scores(index=np.arange(1), level_scores=np.zeros((1, 1)), maps=hot_map()[None])
    assert write_overlays(scores, [picture()], ["a.png"], tmp_path, "maps") == {}
    with pytest.raises(ValueError, match="maps=True"):
        write_overlays(
            Scores(index=np.arange(1), level_scores=np.zeros((1, 1))),
            [picture()],
            ["a"],
            tmp_path,
            "m",
        )
