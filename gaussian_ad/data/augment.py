"""Seeded random augmentation for the paper's augmented fit (K passes over train/good).

Photometric (blur or sharpen, contrast, hue, Gaussian noise) and geometric (flips,
90-degree rotations, a small shift-scale-rotate) changes, each switchable per
category: flips are off for categories whose orientation matters (metal_nut, pill,
capsule, screw) and 90-degree rotations for those with an upright layout (transistor).
Every augmented image is a pure function of (seed, row), so a resumed or repeated
extraction produces the same features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

NO_FLIP_CATEGORIES = frozenset({"metal_nut", "pill", "capsule", "screw"})
NO_ROTATE90_CATEGORIES = frozenset({"transistor"})


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and how strong the continuous ones are.

    A plain frozen dataclass; pydantic validates it as a nested field (e.g. the training
    options) and rejects unknown keys (``__pydantic_config__``).
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    flips: bool = True
    rotate90: bool = True
    shift_scale_rotate: bool = True
    photometric: bool = True
    max_shift: float = 0.05  # fraction of the side
    max_scale: float = 0.05  # relative
    max_degrees: float = 10.0
    noise_std: float = 6.0  # on the 0-255 scale

    @classmethod
    def for_category(cls, category: str) -> AugmentConfig:
        """The defaults with the category's switches applied."""
        config = cls()
        if category in NO_FLIP_CATEGORIES:
            config = replace(config, flips=False)
        if category in NO_ROTATE90_CATEGORIES:
            config = replace(config, rotate90=False)
        return config


def augment(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """One random augmentation of an RGB image (same size out)."""
    if config.photometric:
        image = _photometric(image, config, rng)
    if config.flips:
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if config.rotate90:
        image = image.rotate(90 * int(rng.integers(4)))
    if config.shift_scale_rotate:
        image = _shift_scale_rotate(image, config, rng)
    return image


def _photometric(image: Image.Image, config: AugmentConfig, rng: np.random.Generator):
    choice = rng.integers(3)
    if choice == 1:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    elif choice == 2:
        image = ImageEnhance.Sharpness(image).enhance(float(rng.uniform(1.5, 3.0)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-8, 9))) % 256
    rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.float32)
    rgb += rng.normal(0.0, config.noise_std * rng.random(), size=rgb.shape).astype(np.float32)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _shift_scale_rotate(image: Image.Image, config: AugmentConfig, rng: np.random.Generator):
    w, h = image.size
    angle = float(rng.uniform(-config.max_degrees, config.max_degrees))
    scale = float(rng.uniform(1 - config.max_scale, 1 + config.max_scale))
    dx, dy = rng.uniform(-config.max_shift, config.max_shift, size=2) * (w, h)
    # Inverse affine map (output -> input) about the centre; uncovered corners take the
    # image's mean colour rather than black, so no artificial border is learned.
    theta = np.deg2rad(angle)
    cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
    cx, cy = w / 2, h / 2
    a, b = cos, sin
    d, e = -sin, cos
    c = cx - a * (cx + dx) - b * (cy + dy)
    f = cy - d * (cx + dx) - e * (cy + dy)
    fill = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
    return image.transform(
        image.size,
        Image.Transform.AFFINE,
        (a, b, c, d, e, f),
        Image.Resampling.BILINEAR,
        fillcolor=fill,
    )


class SeededAugment:
    """A PIL -> PIL transform whose randomness is fixed by (seed, row)."""

    def __init__(self, config: AugmentConfig, seed: int, row: int):
        self.config = config
        self.seed = seed
        self.row = row

    def __call__(self, image: Image.Image) -> Image.Image:
        return augment(image, self.config, np.random.default_rng([self.seed, self.row]))
