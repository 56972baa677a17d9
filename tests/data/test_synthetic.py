"""gaussian_ad.data.synthetic: layout, masks and reproducibility of the generated dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaussian_ad.data.synthetic import CATEGORIES, DEFECT_TYPES, make_dataset

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_per_defect": 2, "size": 96}


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("small"), **SMALL)


def test_categories_and_defects() -> None:
    assert len(CATEGORIES) >= 3
    assert set(DEFECT_TYPES) == set(CATEGORIES)
    assert all(len(defects) >= 2 and "good" not in defects for defects in DEFECT_TYPES.values())


def test_layout_is_mvtec(small: Path) -> None:
    assert sorted(p.name for p in small.iterdir()) == sorted(CATEGORIES)
    for category in CATEGORIES:
        root = small / category
        assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
            "000.png",
            "001.png",
            "002.png",
        ]
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(
            ["good", *DEFECT_TYPES[category]]
        )
        assert len(list((root / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(
            DEFECT_TYPES[category]
        )
        for defect in DEFECT_TYPES[category]:
            images = sorted((root / "test" / defect).glob("*.png"))
            masks = sorted((root / "ground_truth" / defect).glob("*.png"))
            assert len(images) == SMALL["n_test_per_defect"]
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]


def test_images_and_masks_match(small: Path) -> None:
    size = SMALL["size"]
    for image_path in small.glob("*/*/*/*.png"):
        if image_path.parts[-3] == "ground_truth":
            continue
        image = Image.open(image_path)
        assert image.mode == "RGB" and image.size == (size, size)
    for mask_path in small.glob("*/ground_truth/*/*_mask.png"):
        mask = Image.open(mask_path)
        values = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (size, size)
        assert set(np.unique(values)) == {0, 255}


def test_defect_masks_cover_a_visible_area(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, n_train=1, n_test_good=0, n_test_per_defect=3, seed=7)
    for mask_path in root.glob("*/ground_truth/*/*_mask.png"):
        fraction = (np.asarray(Image.open(mask_path)) > 0).mean()
        assert 0.004 < fraction < 0.08, (mask_path, fraction)


def test_defects_change_the_image_inside_the_mask(small: Path) -> None:
    for category in CATEGORIES:
        good = np.stack(
            [np.asarray(Image.open(p), float) for p in (small / category / "train/good").glob("*")]
        )
        typical_deviation = np.abs(good - good.mean(0)).mean()
        for defect in DEFECT_TYPES[category]:
            image = np.asarray(Image.open(small / category / "test" / defect / "000.png"), float)
            mask = np.asarray(
                Image.open(small / category / "ground_truth" / defect / "000_mask.png")
            )
            inside = np.abs(image - good.mean(0))[mask > 0].mean()
            assert inside > 1.5 * typical_deviation, (category, defect)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, small: Path) -> None:
    again = make_dataset(tmp_path / "again", **SMALL)
    assert _files(again) == _files(small)
    other = make_dataset(tmp_path / "other", categories=["weave"], **SMALL, seed=1)
    assert _files(other / "weave") != _files(small / "weave")


def test_counts_do_not_change_other_images(tmp_path: Path, small: Path) -> None:
    fewer = make_dataset(tmp_path, categories=("disc",), **{**SMALL, "n_train": 1})
    first = "disc/test/missing/000.png"
    assert (fewer / first).read_bytes() == (small / first).read_bytes()
    assert (fewer / "disc/train/good/000.png").read_bytes() == (
        small / "disc/train/good/000.png"
    ).read_bytes()


def test_rerun_replaces_own_output_but_not_foreign_folders(tmp_path: Path) -> None:
    make_dataset(tmp_path, categories=["grain"], **SMALL)
    make_dataset(tmp_path, categories=["grain"], **{**SMALL, "n_train": 1})
    assert [p.name for p in (tmp_path / "grain/train/good").iterdir()] == ["000.png"]
    (tmp_path / "weave").mkdir()
    (tmp_path / "weave" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="weave"):
        make_dataset(tmp_path, categories=["weave"], **SMALL)
    assert (tmp_path / "weave" / "keep.txt").read_text() == "user data"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown categories"):
        make_dataset("unused", categories=["bottle"])
    with pytest.raises(ValueError, match="n_train"):
        make_dataset("unused", n_train=0)
