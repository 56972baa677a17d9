"""A fitted detector as one ONNX graph: uint8 images in, the detector's scores out.

The graph takes a uint8 tensor ``pixels`` of shape (N, S, S, 3), RGB, already resized to the
model's side S the way the torch path resizes (Pillow's bilinear resize of the whole image
to S x S, no crop: :func:`~gaussian_ad.features.extract.decode_resized`); N is dynamic. It
computes what :meth:`Detector.score` computes, piece by piece, from the detector's fitted
state (the numpy arrays become constants of the graph):

- :class:`Normalize`: scale to [0, 1] and normalise with the weights' mean and std;
- the backbone's levels (:meth:`Backbone.forward_maps`), mean-pooled;
- :class:`LevelGaussians`: per image-level level, the optional PCA/NPCA projection and the
  unsquared Mahalanobis distance to the level's mean (``level_scores``, float64);
- :class:`PatchScorer`: patch features (:func:`~gaussian_ad.features.patches.patch_tensor`),
  their Mahalanobis distances to the patch Gaussian(s), the anomaly map (the upsampling and
  smoothing matrix of :meth:`PatchGaussian.map_matrix` on both axes) and its maximum
  (``patch_score``, ``map``);
- :class:`Decision`: the calibration's image score (standardised levels or their sum,
  ``image_score``), the chosen score (``score``: what ``gaussian-ad score`` prints), the
  normalised score (``normalized_score``: the fraction of the calibration normals that
  scored lower; NaN for calibrations that kept no normal scores) and ``is_anomaly``
  (score > threshold).

The Gaussian arithmetic runs in float64, as in numpy; the backbone in float32. The threshold,
the configuration and the input contract are in the model's ``metadata_props``
(:func:`onnx_metadata`). :func:`export_onnx` checks its own output: it scores a few images
with onnxruntime and with the torch path and writes no file when they differ by more than
:data:`SCORE_RTOL` (scores) or :data:`MAP_RTOL` (maps).

A new piece of fitted state in the detector is one more module here, fed by its public
attributes, and one more output.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gaussian_ad.backbones.models import Backbone
from gaussian_ad.data.images import ImageSource
from gaussian_ad.detection.detector import Detector
from gaussian_ad.detection.scores import Scores
from gaussian_ad.export.runtime import INPUT, run, session
from gaussian_ad.features.extract import decode_resized
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.features.patches import patch_tensor
from gaussian_ad.stats.calibration import Calibration
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.patch_gaussian import PatchGaussian

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
OPSET = 18
SCORE_RTOL = 1e-4
"""Largest difference allowed between onnxruntime's and the torch path's scores, relative
to max(|torch score|, 1): relative for distances, absolute (in z units) for the standardised
and fused scores near 0."""
MAP_RTOL = 1e-3
"""Largest difference allowed between the maps, relative to each torch map's maximum."""
NORMALIZED_ATOL = 1e-9
SCORE_OUTPUTS = ("score", "image_score", "level_scores", "patch_score")
CHECK_SEED = 0


class OnnxCheckError(ValueError):
    """The exported graph's scores differ from the torch path's: no file was written."""


def _constant(module: nn.Module, name: str, values: np.ndarray | float) -> None:
    """A float64 buffer: a constant of the exported graph."""
    module.register_buffer(name, torch.from_numpy(np.array(values, np.float64)))


class Normalize(nn.Module):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: /255, minus the mean, over the std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        # The same constants as InputNormalizer: (x / 255 - mean) / std == x * scale + shift
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        return pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift


