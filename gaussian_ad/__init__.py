"""gaussian-ad: a multivariate Gaussian on pretrained deep features for anomaly detection.

The library (no Prefect imports), in subpackages by concern:

- ``stats``: the numpy-only statistical core (moments, GaussianAD, PatchGaussian,
  thresholds, calibration, metrics);
- ``backbones``: supported architectures, level taps, offline weight resolution;
- ``data``: image decoding, manifests, scoring sources, synthetic data and defects;
- ``features``: pooled and patch features from one backbone pass, store shards;
- ``store``: the Zarr feature store, out-of-core reductions, training plans;
- ``detection``: the Detector (fit, calibrate, score) and its Scores;
- ``scoring``: score tables, map overlays, scoring-run shards;
- ``evaluation``: evaluation, configuration selection, the HTML report;
- ``export``: the detector as one ONNX graph, and scoring with it in onnxruntime;
- ``registry``: MLflow models, versions, aliases and promotion.

The names below are imported lazily, so ``import gaussian_ad`` stays cheap (no torch).

Examples
--------
>>> from gaussian_ad import DetectorConfig
>>> DetectorConfig(levels="7").levels
(7,)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GaussianAD": "gaussian_ad.stats.gaussian",
    "PatchGaussian": "gaussian_ad.stats.patch_gaussian",
    "Detector": "gaussian_ad.detection.detector",
    "Scores": "gaussian_ad.detection.scores",
    "load_backbone": "gaussian_ad.backbones.models",
    "DetectorConfig": "gaussian_ad.config",
    "LoaderOptions": "gaussian_ad.config",
}
__all__ = [
    "Detector",
    "DetectorConfig",
    "GaussianAD",
    "LoaderOptions",
    "PatchGaussian",
    "Scores",
    "load_backbone",
]

if TYPE_CHECKING:
    from gaussian_ad.backbones.models import load_backbone
    from gaussian_ad.config import DetectorConfig, LoaderOptions
    from gaussian_ad.detection.detector import Detector
    from gaussian_ad.detection.scores import Scores
    from gaussian_ad.stats.gaussian import GaussianAD
    from gaussian_ad.stats.patch_gaussian import PatchGaussian


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gaussian_ad' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
