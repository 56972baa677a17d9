"""Synthetic defects made from normal images: cut-paste, scratch, noise blob, colour stain.

Each covers roughly 0.5-5% of the image and is a pure function of its random generator, so
a validation set of defective copies is reproducible from a seed. Used to choose a
configuration without real defects (:mod:`gaussian_ad.evaluation.selection`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from gaussian_ad.data.images import ImageSource, load_rgb

KINDS = ("cutpaste", "scratch", "noise", "stain")
AREA_RANGE = (0.01, 0.04)  # drawn area fraction of cut-paste patches and blobs


def synthetic_defect(
    image: Image.Image | np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """A defective RGB copy of ``image`` and its (H, W) bool mask; a pure function of ``rng``.

    ``kind``: "cutpaste" (a patch of the image, flipped and brightened or darkened, pasted
    elsewhere), "scratch" (a thin bright or dark polyline), "noise" (a blob of strong noise)
    or "stain" (a soft colour blot). Pixels outside the mask are unchanged.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {list(KINDS)}")
    pixels = np.asarray(load_rgb(image), dtype=np.float32)
    if kind == "cutpaste":
        out, mask = _cutpaste(pixels, rng)
    elif kind == "scratch":
        out, mask = _scratch(pixels, rng)
    elif kind == "noise":
        mask = _blob(pixels.shape[:2], rng) < 1.0
        noise = rng.uniform(0.0, 255.0, size=(int(mask.sum()), 3))
        out = pixels.copy()
        out[mask] = 0.35 * pixels[mask] + 0.65 * noise
    else:
        out, mask = _stain(pixels, rng)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)), mask


def _cutpaste(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = pixels.shape[:2]
    area = rng.uniform(*AREA_RANGE) * h * w
    aspect = rng.uniform(0.5, 2.0)
    ph = int(np.clip(round(math.sqrt(area * aspect)), 2, h // 2))
    pw = int(np.clip(round(area / ph), 2, w // 2))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    # The target lies at least half a patch away from the source along some axis.
    ty, tx = sy, sx
    while abs(ty - sy) < ph // 2 and abs(tx - sx) < pw // 2:
        ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = pixels[sy : sy + ph, sx : sx + pw]
    flips = [axis for axis in (0, 1) if rng.random() < 0.5]
    if flips:
        patch = np.flip(patch, axis=flips)
    brightness = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.4) + 1.0
    out = pixels.copy()
    out[ty : ty + ph, tx : tx + pw] = patch * brightness
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return out, mask


def _scratch(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = pixels.shape[:2]
    side = min(h, w)
    n_points = int(rng.integers(3, 6))
    step = rng.uniform(0.3, 0.6) * side / (n_points - 1)
    turns = np.cumsum(rng.normal(0.0, 0.5, size=n_points - 1)) + rng.uniform(0, 2 * np.pi)
    start = rng.uniform(0.2, 0.8, size=2) * (w, h)
    steps = step * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    points = np.vstack([start, start + np.cumsum(steps, axis=0)])
    points = np.clip(points, 0, (w - 1, h - 1))
    width = max(2, round(side * rng.uniform(0.015, 0.025)))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    value = rng.uniform(225, 255) if rng.random() < 0.5 else rng.uniform(0, 30)
    out = pixels.copy()
    out[mask] = value + rng.normal(0.0, 4.0, size=(int(mask.sum()), 3))
    return out, mask


def _stain(pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    radius = _blob(pixels.shape[:2], rng)
    mask = radius < 1.0
    # A colour far from the region's mean, blended in with a peak opacity fading to the rim.
    shift = rng.choice([-1.0, 1.0], size=3) * rng.uniform(60, 120, size=3)
    colour = np.clip(pixels[mask].mean(axis=0) + shift, 0, 255)
    alpha = rng.uniform(0.5, 0.85) * np.clip(1.0 - radius**2, 0.0, None)[..., None]
    return pixels * (1.0 - alpha) + colour * alpha, mask


def _blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) normalised radius of a random wobbly ellipse: < 1 inside."""
    h, w = shape
    radius = math.sqrt(rng.uniform(*AREA_RANGE) * h * w / math.pi)
    aspect = rng.uniform(0.6, 1.6)
    cy, cx = rng.uniform(0.15, 0.85, size=2) * (h, w)
    angle = rng.uniform(0, np.pi)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius / math.sqrt(aspect))
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / (radius * math.sqrt(aspect))
    theta = np.arctan2(v, u)
    wobble = 1.0 + 0.15 * np.sin(3 * theta + phases[0]) + 0.1 * np.sin(5 * theta + phases[1])
    return np.hypot(u, v) / wobble


def validation_set(
    paths: Sequence[ImageSource],
    n_per_kind: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
    size: int | None = None,
) -> tuple[list[Image.Image], np.ndarray, list[np.ndarray]]:
    """(images, labels, masks): the normals (label 0) and ``n_per_kind`` defective copies
    (label 1) per kind, made from the normals in turn.

    ``size`` resizes the normals (bilinear, square) first, so defects are drawn at the
    model's input resolution. Copy i of kind k is a pure function of (seed, k, i).
    Raises ImageDecodeError for an unreadable normal.
    """
    if not paths:
        raise ValueError("need at least one normal image to build a validation set")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown defect kinds {unknown}; choose from {list(KINDS)}")
    normals = [load_rgb(path) for path in paths]
    if size is not None:
        normals = [image.resize((size, size), Image.Resampling.BILINEAR) for image in normals]
    images = list(normals)
    masks = [np.zeros(image.size[::-1], dtype=bool) for image in normals]
    for position, kind in enumerate(kinds):
        for i in range(n_per_kind):
            rng = np.random.default_rng([seed, KINDS.index(kind), i])
            base = normals[(position * n_per_kind + i) % len(normals)]
            image, mask = synthetic_defect(base, kind, rng)
            images.append(image)
            masks.append(mask)
    labels = np.repeat([0, 1], [len(normals), len(images) - len(normals)])
    return images, labels, masks