def mahalanobis(x: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """Unsquared Mahalanobis distance over the last axis (float64), negatives clipped."""
    diff = x - mean
    squared = ((diff @ precision) * diff).sum(dim=-1)
    return torch.sqrt(torch.clamp(squared, min=0.0))


class LevelGaussians(nn.Module):
    """:meth:`GaussianAD.level_scores` on pooled float32 levels: (N, L) float64."""

    def __init__(self, model: GaussianAD):
        super().__init__()
        self.n_levels = len(model.means_)
        self.projected = model.components_ is not None
        for i in range(self.n_levels):
            if self.projected:
                _constant(self, f"pca_mean{i}", model.pca_means_[i])
                _constant(self, f"components{i}", model.components_[i].T)
            _constant(self, f"mean{i}", model.means_[i])
            _constant(self, f"precision{i}", model.precisions_[i])

    def forward(self, levels: list[Tensor]) -> Tensor:
        columns = []
        for i, x in enumerate(levels):
            z = x.double()
            if self.projected:
                z = (z - getattr(self, f"pca_mean{i}")) @ getattr(self, f"components{i}")
            columns.append(
                mahalanobis(z, getattr(self, f"mean{i}"), getattr(self, f"precision{i}"))
            )
        return torch.stack(columns, dim=1)


class PatchScorer(nn.Module):
    """Patch features of the layout's levels -> (patch scores (N,) float64, maps (N, S, S)
    float64): :meth:`PatchGaussian.anomaly_maps`."""

    def __init__(
        self, model: PatchGaussian, layout: PatchLayout, backbone_levels: Sequence[int], size: int
    ):
        super().__init__()
        self.rows = [list(backbone_levels).index(level) for level in layout.levels]
        self.grid = layout.grid
        self.channel_index = np.asarray(layout.channel_index, np.int64)
        self.per_position = model.means_.shape[0] > 1
        _constant(self, "means", model.means_)  # (P or 1, d)
        precisions = model.precisions_
        _constant(self, "precisions", precisions if self.per_position else precisions[0])
        _constant(self, "axis", model.map_matrix(size))  # (S, grid)

    def forward(self, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        chosen = [maps[row] for row in self.rows]
        features = patch_tensor(chosen, self.grid, self.channel_index).double()  # (N, P, d)
        diff = features - self.means
        if self.per_position:  # (P, N, d) @ (P, d, d): one precision per position
            product = (diff.transpose(0, 1) @ self.precisions).transpose(0, 1)
        else:
            product = diff @ self.precisions
        distances = torch.sqrt(torch.clamp((product * diff).sum(dim=-1), min=0.0))
        grids = distances.reshape(-1, self.grid, self.grid)
        anomaly = self.axis @ grids @ self.axis.T
        return anomaly.amax(dim=(1, 2)), anomaly


class Decision(nn.Module):
    """:meth:`Detector.decide` with a calibration: image score, chosen score, normalised
    score and the verdict."""

    def __init__(self, calibration: Calibration):
        super().__init__()
        self.kind = calibration.kind
        self.standardized = calibration.levels is not None
        if self.standardized:
            _constant(self, "level_means", calibration.levels.means)
            _constant(self, "level_stds", calibration.levels.stds)
        standardizer = calibration.standardizer
        self.fused = self.kind == "fused"
        if self.fused:
            _constant(self, "image_mean", standardizer.image_mean)
            _constant(self, "image_std", standardizer.image_std)
            _constant(self, "patch_mean", standardizer.patch_mean)
            _constant(self, "patch_std", standardizer.patch_std)
        _constant(self, "threshold", calibration.threshold)
        self.has_normalized = calibration.has_normalized
        if self.has_normalized:
            kept = np.asarray(calibration.normal_scores)
            self.exact = calibration.n_normals == kept.size  # else interpolated quantiles
            _constant(self, "normals", kept)

    def image_score(self, level_scores: Tensor) -> Tensor:
        if self.standardized:
            return ((level_scores - self.level_means) / self.level_stds).sum(dim=1)
        return level_scores.sum(dim=1)

    def chosen(self, image: Tensor, patch: Tensor | None) -> Tensor:
        if self.kind == "image":
            return image
        if self.kind == "patch":
            return patch
        return (image - self.image_mean) / self.image_std + (
            patch - self.patch_mean
        ) / self.patch_std

    def normalized(self, score: Tensor) -> Tensor:
        """:meth:`Calibration.normalized`: the fraction of normals below (exact), or
        ``np.interp`` over the kept quantiles."""
        if not self.has_normalized:
            return torch.full_like(score, float("nan"))
        kept = self.normals
        k = kept.shape[0]
        if self.exact:
            return (kept[None, :] < score[:, None]).double().sum(dim=1) / k
        # np.interp(score, kept, linspace(0, 1, k)): the segment [kept[j-1], kept[j]] that
        # holds the score, clamped to the ends.
        upper = torch.clamp((kept[None, :] <= score[:, None]).sum(dim=1), 1, k - 1)
        low, high = kept[upper - 1], kept[upper]
        width = high - low
        t = torch.where(width > 0, (score - low) / torch.where(width > 0, width, 1.0), 1.0)
        t = torch.clamp(t, 0.0, 1.0)
        return ((upper - 1).double() + t) / (k - 1)


class ScoringGraph(nn.Module):
    """The exported module: ``pixels`` uint8 (N, S, S, 3) -> the outputs of :data:`OUTPUTS`
    (those of the patch model only when the detector has one)."""

    def __init__(self, detector: Detector, backbone: Backbone):
        super().__init__()
        if detector.calibration_ is None:
            raise ValueError(
                "this model has no calibration (no threshold): fit it (or calibrate it) before "
                "exporting, an exported model gives verdicts"
            )
        self.normalize = Normalize(backbone.spec.mean, backbone.spec.std)
        self.backbone = backbone
        self.image_rows = [backbone.levels.index(lv) for lv in detector.config.image_levels]
        self.levels = LevelGaussians(detector.model_)
        self.patches = None
        layout = detector.patch_layout_
        if detector.patch_model_ is not None and layout is not None:
            self.patches = PatchScorer(
                detector.patch_model_, layout, backbone.levels, detector.config.image_size
            )
        self.decision = Decision(detector.calibration_)

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        maps = self.backbone.forward_maps(self.normalize(pixels))
        pooled = [maps[row].mean(dim=(2, 3), dtype=torch.float32) for row in self.image_rows]
        level_scores = self.levels(pooled)
        image = self.decision.image_score(level_scores)
        patch, anomaly = (None, None) if self.patches is None else self.patches(maps)
        score = self.decision.chosen(image, patch)
        normalized = self.decision.normalized(score)
        verdict = score > self.decision.threshold
        outputs = (score, image, normalized, verdict, level_scores)
        if patch is not None:
            outputs += (patch, anomaly.float())
        return outputs


OUTPUTS = (
    "score",
    "image_score",
    "normalized_score",
    "is_anomaly",
    "level_scores",
    "patch_score",
    "map",
)
"""The graph's outputs, in order: score, image_score, normalized_score (N,) float64,
is_anomaly (N,) bool, level_scores (N, L) float64, and with a patch model patch_score (N,)
float64 and map (N, S, S) float32."""


def output_names(detector: Detector) -> list[str]:
    """The outputs of ``detector``'s graph (without a patch model: no patch_score, map)."""
    return list(OUTPUTS if detector.patch_model_ is not None else OUTPUTS[:5])


def onnx_metadata(detector: Detector) -> dict[str, str]:
    """The model's ``metadata_props``: the input contract, threshold, score kind, levels,
    the detector's configuration and calibration summary (JSON), the weights."""
    import gaussian_ad

    calibration = detector.calibration_
    config = detector.config
    return {
        "gaussian_ad.format_version": str(FORMAT_VERSION),
        "gaussian_ad.version": gaussian_ad.__version__,
        "input": (
            f"{INPUT}: uint8 (N, {config.image_size}, {config.image_size}, 3) RGB, each image "
            f"resized to {config.image_size} x {config.image_size} with Pillow's bilinear "
            "resize (no crop); normalisation is in the graph"
        ),
        "input_size": str(config.image_size),
        "outputs": ",".join(output_names(detector)),
        "score_kind": calibration.kind,
        "threshold": repr(float(calibration.threshold)),
        "target_fpr": repr(float(calibration.target_fpr)),
        "levels": ",".join(map(str, config.image_levels)),
        "detector_config": json.dumps(config.to_dict()),
        "calibration": json.dumps(
            {k: v for k, v in calibration.to_dict().items() if k != "normal_scores"}
        ),
        "weights_fingerprint": detector.weights_fingerprint_ or "",
    }


@dataclass(frozen=True)
class ExportCheck:
    """How far onnxruntime's outputs were from the torch path's on the check images.

    ``errors`` per output: score, image_score, level_scores, patch_score against
    :data:`SCORE_RTOL`, map against :data:`MAP_RTOL`, and normalized_score: how far the
    graph's normalised scores are from the calibration's normalisation of the graph's own
    scores (a step function of the score: compared to the torch path's, a score within
    rounding of a normal's score would flip it by 1/n).
    """

    n_images: int
    errors: dict[str, float]
    verdicts_equal: bool

    @property
    def score_error(self) -> float:
        """The largest score error (see :data:`SCORE_RTOL`)."""
        return max(v for k, v in self.errors.items() if k in SCORE_OUTPUTS)

    @property
    def map_error(self) -> float | None:
        """The largest map error (see :data:`MAP_RTOL`); None without a patch model."""
        return self.errors.get("map")

    @property
    def passed(self) -> bool:
        return (
            self.score_error <= SCORE_RTOL
            and (self.map_error is None or self.map_error <= MAP_RTOL)
            and self.errors.get("normalized_score", 0.0) <= NORMALIZED_ATOL
            and self.verdicts_equal
        )

    def worst(self, other: ExportCheck) -> ExportCheck:
        """The larger error of each output, and whether both had the same verdicts."""
        errors = {k: max(v, other.errors.get(k, v)) for k, v in self.errors.items()}
        return ExportCheck(self.n_images, errors, self.verdicts_equal and other.verdicts_equal)


@dataclass(frozen=True)
class ExportResult:
    """The written file, its size, and the self-check it passed."""

    path: Path
    size_bytes: int
    check: ExportCheck


def check_pixels(size: int, n: int = 2, seed: int = CHECK_SEED) -> np.ndarray:
    """(n, size, size, 3) uint8 images for the self-check when none are given: seeded
    random 4 x 4 colour fields resized bilinearly, plus noise, so every level sees structure."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), np.float64)
        images.append(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8))
    return np.stack(images)


def compare(
    detector: Detector, outputs: dict[str, np.ndarray], torch_scores: Scores
) -> ExportCheck:
    """onnxruntime's ``outputs`` against the torch path's ``torch_scores`` of the same images."""

    def score_error(got: np.ndarray, want: np.ndarray) -> float:
        want = np.asarray(want, np.float64)
        scale = np.maximum(np.abs(want), 1.0)
        return float(np.max(np.abs(np.asarray(got, np.float64) - want) / scale, initial=0.0))

    errors = {
        "score": score_error(outputs["score"], torch_scores.scores),
        "image_score": score_error(outputs["image_score"], torch_scores.image_scores),
        "level_scores": score_error(outputs["level_scores"], torch_scores.level_scores),
    }
    if torch_scores.patch_scores is not None:
        errors["patch_score"] = score_error(outputs["patch_score"], torch_scores.patch_scores)
        want = torch_scores.maps.astype(np.float64)
        peak = np.abs(want).reshape(len(want), -1).max(axis=1)
        diff = np.abs(outputs["map"] - want).reshape(len(want), -1).max(axis=1)
        errors["map"] = float(np.max(diff / np.maximum(peak, 1e-12), initial=0.0))
    calibration = detector.calibration_
    if calibration.has_normalized:
        expected = calibration.normalized(outputs["score"])
        errors["normalized_score"] = float(
            np.max(np.abs(outputs["normalized_score"] - expected), initial=0.0)
        )
    verdicts = np.array_equal(outputs["is_anomaly"], torch_scores.is_anomaly)
    return ExportCheck(len(torch_scores), errors, bool(verdicts))


def export_onnx(
    detector: Detector,
    out: str | os.PathLike,
    check_images: Sequence[ImageSource] | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Export a fitted, calibrated detector to ``out`` (see the module docstring).

    ``check_images`` (paths or arrays, decoded and resized as the torch path does; default:
    two :func:`check_pixels` images) are scored by onnxruntime, as one batch and the first
    alone, and by :meth:`Detector.score`; when any output differs beyond the tolerances,
    OnnxCheckError is raised and ``out`` is left as it was. The file is written atomically.
    """
    import onnx

    detector.check_fitted()
    size = detector.config.image_size
    pixels = _check_batch(detector, check_images)
    graph = ScoringGraph(detector, detector.backbone_module()).eval()
    names = output_names(detector)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        traced = Path(tmp) / out.name
        example = torch.from_numpy(pixels[:1].repeat(2, axis=0))  # batch 2: not specialised
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter: 3 s for Lite0 where torch.export's takes 28 s (and
            # needs onnxscript); both agree with the torch path within 1e-5.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are static
            torch.onnx.export(
                graph,
                (example,),
                str(traced),
                input_names=[INPUT],
                output_names=names,
                dynamic_axes={INPUT: {0: "batch"}, **{name: {0: "batch"} for name in names}},
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        model = onnx.load(str(traced))
        model.doc_string = (
            f"gaussian-ad detector ({detector.describe()}): uint8 (N, {size}, {size}, 3)"
            f" RGB -> {', '.join(names)}"
        )
        onnx.helper.set_model_props(model, onnx_metadata(detector))
        onnx.save(model, str(traced))
        check = self_check(detector, traced, pixels)
        if not check.passed:
            raise OnnxCheckError(
                f"{out}: not written: onnxruntime's outputs differ from the torch path's on "
                f"{check.n_images} images (errors {check.errors}; allowed: scores "
                f"{SCORE_RTOL:g}, maps {MAP_RTOL:g}; same verdicts: {check.verdicts_equal})"
            )
        os.replace(traced, out)
    size_bytes = out.stat().st_size
    logger.info(
        "exported %s (%.1f MB): score error %.2g, map error %s on %d images",
        out,
        size_bytes / 1e6,
        check.score_error,
        "n/a" if check.map_error is None else f"{check.map_error:.2g}",
        check.n_images,
    )
    return ExportResult(out, size_bytes, check)


def self_check(detector: Detector, path: str | os.PathLike, pixels: np.ndarray) -> ExportCheck:
    """Score ``pixels`` with the exported file (as one batch, and the first image alone: the
    batch size is dynamic) and with the torch path; the worse of the two comparisons."""
    sess = session(path)
    want = detector.score(list(pixels), maps=detector.patch_model_ is not None)
    batch = compare(detector, run(sess, pixels), want)
    return batch.worst(compare(detector, run(sess, pixels[:1]), want.take(np.arange(1))))


def _check_batch(detector: Detector, images: Sequence[ImageSource] | None) -> np.ndarray:
    size = detector.config.image_size
    if images is None or len(images) == 0:
        return check_pixels(size)
    return np.stack([decode_resized(image, size) for image in images])
