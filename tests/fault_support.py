"""What the fault-injection tests share: their category, fixtures of two calibrated model
files and of the images they score, and how they read a scoring run's rows back."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from gaussian_ad.config import DetectorConfig
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.data.sources import list_source
from gaussian_ad.detection.detector import Detector

CATEGORY = "grain"


@pytest.fixture(scope="module")
def models(small_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two different calibrated model files of one category (at the images' own 160 px:
    these tests are about faults, not accuracy)."""
    folder = tmp_path_factory.mktemp("models")
    paths = [r.path for r in mvtec_manifest(small_dataset, CATEGORY, splits=("train",))]
    files = []
    for name, levels in (("a", "9"), ("b", "8-9")):
        detector = Detector(DetectorConfig(levels=levels, input_size=160)).fit(paths[:20])
        detector.calibrate(paths[20:])
        files.append(str(detector.save(folder / f"{name}.safetensors")))
    return files[0], files[1]


@pytest.fixture
def source(small_dataset: Path) -> str:
    """The category's test images."""
    return str(small_dataset / CATEGORY / "test")


def read_rows(out: Path) -> pd.DataFrame:
    """Every scored row of a scoring run's output folder."""
    return pd.concat(pd.read_parquet(p) for p in sorted((out / "scores").glob("part-*.parquet")))


def n_images(source: str) -> int:
    """How many images the source lists."""
    return len(list_source(source)[0])
