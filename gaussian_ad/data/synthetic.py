"""A seeded generator of a small MVTec AD-layout dataset, for tests and demos.

Three categories: ``weave`` (a plain-woven fabric), ``grain`` (a wood-grain surface) and
``disc`` (a machined washer with four bolt holes on a dark background). Normal images vary in
lighting (gain and a linear gradient), texture phase and warp, small rotations and shifts of the
part, and sensor noise. Defects are drawn on the reflectance before lighting and noise, inside a
hard-edged region that is exactly the ground-truth mask; each covers roughly 1-5% of the image
so that whole-image (mean-pooled) features can see it.

Every image has its own random stream derived from (seed, category, split, defect, index), so
an image does not change when other counts change, and two runs write identical bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES: tuple[str, ...] = ("weave", "grain", "disc")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "weave": ("cut", "hole", "stain"),
    "grain": ("hole", "scratch", "stain"),
    "disc": ("missing", "scratch", "stain"),
}
_MARKER = ".gaussian_ad_synthetic"
_STAIN_COLOURS = np.array(
    [[0.22, 0.13, 0.05], [0.12, 0.22, 0.55], [0.60, 0.18, 0.08]], dtype=np.float32
)

Rgb = np.ndarray  # HxWx3 float32 reflectance in [0, 1]


@dataclass
class _Scene:
    """A defect-free rendering plus what defects need to know about it."""

    image: Rgb
    yy: np.ndarray
    xx: np.ndarray
    scale: float  # size / 256: all lengths below are in 256-pixel units times this
    part: np.ndarray | None = None  # alpha of the part (disc); None for textures
    background: Rgb | None = None  # what lies under the part
    centre: tuple[float, float] = (0.0, 0.0)
    radii: tuple[float, float] = (0.0, 0.0)  # inner and outer radius of the part


def make_dataset(
    out_dir: str | os.PathLike,
    categories: tuple[str, ...] | list[str] = CATEGORIES,
    *,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_per_defect: int = 6,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the MVTec AD layout and return ``out_dir``.

    For each category: ``train/good/000.png ...``, ``test/good/*.png``,
    ``test/<defect>/*.png`` for every defect in :data:`DEFECT_TYPES` and binary (0/255, mode L)
    masks at ``ground_truth/<defect>/<stem>_mask.png``. A category folder left by an earlier
    call is replaced; any other existing, non-empty category folder raises FileExistsError.
    """
    unknown = [c for c in categories if c not in DEFECT_TYPES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {list(CATEGORIES)}")
    if min(n_train, n_test_good, n_test_per_defect) < 0 or n_train < 1:
        raise ValueError("n_train must be >= 1 and the test counts >= 0")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    out = Path(out_dir)
    for category in categories:
        _check_replaceable(out / category)
    jobs = []
    for category in categories:
        _fresh_category_dir(out / category, seed, size)
        jobs += [(category, "train", "good", i) for i in range(n_train)]
        jobs += [(category, "test", "good", i) for i in range(n_test_good)]
        jobs += [
            (category, "test", defect, i)
            for defect in DEFECT_TYPES[category]
            for i in range(n_test_per_defect)
        ]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def write(job: tuple[str, str, str, int]) -> None:
        category, split, defect, index = job
        rng = _image_rng(seed, category, split, defect, index)
        image, mask = _render(category, None if defect == "good" else defect, yy, xx, rng)
        _save_png(image, out / category / split / defect / f"{index:03d}.png")
        if mask is not None:
            mask_png = mask.astype(np.uint8) * np.uint8(255)
            _save_png(mask_png, out / category / "ground_truth" / defect / f"{index:03d}_mask.png")

    # Images are independent (own random stream, own file), so threads keep the output exact.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, jobs))
    return out


def _check_replaceable(category_dir: Path) -> None:
    """Refuse to overwrite a non-empty folder that make_dataset did not write."""
    if (
        category_dir.exists()
        and any(category_dir.iterdir())
        and not (category_dir / _MARKER).is_file()
    ):
        raise FileExistsError(
            f"{category_dir} exists and was not written by make_dataset; "
            "choose an empty output folder"
        )


def _fresh_category_dir(category_dir: Path, seed: int, size: int) -> None:
    """Create an empty category folder, replacing one that this module wrote before."""
    if category_dir.exists():
        shutil.rmtree(category_dir)
    category_dir.mkdir(parents=True, exist_ok=True)
    (category_dir / _MARKER).write_text(f"gaussian_ad.data.synthetic seed={seed} size={size}\n")


def _image_rng(
    seed: int, category: str, split: str, defect: str, index: int
) -> np.random.Generator:
    key = zlib.crc32(f"{category}/{split}/{defect}".encode())
    return np.random.default_rng([seed, key, index])


def _save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _render(
    category: str,
    defect: str | None,
    yy: np.ndarray,
    xx: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One uint8 RGB image and, for a defect, its boolean mask, on pixel grids yy and xx."""
    size = yy.shape[0]
    scene = _SCENES[category](rng, yy, xx, size / 256)
    image, mask = scene.image, None
    if defect is not None:
        image, mask = _DEFECTS[defect](scene, rng)
    image = image * _lighting(rng, yy / size - 0.5, xx / size - 0.5)
    image = image + rng.uniform(0.008, 0.02) * rng.standard_normal(image.shape, np.float32)
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


# --- normal appearance ---------------------------------------------------------------------


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Periodic Gaussian-filtered white noise (filtered by FFT), unit standard deviation."""
    sigma_y, sigma_x = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (2,))
    freq_y = np.fft.fftfreq(shape[0])[:, None]
    freq_x = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2 * np.pi**2 * ((sigma_y * freq_y) ** 2 + (sigma_x * freq_x) ** 2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * transfer, s=shape)
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _jitter(rng: np.random.Generator, colour: tuple[float, float, float], amount: float) -> Rgb:
    return (np.asarray(colour) + rng.uniform(-amount, amount, 3)).astype(np.float32)


def _lighting(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Overall gain times a gentle linear gradient, as an HxWx1 factor."""
    gain = rng.uniform(0.9, 1.1)
    gy, gx = rng.uniform(-0.08, 0.08, 2).tolist()
    return (gain * (1.0 + gy * y + gx * x))[..., None]


def _rotated(yy: np.ndarray, xx: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return -xx * s + yy * c, xx * c + yy * s


def _weave(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, scale: float) -> _Scene:
    """Plain weave: threads alternate over and under at every crossing."""
    period = 16 * scale * rng.uniform(0.97, 1.03)
    v, u = _rotated(yy, xx, rng.uniform(-3, 3))
    u = u / period + rng.uniform(0, 2)
    v = v / period + rng.uniform(0, 2)
    fu, fv = u % 1.0, v % 1.0
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    warp_shade = np.sqrt(np.sin(np.pi * fu)) * (0.7 + 0.3 * np.sin(np.pi * fv))
    weft_shade = np.sqrt(np.sin(np.pi * fv)) * (0.7 + 0.3 * np.sin(np.pi * fu))
    shade = np.where(warp_on_top, warp_shade, weft_shade)
    fibres = _smooth_noise(rng, yy.shape, 0.8 * scale)
    warp = _jitter(rng, (0.80, 0.72, 0.56), 0.02)
    weft = _jitter(rng, (0.66, 0.58, 0.45), 0.02)
    colour = np.where(warp_on_top[..., None], warp, weft)
    image = colour * ((0.18 + 0.82 * shade) * (1 + 0.06 * fibres))[..., None]
    return _Scene(image, yy, xx, scale)


def _grain(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, scale: float) -> _Scene:
    """Wood: warped growth rings across the board and fine fibres along it."""
    period = 18 * scale * rng.uniform(0.9, 1.1)
    across, _ = _rotated(yy, xx, rng.uniform(-4, 4))
    warp = 0.6 * _smooth_noise(rng, yy.shape, 32 * scale)
    warp += 0.15 * _smooth_noise(rng, yy.shape, 6 * scale)
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * (across / period + warp + rng.uniform(0, 1)))) ** 2.5
    fibres = _smooth_noise(rng, yy.shape, (0.6 * scale, 10 * scale))
    light = _jitter(rng, (0.82, 0.62, 0.40), 0.02)
    dark = _jitter(rng, (0.52, 0.33, 0.17), 0.02)
    image = light + (dark - light) * rings[..., None]
    image = image * (1 + 0.07 * fibres)[..., None]
    return _Scene(image, yy, xx, scale)


def _disc(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, scale: float) -> _Scene:
    """A turned-metal washer with four bolt holes, slightly shifted and rotated."""
    size = yy.shape[0]
    cy, cx = (size / 2 + rng.uniform(-6, 6, 2) * scale).tolist()
    r_in, r_out = 0.14 * size, 0.36 * size
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    part = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    rotation = np.deg2rad(rng.uniform(-8, 8))
    bolt_r, bolt_ring = 0.035 * size, 0.25 * size
    for k in range(4):
        angle = rotation + k * np.pi / 2
        d = np.hypot(yy - cy - bolt_ring * np.sin(angle), xx - cx - bolt_ring * np.cos(angle))
        part *= np.clip(d - bolt_r + 0.5, 0, 1)

    edge = np.minimum(r_out - r, r - r_in)
    bevel = np.clip(edge / (4 * scale), 0.0, 1.0)
    highlight = 0.14 * np.cos(2 * (theta - rng.uniform(0, np.pi)))
    turning = 0.03 * np.sin(2 * np.pi * r / (3 * scale))
    metal = (0.55 + highlight + turning) * (0.7 + 0.3 * bevel)
    metal = metal[..., None] * _jitter(rng, (1.0, 1.0, 1.03), 0.02)

    background = _jitter(rng, (0.12, 0.13, 0.15), 0.01)
    background = background + 0.02 * _smooth_noise(rng, yy.shape, 3 * scale)[..., None]
    image = background + (metal - background) * part[..., None]
    return _Scene(image, yy, xx, scale, part, background, (cy, cx), (r_in, r_out))


_SCENES = {"weave": _weave, "grain": _grain, "disc": _disc}


# --- defects -------------------------------------------------------------------------------


def _site(scene: _Scene, rng: np.random.Generator) -> tuple[float, float, float]:
    """A defect centre and a direction: anywhere central on a texture, on the disc's ring."""
    size = scene.yy.shape[0]
    if scene.part is None:
        cy, cx = (rng.uniform(0.25, 0.75, 2) * size).tolist()
        return cy, cx, rng.uniform(0, np.pi)
    angle = rng.uniform(0, 2 * np.pi)
    radius = 0.5 * sum(scene.radii)
    cy = scene.centre[0] + radius * float(np.sin(angle))
    cx = scene.centre[1] + radius * float(np.cos(angle))
    return cy, cx, angle + np.pi / 2  # tangent to the ring


def _on_part(scene: _Scene, region: np.ndarray) -> np.ndarray:
    """Restrict a region to the part (a no-op for textures)."""
    return region if scene.part is None else region & (scene.part > 0.5)


def _blob(
    scene: _Scene, rng: np.random.Generator, cy: float, cx: float, radius: float
) -> np.ndarray:
    """Normalised radius of an irregular blob: < 1 inside."""
    dy, dx = scene.yy - cy, scene.xx - cx
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in (2, 3, 4):
        outline += rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) / (radius * outline)


def _curve_distance(scene: _Scene, points: np.ndarray, reach: float) -> np.ndarray:
    """Distance of every pixel to a polyline of (y, x) points; inf beyond ``reach``."""
    size = scene.yy.shape[0]
    low = np.clip(np.floor(points.min(0) - reach), 0, size).astype(int)
    high = np.clip(np.ceil(points.max(0) + reach) + 1, 0, size).astype(int)
    window = (slice(low[0], high[0]), slice(low[1], high[1]))
    pixel = np.stack([scene.yy[window], scene.xx[window]])[None]
    start, end = points[:-1, :, None, None], points[1:, :, None, None]
    seg = end - start
    t = ((pixel - start) * seg).sum(1) / np.maximum((seg**2).sum(1), 1e-9)
    nearest = start + seg * np.clip(t, 0, 1)[:, None]
    distance = np.full(scene.yy.shape, np.inf, np.float32)
    distance[window] = np.sqrt(((pixel - nearest) ** 2).sum(1)).min(0)
    return distance


def _stroke(scene: _Scene, rng: np.random.Generator, length: float, reach: float) -> np.ndarray:
    """Distance to a gently curved stroke (quadratic Bezier) through a defect site."""
    cy, cx, direction = _site(scene, rng)
    half = 0.5 * length * np.array([np.sin(direction), np.cos(direction)])
    centre = np.array([cy, cx])
    bend = rng.uniform(-0.15, 0.15) * length * np.array([np.cos(direction), -np.sin(direction)])
    t = np.linspace(0, 1, 17)[:, None]
    a, b, c = centre - half, centre + bend, centre + half
    return _curve_distance(scene, (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c, reach)


def _scratch(scene: _Scene, rng: np.random.Generator) -> tuple[Rgb, np.ndarray]:
    """A thin bright (or, on metal, sometimes dark) line."""
    width = max(rng.uniform(4, 6) * scene.scale, 1.5)
    length = rng.uniform(0.4, 0.6) * scene.yy.shape[0]
    region = _on_part(scene, _stroke(scene, rng, length, width) < width / 2)
    if scene.part is None:
        colour = np.array([0.95, 0.88, 0.74], np.float32)
    else:
        colour = np.full(3, 0.95 if rng.random() < 0.5 else 0.12, np.float32)
    return _paint(scene.image, region, colour, 0.85), region


def _hole(scene: _Scene, rng: np.random.Generator) -> tuple[Rgb, np.ndarray]:
    """An irregular dark opening with a darkened rim."""
    cy, cx, _ = _site(scene, rng)
    blob = _blob(scene, rng, cy, cx, rng.uniform(14, 20) * scene.scale)
    region = _on_part(scene, blob < 1)
    image = scene.image.copy()
    rim = region & (blob >= 0.7)
    image[rim] *= 0.5
    inside = region & (blob < 0.7)
    image[inside] = 0.05 + 0.02 * rng.standard_normal((int(inside.sum()), 1), np.float32)
    return image, region


def _stain(scene: _Scene, rng: np.random.Generator) -> tuple[Rgb, np.ndarray]:
    """A translucent colour blot that keeps the texture underneath visible."""
    cy, cx, _ = _site(scene, rng)
    radius = rng.uniform(20, 30) * scene.scale * (0.8 if scene.part is not None else 1.0)
    region = _on_part(scene, _blob(scene, rng, cy, cx, radius) < 1)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
    luminance = scene.image.mean(-1, keepdims=True)
    strength = np.clip(0.65 + 0.1 * _smooth_noise(rng, region.shape, 4 * scene.scale), 0.45, 0.85)
    stained = scene.image + (colour * (0.6 + 0.8 * luminance) - scene.image) * strength[..., None]
    return np.where(region[..., None], stained, scene.image), region


def _cut(scene: _Scene, rng: np.random.Generator) -> tuple[Rgb, np.ndarray]:
    """A slit through the fabric: a ragged dark gap that interrupts the threads."""
    width = max(rng.uniform(4, 7) * scene.scale, 2.0)
    length = rng.uniform(0.35, 0.55) * scene.yy.shape[0]
    distance = _stroke(scene, rng, length, width)
    ragged = np.clip(1 + 0.3 * _smooth_noise(rng, distance.shape, 1.5 * scene.scale), 0.5, 1.8)
    region = _on_part(scene, distance < width / 2 * ragged)
    return _paint(scene.image, region, np.full(3, 0.06, np.float32), 1.0), region


def _missing(scene: _Scene, rng: np.random.Generator) -> tuple[Rgb, np.ndarray]:
    """A piece broken off the part's outer edge, showing the background."""
    angle = rng.uniform(0, 2 * np.pi)
    cy = scene.centre[0] + scene.radii[1] * float(np.sin(angle))
    cx = scene.centre[1] + scene.radii[1] * float(np.cos(angle))
    chip = _blob(scene, rng, cy, cx, rng.uniform(0.10, 0.14) * scene.yy.shape[0]) < 1
    region = chip & (scene.part > 0)
    return np.where(region[..., None], scene.background, scene.image), region


def _paint(image: Rgb, region: np.ndarray, colour: np.ndarray, strength: float) -> Rgb:
    return np.where(region[..., None], image + (colour - image) * strength, image)


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "cut": _cut, "missing": _missing}
