"""Anomaly-map overlays: a map coloured onto its image, with a legend, written as PNG.

Each written overlay is the image with its map blended on it, at the image's size in the
top-left corner, above a legend panel: the verdict ("ANOMALY" / "normal") with the score
and the threshold, the normalised score (the fraction of the good held-out training images
that scored lower), and a colour bar labelled with the map values at its ends. With a
calibrated detector the colour scale is fixed per model (see :func:`map_range`), so an
all-blue map means nothing in the image is locally abnormal, whatever made it flagged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gaussian_ad.data.images import ImageSource, load_rgb
from gaussian_ad.detection.scores import Scores
from gaussian_ad.files import atomic_path
from gaussian_ad.stats.fusion import Standardizer

MAP_ALPHA = 0.5
SCALE_SDS = 3.0
"""The fixed colour scale spans this many standard deviations of the normals' map maxima."""
MIN_WIDTH = 360
"""The narrowest legend (pixels): a narrower image is padded on its right."""
PANEL = (32, 32, 32)
TEXT = (235, 235, 235)
VERDICT_COLOURS = {True: (240, 60, 60), False: (80, 210, 80), None: (170, 170, 170)}


@dataclass(frozen=True)
class Verdict:
    """What an overlay's legend says about its image.

    ``normalized`` is the fraction of the calibration's good held-out images that scored
    lower (None when the calibration has no normal scores); ``threshold`` and
    ``is_anomaly`` are None for a detector without a threshold.
    """

    score: float
    threshold: float | None = None
    normalized: float | None = None
    is_anomaly: bool | None = None


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, value_range: tuple[float, float]
) -> Image.Image:
    """``image`` with its anomaly map resized onto it, coloured (jet) from ``value_range``
    (low: transparent blue, high: red) and blended at ``MAP_ALPHA``."""
    low, high = value_range
    heat = Image.fromarray(np.nan_to_num(np.asarray(anomaly_map, np.float32), nan=low))
    heat = np.asarray(heat.resize(image.size, Image.Resampling.BILINEAR))
    normalised = np.clip((heat - low) / max(high - low, 1e-12), 0.0, 1.0)
    colored = jet(normalised)
    return Image.blend(image.convert("RGB"), Image.fromarray(colored), MAP_ALPHA)


