"""Tabular outputs: score rows and error rows, written atomically as CSV or Parquet."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gaussian_ad.data.images import ImageError
from gaussian_ad.detection.scores import Scores
from gaussian_ad.files import atomic_path


def score_table(paths: Sequence[str], scores: Scores, levels: Sequence[int]) -> pd.DataFrame:
    """One row per scored image: path, score, score_l<level>..., [image_score, patch_score,]
    is_anomaly, normalized_score.

    image_score and patch_score come with a patch model. is_anomaly is missing, not False,
    for a detector without a threshold. normalized_score, in [0, 1], is the fraction of the
    calibration's held-out normal images that scored lower (0.99: above 99% of the good
    training images); NaN without a calibration or with one saved before it kept its
    normals' scores.
    """
    if scores.scores is None:
        raise ValueError(
            "no chosen score: the fused score and standardised levels need a calibrated "
            "detector (refit it, or fit with --sum-levels for the paper's uncalibrated sum)"
        )
    table = pd.DataFrame({"path": list(paths), "score": scores.scores})
    for column, level in enumerate(levels):
        table[f"score_l{level}"] = scores.level_scores[:, column]
    if scores.patch_scores is not None:
        table["image_score"] = scores.image_scores
        table["patch_score"] = scores.patch_scores
    if scores.is_anomaly is None:  # no threshold: unknown, not False
        table["is_anomaly"] = pd.array([pd.NA] * len(table), dtype="boolean")
    else:
        table["is_anomaly"] = scores.is_anomaly
    table["normalized_score"] = (
        np.full(len(table), np.nan) if scores.normalized is None else scores.normalized
    )
    return table


def error_table(errors: Sequence[ImageError]) -> pd.DataFrame:
    """One row per unreadable image: path, reason."""
    return pd.DataFrame({"path": [e.path for e in errors], "reason": [e.reason for e in errors]})


TABLE_FORMATS = (".csv", ".parquet")


def check_table_path(path: str | Path) -> Path:
    """``path`` if it names a table format :func:`write_table` writes, else ValueError."""
    path = Path(path)
    if path.suffix not in TABLE_FORMATS:
        raise ValueError(
            f"{path}: unsupported table format {path.suffix or '(no suffix)'!r} "
            f"(use {' or '.join(TABLE_FORMATS)})"
        )
    return path


def with_error_rows(table: pd.DataFrame, errors: Sequence[ImageError]) -> pd.DataFrame:
    """The score rows followed by one row per unreadable image (path, empty scores, its
    reason), with a ``reason`` column that is empty for the scored rows."""
    table = table.assign(reason="")
    if not errors:
        return table
    table = pd.concat([table, error_table(errors)], ignore_index=True)
    table["is_anomaly"] = table["is_anomaly"].astype("boolean")  # missing for error rows
    return table


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write .csv or .parquet atomically (a temporary file renamed into place; removed if
    the write fails, so that a failed write leaves nothing that looks like a result)."""
    path = check_table_path(path)
    try:
        with atomic_path(path) as tmp:
            if path.suffix == ".parquet":
                table.to_parquet(tmp, index=False)
            else:
                table.to_csv(tmp, index=False)
    except OSError as error:
        if error.filename is None:  # a write error says which file it was writing
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    return path
