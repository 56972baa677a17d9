"""GPU throughput of the backbone pass: model only, and end to end with CPU or GPU decoding.

Self-contained for a bare GPU machine where only torch, timm (with torchvision), numpy and
scikit-learn are installed: it imports nothing of the project but ``gaussian_ad.backbones``
(torch + timm: the frozen Backbone with folded BatchNorm and its 9 mean-pooled levels), needs
no network and uses random weights (throughput does not depend on their values).

Measures EfficientNet-B4 at 380 px under bf16 autocast on channels_last inputs:

- **model only**: a normalised batch already on the GPU;
- **end to end, CPU decoding**: JPEG files -> Pillow decode (draft mode) + bilinear resize in
  a thread pool, a few batches ahead -> pinned uint8 NHWC -> GPU -> normalise -> model;
- **end to end, GPU decoding**: file bytes -> ``torchvision.io.decode_jpeg(device="cuda")``
  (nvJPEG, batched) -> antialiased bilinear resize on the GPU -> normalise -> model.

Each measurement runs for at most ``--seconds`` after a warm-up, so the whole run takes well
under 5 minutes. ``--smoke`` is a tiny setting (small images, a few batches) that also runs
on a CPU-only machine, to check that the script works; its numbers mean nothing.

    bench/gpu.sh [--backbone b4] [--batch-size 64] [--n-images 512] [--seconds 40] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.io import decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gaussian_ad.backbones.models import Backbone, load_backbone  # noqa: E402
from gaussian_ad.backbones.specs import BACKBONES  # noqa: E402

PREFETCH = 3  # batches decoded ahead on the CPU


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="b4", choices=sorted(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=512, help="distinct JPEG files")
    parser.add_argument("--src-size", default="1500x1000", help="JPEG width x height")
    parser.add_argument("--seconds", type=float, default=40.0, help="time per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoders")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny run that works on a CPU")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.n_images, args.src_size, args.seconds = 4, 8, "160x120", 1.0
    return args


def write_jpegs(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """Smooth random colour fields with grain, as JPEG quality 90."""
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]

    def write(i: int) -> None:
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
        grain = rng.integers(-8, 9, smooth.shape, dtype=np.int16)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(paths[i], quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write, range(n)))
    return paths


class Normalizer:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) channels_last, as the project's InputNormalizer."""

    def __init__(self, backbone: Backbone, device: torch.device) -> None:
        std = torch.tensor(backbone.spec.std, device=device)
        mean = torch.tensor(backbone.spec.mean, device=device)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)

    def __call__(self, nhwc: torch.Tensor) -> torch.Tensor:
        return nhwc.permute(0, 3, 1, 2).float() * self.scale + self.shift


def autocast(device: torch.device) -> AbstractContextManager:
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def run_model(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode(), autocast(x.device):
        return [p.float() for p in backbone(x)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[], int], device: torch.device, seconds: float) -> float:
    """Images/s of repeated ``step()`` calls (each returns its image count) after a warm-up."""
    step()
    synchronize(device)
    images, start = 0, time.perf_counter()
    while True:
        images += step()
        if time.perf_counter() - start >= seconds:
            break
    synchronize(device)
    return images / (time.perf_counter() - start)


def cpu_decode(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("RGB", (2 * size, 2 * size))
        rgb = image.convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))


def cpu_batches(
    paths: list[Path], size: int, batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[np.ndarray]:
    """Endless decoded batches, PREFETCH batches ahead."""
    pending: deque = deque()
    position = 0
    while True:
        while len(pending) < PREFETCH:
            chunk = [paths[(position + i) % len(paths)] for i in range(batch_size)]
            position += batch_size
            pending.append([pool.submit(cpu_decode, p, size) for p in chunk])
        yield np.stack([f.result() for f in pending.popleft()])


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    width, height = (int(v) for v in args.src_size.split("x"))
    backbone = load_backbone(args.backbone, pretrained=False, device=device)
    size = 64 if args.smoke else backbone.spec.image_size
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    print(f"gpu: {gpu}; cpu: {platform.processor() or platform.machine()} x {os.cpu_count()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, timm {timm.__version__}"
    )
    print(
        f"{backbone.spec.timm_name} (random weights, BatchNorm folded) at {size} px, levels "
        f"1-{max(backbone.levels)} pooled, batch {args.batch_size}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, channels_last; "
        f"{args.n_images} JPEG {width}x{height}; {args.workers} CPU decode threads; "
        f"{args.seconds:.0f} s per measurement" + (" [SMOKE: numbers mean nothing]" * args.smoke)
    )
    normalize = Normalizer(backbone, device)
    results: dict[str, float] = {}

    fixed = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8)
    x = normalize(fixed.to(device))

    def model_step() -> int:
        run_model(backbone, x)
        return args.batch_size

    results["model only"] = rate(model_step, device, args.seconds)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        paths = write_jpegs(Path(tmp), args.n_images, width, height)
        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            batches = cpu_batches(paths, size, args.batch_size, pool)

            def cpu_step() -> int:
                pixels = torch.from_numpy(next(batches))
                if device.type == "cuda":
                    pixels = pixels.pin_memory()
                run_model(backbone, normalize(pixels.to(device, non_blocking=True)))
                return args.batch_size

            results["end to end, CPU decoding"] = rate(cpu_step, device, args.seconds)

        encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
        position = 0

        def gpu_step() -> int:
            nonlocal position
            chunk = [encoded[(position + i) % len(encoded)] for i in range(args.batch_size)]
            position += args.batch_size
            images = decode_jpeg(chunk, device=device)  # CHW uint8 each, on the device
            resized = [
                F.interpolate(
                    im[None].float(), (size, size), mode="bilinear", antialias=True
                ).round_()
                for im in images
            ]
            nhwc = torch.cat(resized).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            run_model(backbone, normalize(nhwc))
            return args.batch_size

        label = "end to end, GPU decoding" + ("" if device.type == "cuda" else " (on CPU)")
        results[label] = rate(gpu_step, device, args.seconds)

    print(f"\n{'':<34}{'images/s':>10}")
    for name, value in results.items():
        print(f"{name:<34}{value:>10.1f}")
    model_rate = results["model only"]
    for name, value in list(results.items())[1:]:
        print(f"{name}: {value / model_rate:.2f} of model-only throughput")


if __name__ == "__main__":
    sys.exit(main())
