"""gaussian_ad.data.images: manifests, decoding of awkward and broken files, fingerprints."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gaussian_ad.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageRecord,
    file_digest,
    folder_manifest,
    load_masks,
    load_rgb,
    manifest_fingerprint,
    mvtec_categories,
    mvtec_manifest,
)
from gaussian_ad.data.synthetic import CATEGORIES, DEFECT_TYPES, make_dataset

N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 4, 3, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("mvtec"),
        n_train=N_TRAIN,
        n_test_good=N_TEST_GOOD,
        n_test_per_defect=N_PER_DEFECT,
        size=64,
    )


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """An RGB uint8 image with distinct, non-flat content."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1).astype(
        np.uint8
    )


# --- manifests -----------------------------------------------------------------------------


def test_mvtec_categories_lists_generated_categories(dataset: Path) -> None:
    (dataset / "not_a_category").mkdir(exist_ok=True)
    assert mvtec_categories(dataset) == sorted(CATEGORIES)


def test_mvtec_manifest_counts_labels_and_masks(dataset: Path) -> None:
    for category in CATEGORIES:
        records = mvtec_manifest(dataset, category)
        train = [r for r in records if r.split == "train"]
        test = [r for r in records if r.split == "test"]
        assert len(train) == N_TRAIN
        assert all(r.label == 0 and r.defect == "good" and r.mask is None for r in train)
        good = [r for r in test if r.label == 0]
        assert len(good) == N_TEST_GOOD
        assert all(r.defect == "good" and r.mask is None for r in good)
        anomalous = [r for r in test if r.label == 1]
        assert len(anomalous) == N_PER_DEFECT * len(DEFECT_TYPES[category])
        assert {r.defect for r in anomalous} == set(DEFECT_TYPES[category])
        for record in anomalous:
            assert record.mask is not None and Path(record.mask).is_file()
            assert Path(record.mask).name == Path(record.path).stem + "_mask.png"
        assert all(r.category == category and Path(r.path).is_file() for r in records)
        assert records == mvtec_manifest(dataset, category)  # deterministic
        assert [r.path for r in train] == sorted(r.path for r in train)


def test_load_masks_resizes_nearest_and_treats_none_as_normal(tmp_path: Path) -> None:
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[1:3, 0:3] = 255  # the left half of the middle rows
    mask[0, 5] = 127  # at most 127 is background
    Image.fromarray(mask).save(tmp_path / "m.png")
    masks = load_masks([None, str(tmp_path / "m.png")], 12)
    assert masks.shape == (2, 12, 12) and masks.dtype == bool
    assert not masks[0].any()
    expected = np.zeros((12, 12), dtype=bool)
    expected[3:9, 0:6] = True
    np.testing.assert_array_equal(masks[1], expected)
    assert load_masks([], 5).shape == (0, 5, 5)


def test_mvtec_manifest_selected_splits(dataset: Path) -> None:
    category = CATEGORIES[0]
    assert {r.split for r in mvtec_manifest(dataset, category, splits=("train",))} == {"train"}
    assert {r.split for r in mvtec_manifest(dataset, category, splits=["test"])} == {"test"}
    with pytest.raises(ValueError, match="validation"):
        mvtec_manifest(dataset, category, splits=("validation",))


def test_mvtec_manifest_missing_category_names_the_path(dataset: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_part") as info:
        mvtec_manifest(dataset, "no_such_part")
    assert str(dataset / "no_such_part") in str(info.value)


def test_mvtec_manifest_missing_train_good_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "part" / "train" / "bad").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        mvtec_manifest(tmp_path, "part")
    assert str(tmp_path / "part" / "train" / "good") in str(info.value)


