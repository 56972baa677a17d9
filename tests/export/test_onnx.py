"""ONNX export: onnxruntime against the torch path, the self-check's refusal, the metadata,
and the exported file in an interpreter that has only onnxruntime and numpy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import gaussian_ad.export.onnx as onnx_export
from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.detection.detector import Detector, training_pass
from gaussian_ad.evaluation.evaluate import split_records
from gaussian_ad.export.onnx import (
    MAP_RTOL,
    SCORE_RTOL,
    Decision,
    OnnxCheckError,
    ScoringGraph,
    export_onnx,
)
from gaussian_ad.export.runtime import OnnxDetector
from gaussian_ad.features.extract import decode_resized
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.stats.calibration import Calibration

SIDE = 64  # small input: the export traces the whole backbone
CATEGORY = "disc"
CONFIGS = {
    "default": DetectorConfig(input_size=SIDE),  # fused, standardised, position-free maps
    "per_position_npca": DetectorConfig(
        input_size=SIDE, reduction="npca", patch_pool_radius=0, levels="4-7"
    ),
    "image_only": DetectorConfig(input_size=SIDE, patch=False, standardize_levels=False),
}


@pytest.fixture(scope="module")
def images(small_dataset) -> dict[str, list[str]]:
    train, test = split_records(mvtec_manifest(small_dataset, CATEGORY))
    return {"train": [r.path for r in train][:12], "test": [r.path for r in test][:8]}


@pytest.fixture(scope="module")
def detectors(images) -> dict[str, Detector]:
    """The configurations of CONFIGS fitted on 12 images (one backbone pass per patch
    setting)."""
    loader = LoaderOptions(device="cpu")
    fitted, passes = {}, {}
    for key, config in CONFIGS.items():
        detector = Detector(config, loader)
        backbone = detector.backbone_module()
        layout = PatchLayout.for_config(backbone, config) if config.patch else None
        if layout not in passes:
            passes[layout] = training_pass(backbone, images["train"], loader, layout)
        keys = [str(i) for i in range(len(images["train"]))]
        fitted[key] = detector.fit_pass(passes[layout], keys, layout, None)
    return fitted


@pytest.fixture(scope="module")
def exported(detectors, images, tmp_path_factory) -> dict[str, Path]:
    """Each detector exported once, self-checked on two training images."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for key, detector in detectors.items():
        result = export_onnx(detector, folder / f"{key}.onnx", check_images=images["train"][:2])
        assert result.check.passed and result.size_bytes == result.path.stat().st_size
        paths[key] = result.path
    return paths


def rel(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.maximum(np.abs(want), 1)))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_onnxruntime_scores_as_the_torch_path(key, detectors, exported, images):
    detector, path = detectors[key], exported[key]
    onnx.checker.check_model(str(path))
    want = detector.score(images["test"], maps=detector.patch_model_ is not None)
    got = OnnxDetector(path, batch_size=3).score(images["test"])  # 3 + 3 + 2 images
    assert len(got) == len(want) == len(images["test"])
    assert rel(got.scores, want.scores) < SCORE_RTOL
    assert rel(got.image_scores, want.image_scores) < SCORE_RTOL
    assert rel(got.level_scores, want.level_scores) < SCORE_RTOL
    assert np.array_equal(got.is_anomaly, want.is_anomaly)
    assert np.array_equal(got.normalized, detector.calibration_.normalized(got.scores))
    if detector.patch_model_ is None:
        assert got.patch_scores is None
        return
    assert rel(got.patch_scores, want.patch_scores) < SCORE_RTOL
    pixels = np.stack([decode_resized(p, SIDE) for p in images["test"][:2]])
    maps = onnx_export.run(OnnxDetector(path).session, pixels)["map"]
    assert maps.shape == (2, SIDE, SIDE) and maps.dtype == np.float32
    peak = np.abs(want.maps[:2]).max(axis=(1, 2))
    assert np.all(np.abs(maps - want.maps[:2]).max(axis=(1, 2)) <= MAP_RTOL * peak)


def test_the_metadata_carries_threshold_and_configuration(detectors, exported):
    detector = detectors["default"]
    model = onnx.load(str(exported["default"]))
    props = {p.key: p.value for p in model.metadata_props}
    assert float(props["threshold"]) == detector.threshold
    assert props["score_kind"] == "fused" and props["input_size"] == str(SIDE)
    assert DetectorConfig.from_dict(json.loads(props["detector_config"])) == detector.config
    assert [i.name for i in model.graph.input] == ["pixels"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # the batch size is dynamic
    assert {o.name for o in model.graph.output} == {
        "score", "image_score", "normalized_score", "is_anomaly", "level_scores",
        "patch_score", "map",
    }  # fmt: skip


def test_an_export_that_disagrees_with_torch_writes_nothing(detectors, tmp_path, monkeypatch):
    class Shifted(ScoringGraph):  # a graph whose score is off by 1e-3 relative
        def forward(self, pixels):
            score, *rest = super().forward(pixels)
            return (score * (1 + 1e-3), *rest)

    monkeypatch.setattr(onnx_export, "ScoringGraph", Shifted)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(OnnxCheckError, match="not written.*score"):
        export_onnx(detectors["default"], out)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left


def test_an_uncalibrated_model_is_refused(detectors, tmp_path):
    fitted = detectors["image_only"]
    bare = Detector(fitted.config, fitted.loader).set_models(fitted.model_)
    with pytest.raises(ValueError, match="no calibration"):
        export_onnx(bare, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_the_graph_normalises_as_the_calibration_with_kept_quantiles():
    """More normals than a calibration keeps: the graph interpolates between quantiles."""
    rng = np.random.default_rng(0)
    image, patch = rng.normal(10, 2, 3000), rng.normal(5, 1, 3000)
    calibration = Calibration.fit("image", image, patch, 0.01)
    assert calibration.n_normals > len(calibration.normal_scores)
    scores = np.concatenate([rng.normal(10, 3, 200), [-100.0, 100.0], image[:5]])
    got = Decision(calibration).normalized(torch.from_numpy(scores)).numpy()
    np.testing.assert_allclose(got, calibration.normalized(scores), rtol=0, atol=1e-12)


ONNX_ONLY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import onnxruntime as ort
    for name in ("torch", "PIL", "gaussian_ad"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is importable")
    session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"pixels": np.load(sys.argv[3])})))
    print(json.dumps({"threshold": float(meta["threshold"]),
                      "score": out["score"].tolist(),
                      "is_anomaly": out["is_anomaly"].tolist()}))
    """
)


def test_the_exported_file_runs_with_only_onnxruntime_and_numpy(
    detectors, exported, images, tmp_path
):
    detector, path = detectors["default"], exported["default"]
    pixels = np.stack([decode_resized(p, SIDE) for p in images["test"][:3]])
    np.save(tmp_path / "pixels.npy", pixels)
    # -I -S: no site-packages, no user site; the path gets a folder of links to onnxruntime
    # and numpy (and numpy's bundled libraries) alone.
    only = tmp_path / "site"
    only.mkdir()
    site = Path(onnxruntime.__file__).parents[1]
    for name in ("onnxruntime", "numpy", "numpy.libs"):
        if (site / name).exists():
            (only / name).symlink_to(site / name)
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ONNX_ONLY_SCRIPT, str(only), str(path),
         str(tmp_path / "pixels.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    want = detector.score(list(pixels))
    assert out["threshold"] == detector.threshold
    assert rel(out["score"], want.scores) < SCORE_RTOL
    assert out["is_anomaly"] == want.is_anomaly.tolist()
