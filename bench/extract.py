"""Throughput of feature extraction (a benchmark, not a test).

Generates synthetic images (smooth noise + shapes) in a temp dir, then measures images/s of
(a) ``gaussian_ad.features.extract`` end to end, (b) a plain baseline that decodes each batch
with a thread pool of the same size and then runs the model (no overlap), and (c) the model
alone on pre-decoded, pre-normalised tensors already on the device.

    .venv/bin/python bench/extract.py [--backbone lite0] [--n 200] [--batch-size 32]
        [--workers 2] [--size-src 900] [--format png|jpg] [--random-weights]
        [--timm-name tf_efficientnet_b4 --image-size 380] [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
from PIL import Image, ImageDraw

from gaussian_ad.backbones.models import Backbone, default_device, load_backbone
from gaussian_ad.backbones.specs import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from gaussian_ad.config import LoaderOptions
from gaussian_ad.features.extract import InputNormalizer, extract, forward


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--n", type=int, default=200, help="number of images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decode threads")
    parser.add_argument("--size-src", type=int, default=900, help="side of the source images")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--random-weights", action="store_true", help="skip loading weights")
    parser.add_argument("--timm-name", help="any timm EfficientNet/ResNet (random weights)")
    parser.add_argument("--image-size", type=int, help="input side for --timm-name")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the best counts")
    return parser.parse_args()


def make_image(seed: int, size: int) -> Image.Image:
    """Smooth coloured noise with fine grain and a few random shapes."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    background = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.int16)
    grain = rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(background + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        x1, y1 = (x0, y0) + rng.integers(size // 20, size // 4, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    return image


def write_images(folder: Path, n: int, size: int, fmt: str, workers: int) -> list[Path]:
    paths = [folder / f"{i:05d}.{fmt}" for i in range(n)]

    options = {"quality": 90} if fmt == "jpg" else {}

    def write(i: int) -> None:
        make_image(i, size).save(paths[i], **options)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(write, range(n)))
    return paths


def build_backbone(args: argparse.Namespace, device: torch.device) -> Backbone:
    if args.timm_name is None:
        return load_backbone(args.backbone, pretrained=not args.random_weights, device=device)
    if args.image_size is None:
        raise SystemExit("--timm-name needs --image-size")
    is_efficientnet = "efficientnet" in args.timm_name
    spec = BackboneSpec(
        args.timm_name,
        args.timm_name,
        args.image_size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        9 if is_efficientnet else 5,
    )
    model = timm.create_model(args.timm_name, pretrained=False)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return Backbone(model.to(device, memory_format=memory_format), spec)


def plain_decode(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))


def baseline(backbone: Backbone, paths: Sequence[Path], batch_size: int, workers: int) -> None:
    """Decode a batch with a thread pool, then run the model on it; repeat."""
    device = backbone.device
    normalize = InputNormalizer(backbone, device)
    size = backbone.spec.image_size
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            pixels = np.stack(list(pool.map(lambda p: plain_decode(p, size), batch)))
            forward(backbone, normalize(torch.from_numpy(pixels)))


def model_only(backbone: Backbone, inputs: list[torch.Tensor]) -> None:
    for x in inputs:
        forward(backbone, x)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device) if args.device else default_device()
    backbone = build_backbone(args, device)
    size = backbone.spec.image_size
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"cpu:            {cpu_model()}")
    print(f"cores:          {os.cpu_count()} (usable {usable_cores})")
    print(f"torch threads:  {torch.get_num_threads()}")
    print(f"torch:          {torch.__version__} (timm {timm.__version__}, PIL {PIL.__version__})")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device:         {device}{gpu}")
    print(
        f"backbone:       {backbone.spec.timm_name} @ {size}px, levels {backbone.levels}, "
        f"{'random' if args.random_weights or args.timm_name else 'pretrained'} weights"
    )
    print(
        f"workload:       {args.n} {args.format} images {args.size_src}x{args.size_src}, "
        f"batch {args.batch_size}, {args.workers} decode workers, best of {args.repeats}"
    )

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        paths = write_images(Path(tmp), args.n, args.size_src, args.format, os.cpu_count() or 1)
        mean_kib = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"files:          {mean_kib:.0f} KiB on average")
        warmup = paths[: min(len(paths), 2 * args.batch_size)]

        loader = LoaderOptions(batch_size=args.batch_size, workers=args.workers)

        def run_extract(items: Sequence[Path]) -> None:
            features = extract(backbone, items, loader)
            assert not features.errors, features.errors[:3]

        normalize = InputNormalizer(backbone, device)
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            decoded = np.stack(list(pool.map(lambda p: plain_decode(p, size), paths)))
        inputs = [
            normalize(torch.from_numpy(decoded[start : start + args.batch_size]))
            for start in range(0, len(decoded), args.batch_size)
        ]
        candidates = {
            "(a) extract():": lambda items: run_extract(items),
            "(b) plain baseline:": lambda items: baseline(
                backbone, items, args.batch_size, args.workers
            ),
            "(c) model only:": lambda items: model_only(backbone, inputs[: len(items)]),
        }
        for run in candidates.values():  # warm-up
            run(warmup)
        # Interleaved repeats, best of each: robust against other load on a shared machine.
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(args.repeats):
            for label, run in candidates.items():
                best[label] = min(best[label], timed(lambda run=run: run(paths), device))

    rates = {label: args.n / seconds for label, seconds in best.items()}
    for label, rate in rates.items():
        print(f"{label:<20} {rate:8.1f} images/s")
    rate_a, rate_b, rate_c = rates.values()
    print(f"a/b = {rate_a / rate_b:.2f}   a/c = {rate_a / rate_c:.2f}")


if __name__ == "__main__":
    main()