def test_folder_manifest_recurses_filters_and_sorts(tmp_path: Path) -> None:
    pixels = Image.fromarray(_gradient())
    tree = tmp_path / "tree"
    wanted = ["b/z.png", "a/deep/er/x.JPG", "a/y.bmp", "top.webp"]
    for name in wanted:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        pixels.save(tree / name, format="WEBP" if name.endswith("webp") else None)
    for name in ["a/notes.txt", "b/.hidden.png", ".cache/c.png", "a/deep/data.npy"]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")
    extra = tmp_path / "elsewhere.tiff"
    pixels.save(extra)

    records = folder_manifest([tree / "b", tree, str(extra), tmp_path / "tree" / "a" / "notes.txt"])
    expected = sorted([str(extra)] + [str(tree / name) for name in wanted])
    assert [r.path for r in records] == expected
    assert all(r == ImageRecord(r.path) and r.label == -1 for r in records)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        folder_manifest([tree / "missing_folder"])


def test_image_extensions_are_lower_case_with_dot() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


# --- broken files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"just some text, not pixels\n", "not an image (cannot identify image file)"),
    ],
)
def test_unreadable_files_raise_with_path_and_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert info.value.reason == reason
    assert str(info.value) == f"{path}: {reason}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_raises_and_leaves_pillow_strict(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_gradient(256, 256)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated or corrupt image") as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_and_folder_raise_decode_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "absent.png")
    with pytest.raises(ImageDecodeError, match="directory"):
        load_rgb(tmp_path)


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_bytes(Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_rgb(data, name="bomb.png")


def test_decode_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ImageDecodeError("a/b.png", "empty file")))
    assert (error.path, error.reason, str(error)) == (
        "a/b.png",
        "empty file",
        "a/b.png: empty file",
    )


def test_byte_source_errors_use_the_given_name() -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(b"not an image", name="s3://bucket/key.png")
    assert str(info.value).startswith("s3://bucket/key.png: not an image")


# --- modes and sources ---------------------------------------------------------------------


def test_16bit_grayscale_keeps_its_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_rgb(path)
    pixels = np.asarray(rgb)
    assert rgb.mode == "RGB" and rgb.size == (64, 32)
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200  # a ramp, not a clipped white image
    np.testing.assert_allclose(pixels[..., 0], ramp / 257, atol=0.5 + 1e-9)


def test_32bit_int_and_float_modes_scale_to_8bit() -> None:
    wide = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), "I")
    assert np.asarray(load_rgb(wide))[0, :, 0].tolist() == [0, 4, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(load_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_rgb(path))
    assert (pixels[:, :4] == 200).all() and (pixels[:, 4:] == 0).all()


def _mode_samples() -> dict[str, tuple[str, Image.Image]]:
    base = Image.fromarray(_gradient())
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        "RGBA": ("PNG", base.convert("RGBA")),
        "LA": ("PNG", base.convert("LA")),
        "L": ("PNG", base.convert("L")),
        "1": ("PNG", base.convert("1")),
        "P": ("PNG", palette),
        "CMYK": ("JPEG", base.convert("CMYK")),
        "CMYK-TIFF": ("TIFF", base.convert("CMYK")),
        "I;16": ("TIFF", base.convert("I;16")),
        "F": ("TIFF", base.convert("F")),
    }


@pytest.mark.parametrize("mode", list(_mode_samples()))
def test_every_mode_decodes_to_rgb_of_the_same_size(tmp_path: Path, mode: str) -> None:
    fmt, image = _mode_samples()[mode]
    path = tmp_path / f"sample.{fmt.lower()}"
    image.save(path, format=fmt, **({"transparency": 0} if mode == "P" else {}))
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert np.asarray(rgb).std() > 0  # content survived the conversion


def test_cmyk_jpeg_keeps_colours(tmp_path: Path) -> None:
    colours = np.zeros((32, 32, 3), np.uint8)
    colours[:, :16] = (220, 40, 40)
    colours[:, 16:] = (40, 40, 220)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(colours).convert("CMYK").save(path, quality=95)
    pixels = np.asarray(load_rgb(path)).astype(int)
    assert pixels[:, :12, 0].mean() > 150 and pixels[:, :12, 2].mean() < 100
    assert pixels[:, 20:, 2].mean() > 150 and pixels[:, 20:, 0].mean() < 100


