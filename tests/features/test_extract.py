"""Feature extraction: sources, order, error records, agreement with a manual forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gaussian_ad.backbones.models import load_backbone
from gaussian_ad.config import LoaderOptions
from gaussian_ad.features.extract import InputNormalizer, collect, extract, iter_batches

N_IMAGES = 5


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("lite0", levels="1,4,7,9", device="cpu")


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    smooth = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(N_IMAGES)]
    return [
        np.asarray(Image.fromarray(a).resize((120, 90), Image.Resampling.BILINEAR)) for a in smooth
    ]


@pytest.fixture(scope="module")
def png_paths(arrays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, array in enumerate(arrays):
        paths.append(folder / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def manual_features(backbone, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The paper's preprocessing written out: bilinear square resize, [0, 1], mean/std."""
    size = backbone.spec.image_size
    mean = np.array(backbone.spec.mean, dtype=np.float32)
    std = np.array(backbone.spec.std, dtype=np.float32)
    batch = []
    for array in arrays:
        image = Image.fromarray(array).convert("RGB")
        resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
        batch.append((resized.astype(np.float32) / 255.0 - mean) / std)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        return [level.numpy() for level in backbone(x)]


def assert_features_equal(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["paths", "pil", "arrays"])
def test_extract_matches_manual_forward(backbone, arrays, png_paths, kind):
    sources = {
        "paths": png_paths,
        "pil": [Image.fromarray(a) for a in arrays],
        "arrays": arrays,
    }[kind]
    features = extract(backbone, sources, LoaderOptions(batch_size=2, workers=2))
    assert features.errors == []
    np.testing.assert_array_equal(features.index, np.arange(N_IMAGES))
    assert [level.shape for level in features.pooled] == [
        (N_IMAGES, d) for d in backbone.level_dims
    ]
    assert_features_equal(features.pooled, manual_features(backbone, arrays))


def test_grayscale_array_is_replicated_to_rgb(backbone, arrays):
    gray = arrays[0][..., 0]
    features = extract(backbone, [gray])
    assert_features_equal(features.pooled, manual_features(backbone, [np.stack([gray] * 3, -1)]))


def test_broken_file_becomes_an_error_record(backbone, arrays, png_paths, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    missing = tmp_path / "missing.png"
    sources = [png_paths[0], png_paths[1], broken, png_paths[2], missing, png_paths[3]]
    features = extract(backbone, sources, LoaderOptions(batch_size=2, workers=2))
    np.testing.assert_array_equal(features.index, [0, 1, 3, 5])
    assert [error.path for error in features.errors] == [str(broken), str(missing)]
    assert all(error.reason for error in features.errors)
    assert_features_equal(features.pooled, manual_features(backbone, arrays[:4]))


def test_all_broken_gives_empty_levels(backbone, tmp_path):
    features = extract(
        backbone, [tmp_path / "a.png", tmp_path / "b.png"], LoaderOptions(batch_size=1)
    )
    assert features.index.shape == (0,) and features.index.dtype == np.int64
    assert [level.shape for level in features.pooled] == [(0, d) for d in backbone.level_dims]
    assert len(features.errors) == 2


def test_batches_stream_in_input_order(backbone, arrays):
    batches = list(iter_batches(backbone, arrays, LoaderOptions(batch_size=2, workers=3)))
    assert [batch.index.tolist() for batch in batches] == [[0, 1], [2, 3], [4]]
    assert [batch.pooled[0].shape[0] for batch in batches] == [2, 2, 1]
    assert all(batch.patches is None and batch.errors == [] for batch in batches)


def test_transform_runs_before_resize(backbone, arrays):
    def flip(image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    features = collect(iter_batches(backbone, arrays[:2], transform=flip), backbone)
    flipped = [np.ascontiguousarray(a[:, ::-1]) for a in arrays[:2]]
    assert_features_equal(features.pooled, manual_features(backbone, flipped))


def test_normalizer_gives_channels_last_float_inputs_without_a_copy(backbone, arrays):
    pixels = torch.from_numpy(np.stack([a[:64, :64] for a in arrays]))
    x = InputNormalizer(backbone, torch.device("cpu"))(pixels)
    assert x.shape == (N_IMAGES, 3, 64, 64) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(backbone.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.spec.std).view(1, 3, 1, 1)
    expected = (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(x, expected)


def test_blas_runs_single_threaded_between_batches_and_is_restored(backbone, arrays):
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    with threadpool_limits(2, user_api="blas"):
        seen = []
        for _ in iter_batches(backbone, arrays, LoaderOptions(batch_size=2, workers=1)):
            seen.append(blas_threads())  # the consumer's statistics run here
        assert seen == [{1}] * 3
        assert blas_threads() == {2}


def test_decode_gate_allows_the_threads_that_keep_up_with_the_model():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gaussian_ad.features.extract import DecodeGate

    gate = DecodeGate(2)
    running, most = 0, 0
    lock = threading.Lock()

    def work(_):
        nonlocal running, most
        with gate:
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.05)
            with lock:
                running -= 1

    def most_at_once() -> int:
        nonlocal most
        most = 0
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(work, range(4)))
        return most

    assert (gate.allowed, most_at_once()) == (2, 2)  # all at first
    gate.fit_to(decode_seconds=0.1, model_seconds=0.5)  # one thread keeps up
    assert (gate.allowed, most_at_once()) == (1, 1)
    gate.fit_to(decode_seconds=5.0, model_seconds=0.5)  # ten would be needed
    assert (gate.allowed, most_at_once()) == (2, 2)


def test_decoding_narrows_only_where_one_thread_keeps_up(caplog):
    import time

    from gaussian_ad.features.extract import _decode_batches

    images = [np.zeros((8, 8, 3), np.uint8)] * 12

    def dear(image):
        end = time.thread_time() + 0.02  # CPU, as decoding is
        while time.thread_time() < end:
            pass
        return image

    with caplog.at_level("DEBUG", logger="gaussian_ad.features.extract"):
        list(_decode_batches(images, 8, 2, 2, dear, None))  # the model takes no time
    assert "decoding on 1 threads" not in caplog.text
    caplog.clear()
    with caplog.at_level("DEBUG", logger="gaussian_ad.features.extract"):
        for _ in _decode_batches(images, 8, 2, 2, None, None):
            time.sleep(0.05)  # the model is the bottleneck: one thread keeps up
    assert "decoding on 1 threads" in caplog.text