def jet(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of matplotlib's jet colormap at ``values`` in [0, 1] (shape + (3,)).

    Matplotlib is imported here, not with the module: a scoring run that writes no overlays
    does not pay its import.
    """
    from matplotlib import colormaps

    return (colormaps["jet"](values)[..., :3] * 255).astype(np.uint8)


def map_range(
    anomaly_map: np.ndarray, normal: Standardizer | None = None
) -> tuple[float, float, bool]:
    """(low, high, fixed): the colour scale of an overlay.

    With ``normal`` (the calibration's standardiser) the scale is fixed per model: from
    the held-out normal images' mean map maximum (blue: no hotter than the hottest spot of
    a typical good image) to that mean plus ``SCALE_SDS`` standard deviations (red: beyond
    what good images reach); values outside are clipped. Without it, the map's own
    minimum to maximum (``fixed`` False), which says nothing across images.
    """
    if normal is not None:
        return normal.patch_mean, normal.patch_mean + SCALE_SDS * normal.patch_std, True
    values = np.asarray(anomaly_map, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0, False
    return float(values.min()), float(values.max()), False


def _lines(verdict: Verdict | None) -> list[tuple[str, tuple[int, int, int]]]:
    """The legend's text lines above the colour bar, with their colours."""
    if verdict is None:
        return []
    if verdict.threshold is None:
        head = f"no threshold   score {verdict.score:.4g}"
    else:
        word = "ANOMALY" if verdict.is_anomaly else "normal"
        sign = ">" if verdict.is_anomaly else "<="
        head = f"{word}   score {verdict.score:.4g} {sign} threshold {verdict.threshold:.4g}"
    if verdict.normalized is None or not np.isfinite(verdict.normalized):
        normalized = "normalised score n/a (no calibration normals kept)"
    elif verdict.normalized == 1.0:
        normalized = "normalised 1.000: above all good training images"
    else:
        below = np.floor(1000 * verdict.normalized) / 10  # rounded down: "above" stays true
        normalized = (
            f"normalised {verdict.normalized:.4f}: above {below:.1f}% of good training images"
        )
    return [(head, VERDICT_COLOURS[verdict.is_anomaly]), (normalized, TEXT)]


def legend(
    width: int, value_range: tuple[float, float], fixed: bool, verdict: Verdict | None = None
) -> Image.Image:
    """The legend panel, ``width`` pixels wide: the verdict's text lines, then a jet colour
    bar over ``value_range`` with its end values and whether the scale is fixed."""
    size = max(11, width // 36)
    font, pad, line = ImageFont.load_default(size=size), size // 2, round(size * 1.35)
    lines = _lines(verdict)
    bar_top = pad + line * len(lines)
    height = bar_top + size + line + pad
    panel = Image.new("RGB", (width, height), PANEL)
    draw = ImageDraw.Draw(panel)
    for row, (text, colour) in enumerate(lines):
        draw.text((pad, pad + row * line), text, fill=colour, font=font)
    span = width - 2 * pad
    ramp = jet(np.linspace(0.0, 1.0, span))
    panel.paste(Image.fromarray(np.repeat(ramp[None], size, axis=0)), (pad, bar_top))
    low, high = value_range
    labels_top = bar_top + size + (line - size) // 2
    scale = f"good-image peak .. +{SCALE_SDS:g} sd (per model)" if fixed else "this image's range"
    draw.text((pad, labels_top), f"{low:.4g}", fill=TEXT, font=font)
    draw.text((width // 2, labels_top), scale, fill=TEXT, font=font, anchor="ma")
    draw.text((width - pad, labels_top), f"{high:.4g}", fill=TEXT, font=font, anchor="ra")
    return panel


def annotated(
    image: Image.Image,
    anomaly_map: np.ndarray,
    normal: Standardizer | None = None,
    verdict: Verdict | None = None,
) -> Image.Image:
    """The overlay of ``anomaly_map`` on ``image`` (top left, at the image's size) above
    its :func:`legend`; the canvas is at least ``MIN_WIDTH`` wide."""
    low, high, fixed = map_range(anomaly_map, normal)
    top = overlay(image, anomaly_map, (low, high))
    width = max(top.width, MIN_WIDTH)
    panel = legend(width, (low, high), fixed, verdict)
    canvas = Image.new("RGB", (width, top.height + panel.height), PANEL)
    canvas.paste(top, (0, 0))
    canvas.paste(panel, (0, top.height))
    return canvas


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
    verdict: Verdict | None = None,
) -> Path:
    """The image with its map overlaid above its legend (:func:`annotated`), written
    atomically as PNG.

    ``normal`` (the detector's standardiser) fixes the colour scale per model (see
    :func:`map_range`); ``verdict`` is the legend's text.
    """
    image = annotated(load_rgb(source), anomaly_map, normal, verdict)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def write_overlays(
    scores: Scores,
    sources: Sequence[ImageSource],
    names: Sequence[str],
    out: str | Path,
    folder: str,
    normal: Standardizer | None = None,
    threshold: float | None = None,
    every: bool = False,
) -> dict[int, str]:
    """Overlays of the images flagged anomalous in ``scores`` (returned with ``maps``), or
    with ``every`` of all of them (what a good part's map looks like), under
    ``out/folder``, each with its score, normalised score and ``threshold`` in its legend;
    returns input position -> file name relative to ``out``."""
    if scores.maps is None:
        raise ValueError("no anomaly maps in these scores: score with maps=True")
    written: dict[int, str] = {}
    if scores.is_anomaly is None or scores.scores is None:
        return written
    rows = np.arange(len(scores)) if every else np.flatnonzero(scores.is_anomaly)
    for row in rows:
        position = int(scores.index[row])
        verdict = Verdict(
            score=float(scores.scores[row]),
            threshold=threshold,
            normalized=None if scores.normalized is None else float(scores.normalized[row]),
            is_anomaly=bool(scores.is_anomaly[row]),
        )
        written[position] = overlay_name(folder, names[position])
        path = Path(out) / written[position]
        write_overlay(sources[position], scores.maps[row], path, normal, verdict)
    return written