def test_numpy_sources() -> None:
    rgb = _gradient(20, 10)
    assert np.array_equal(np.asarray(load_rgb(rgb)), rgb)
    gray = load_rgb(rgb[..., 0])
    assert np.array_equal(np.asarray(gray), np.repeat(rgb[..., :1], 3, -1))
    deep = load_rgb(np.full((10, 20), 65535, np.uint16))
    assert (np.asarray(deep) == 255).all()
    unit = load_rgb(np.full((10, 20, 3), 0.5, np.float32))
    assert (np.asarray(unit) == 128).all()
    with_alpha = np.dstack([rgb, np.zeros((10, 20), np.uint8)])
    assert (np.asarray(load_rgb(with_alpha)) == 0).all()
    with pytest.raises(ImageDecodeError, match=r"\[0, 1\]"):
        load_rgb(np.full((4, 4), 2.5), name="scaled.npy")
    with pytest.raises(ImageDecodeError, match="shape"):
        load_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageDecodeError, match="dtype int64"):
        load_rgb(np.zeros((4, 4), np.int64))


def test_bytes_file_object_and_pil_sources() -> None:
    pixels = _gradient()
    data = _png_bytes(Image.fromarray(pixels))
    for source in (data, bytearray(data), io.BytesIO(data), Image.open(io.BytesIO(data))):
        assert np.array_equal(np.asarray(load_rgb(source)), pixels)
    with pytest.raises(TypeError):
        load_rgb(12345)  # type: ignore[arg-type]


def test_jpeg_draft_decodes_large_files_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    Image.fromarray(_gradient(2000, 1500)).save(path, quality=90)
    assert load_rgb(path).size == (2000, 1500)
    small = load_rgb(path, draft_size=224)
    assert small.mode == "RGB"
    assert small.size[0] < 2000 and small.size[1] < 1500
    assert min(small.size) >= 224
    png = tmp_path / "large.png"
    Image.fromarray(_gradient(300, 250)).save(png)
    assert load_rgb(png, draft_size=64).size == (300, 250)  # draft applies to JPEG only


# --- digests -------------------------------------------------------------------------------


def test_file_digest_is_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    content = np.random.default_rng(0).bytes(3 << 20)
    path.write_bytes(content)
    assert file_digest(path) == hashlib.sha256(content).hexdigest()


def test_manifest_fingerprint_is_order_and_location_independent(
    dataset: Path, tmp_path: Path
) -> None:
    category = CATEGORIES[0]
    for copy in ("a", "b"):
        shutil.copytree(dataset / category, tmp_path / copy / category)
    records = mvtec_manifest(tmp_path / "a", category)
    fingerprint = manifest_fingerprint(records)
    assert fingerprint == manifest_fingerprint(reversed(records))
    assert manifest_fingerprint(mvtec_manifest(tmp_path / "b", category)) == fingerprint
    assert manifest_fingerprint(records[:-1]) != fingerprint

    relabelled = [ImageRecord(r.path, r.category, r.split, 1, r.defect, r.mask) for r in records]
    assert manifest_fingerprint(relabelled) != fingerprint
    with open(records[0].path, "ab") as file:
        file.write(b"\0")  # same names, different size
    assert manifest_fingerprint(records) != fingerprint


def test_rgb_png_with_a_transparent_colour_key_is_composited(tmp_path: Path) -> None:
    pixels = np.full((4, 4, 3), 200, np.uint8)
    pixels[:, :2] = (10, 20, 30)  # the colour the tRNS chunk makes transparent
    path = tmp_path / "keyed.png"
    Image.fromarray(pixels, "RGB").save(path, transparency=(10, 20, 30))
    rgb = np.asarray(load_rgb(path))
    assert (rgb[:, :2] == 0).all() and (rgb[:, 2:] == 200).all()


def test_a_decoded_rgb_file_is_returned_without_a_copy_and_stays_usable(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.fromarray(_gradient()).save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.format == "PNG"  # the decoded image itself, not a copy
    expected = Image.fromarray(_gradient()).resize((4, 4))
    assert np.array_equal(np.asarray(rgb.resize((4, 4))), np.asarray(expected))
