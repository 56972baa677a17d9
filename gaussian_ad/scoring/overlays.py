"""Anomaly-map overlays: a map coloured onto its image, written as PNG under a folder."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from matplotlib import colormaps
from PIL import Image

from gaussian_ad.data.images import ImageSource, load_rgb
from gaussian_ad.detection.scores import Scores
from gaussian_ad.stats.fusion import Standardizer

MAP_ALPHA = 0.5


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, value_range: tuple[float, float]
) -> Image.Image:
    """``image`` with its anomaly map resized onto it, coloured (jet) from ``value_range``
    (low: transparent blue, high: red) and blended at ``MAP_ALPHA``."""
    low, high = value_range
    heat = Image.fromarray(np.nan_to_num(np.asarray(anomaly_map, np.float32), nan=low))
    heat = np.asarray(heat.resize(image.size, Image.Resampling.BILINEAR))
    normalised = np.clip((heat - low) / max(high - low, 1e-12), 0.0, 1.0)
    colored = (colormaps["jet"](normalised)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(colored), MAP_ALPHA)


def overlay_name(folder: str, name: str) -> str:
    """A safe relative file name for an image's overlay, ``<folder>/<tail>-<hash>.png``.

    ``tail`` keeps the last three parts of the image's name (an archive member's path, or
    the defect folder and file of a path) with characters outside [A-Za-z0-9._-] replaced,
    so the file stays inside the output folder whatever the name; the hash of the full name
    keeps names that look alike apart.
    """
    path = PurePosixPath(name.replace("\\", "/").replace("!", "/"))
    parts = [*path.parent.parts[-2:], path.stem]
    tail = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in parts if part != "/")
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{folder}/{tail.strip('._') or 'image'}-{digest}.png"


def write_overlay(
    source: ImageSource,
    anomaly_map: np.ndarray,
    path: str | Path,
    normal: Standardizer | None = None,
) -> Path:
    """The image with its map overlaid, at the image's size, written atomically as PNG.

    The colour scale runs from the held-out normals' mean map maximum (``normal``, the
    detector's standardiser) to the larger of this map's maximum and that mean plus three
    standard deviations; without ``normal``, from the map's own minimum to its maximum.
    """
    low = float(anomaly_map.min()) if normal is None else normal.patch_mean
    spread = 0.0 if normal is None else 3 * normal.patch_std
    high = max(float(anomaly_map.max()), low + spread)
    image = overlay(load_rgb(source), anomaly_map, (low, high))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def write_overlays(
    scores: Scores,
    sources: Sequence[ImageSource],
    names: Sequence[str],
    out: str | Path,
    folder: str,
    normal: Standardizer | None = None,
) -> dict[int, str]:
    """Overlays of the images flagged anomalous in ``scores`` (returned with ``maps``),
    under ``out/folder``; returns input position -> file name relative to ``out``."""
    if scores.maps is None:
        raise ValueError("no anomaly maps in these scores: score with maps=True")
    written: dict[int, str] = {}
    if scores.is_anomaly is None:
        return written
    for row in np.flatnonzero(scores.is_anomaly):
        position = int(scores.index[row])
        written[position] = overlay_name(folder, names[position])
        write_overlay(sources[position], scores.maps[row], Path(out) / written[position], normal)
    return written
