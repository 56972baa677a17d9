"""Scoring throughput: the scoring flow against a bare loop and the model alone.

Run: .venv/bin/python bench/score.py [--n 2000] [--shard-size 256] [--repeats 3] [--workdir DIR]

Three ways over the same images, with the same batch size, run in turn ``--repeats`` times
(medians printed):

- model alone: the images decoded and resized beforehand (not timed), then only the
  normalisation, the backbone's forward pass and the Gaussian scoring, batch by batch
  (the rate issue 13's flow target is set against);
- bare loop: one process reading the tar archive, decoding with the decoding threads and
  calling Detector.score;
- the scoring flow: Prefect (ephemeral API), a local Dask cluster, sharding, a model load
  per worker and atomic Parquet writes.

Per-flow overhead is measured on a 10-image archive: flow wall time minus bare-loop time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from machine import machine_summary  # noqa: E402

from gaussian_ad.backbones.models import cached_backbone  # noqa: E402
from gaussian_ad.config import LoaderOptions  # noqa: E402
from gaussian_ad.data.images import mvtec_manifest  # noqa: E402
from gaussian_ad.data.sources import list_source, read_items  # noqa: E402
from gaussian_ad.data.synthetic import make_dataset  # noqa: E402
from gaussian_ad.detection.detector import Detector  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images in the archive")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    return parser.parse_args()


def make_archive(workdir: Path, n: int) -> tuple[Path, Path]:
    """A synthetic dataset with n train images, its tar, and a model file fitted on 50."""
    root = workdir / f"data-{n}"  # the images of one size of archive
    if not root.exists():
        make_dataset(root, categories=("weave",), n_train=n, n_test_good=2, n_test_per_defect=1)
    records = mvtec_manifest(root, "weave", splits=("train",))
    archive = workdir / f"weave-{n}.tar"
    if not archive.exists():
        with tarfile.open(archive, "w") as tar:
            for r in records:
                tar.add(r.path, arcname=Path(r.path).name)
    model = workdir / f"model-{n}.safetensors"
    if not model.exists():
        Detector().fit([r.path for r in records[:50]]).save(model)
    return archive, model


def small_archive(archive: Path, n: int) -> Path:
    """The first n members of an archive, as another archive."""
    small = archive.with_name(f"small-{n}.tar")
    with tarfile.open(archive) as src, tarfile.open(small, "w") as dst:
        for member in src.getmembers()[:n]:
            dst.addfile(member, src.extractfile(member))
    return small


def bare_loop(archive: Path, model: Path, batch_size: int, workers: int) -> tuple[float, int]:
    """Wall time and rows of: load, list, read, decode and score in one process."""
    cached_backbone.cache_clear()  # the backbone is cached per process: load it in the loop
    started = time.perf_counter()
    detector = Detector.load(model, LoaderOptions(batch_size=batch_size, workers=workers))
    items, _ = list_source(archive)
    pairs = list(read_items(items))
    result = detector.score([c for _, c in pairs], names=[i.name for i, _ in pairs])
    return time.perf_counter() - started, len(result.scores)


def model_alone(archive: Path, model: Path, batch_size: int) -> tuple[float, int]:
    """Wall time and rows of normalise + forward + score (with the patch model's scores when
    the model has one) on images decoded beforehand, with the process settings of a
    library pass (freed memory kept, BLAS single-threaded)."""
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from gaussian_ad.features.extract import InputNormalizer, decode_resized, forward
    from gaussian_ad.features.heap import reuse_freed_memory

    detector = Detector.load(model, LoaderOptions(batch_size=batch_size))
    backbone = detector.backbone_module()
    items, _ = list_source(archive)
    size = backbone.spec.image_size
    pixels = np.stack([decode_resized(content, size) for _, content in read_items(items)])
    normalize = InputNormalizer(backbone, backbone.device)
    rows = 0
    started = time.perf_counter()
    with reuse_freed_memory(), threadpool_limits(1, user_api="blas"):
        for start in range(0, len(pixels), batch_size):
            x = normalize(torch.from_numpy(pixels[start : start + batch_size]))
            pooled, patches = forward(backbone, x, detector.patch_layout_)
            levels = detector.image_levels_of(pooled)
            rows += len(detector.score_features(levels, patches).scores)
    return time.perf_counter() - started, rows


def flow_run(archive: Path, model: Path, out: Path, args: argparse.Namespace) -> tuple[float, int]:
    """Wall time and rows of the scoring flow (fresh output folder)."""
    from gaussian_ad_flows.score import score

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = score(
        str(archive),
        model=str(model),
        out=str(out),
        shard_size=args.shard_size,
        loader=LoaderOptions(batch_size=args.batch_size, workers=args.workers),
        home=str(out.parent / "home"),
    )
    return time.perf_counter() - started, summary["scored"]


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "gaussian-ad-bench-score"
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_summary())
    archive, model = make_archive(workdir, args.n)
    tiny = small_archive(archive, 10)
    print(
        f"archive: {archive} ({args.n} PNG images), shard size {args.shard_size}, "
        f"batch {args.batch_size}, {args.workers} decoding threads"
    )

    flow_run(tiny, model, workdir / "warmup", args)  # starts the ephemeral API once
    bare_loop(tiny, model, args.batch_size, args.workers)  # warm caches
    tiny_bare, _ = bare_loop(tiny, model, args.batch_size, args.workers)
    tiny_flow, _ = flow_run(tiny, model, workdir / "tiny", args)
    model_alone(tiny, model, args.batch_size)  # warm caches
    runs = {
        "model alone (pre-decoded)": lambda: model_alone(archive, model, args.batch_size),
        "bare loop": lambda: bare_loop(archive, model, args.batch_size, args.workers),
        "flow": lambda: flow_run(archive, model, workdir / "out", args),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternating, so that load from elsewhere hits all three
        for name, run in runs.items():
            elapsed, rows = run()
            assert rows == args.n, (name, rows)
            seconds[name].append(elapsed)
    alone_s, bare_s, flow_s = (statistics.median(seconds[name]) for name in runs)

    print(f"medians of {args.repeats} alternating runs (all runs' seconds in brackets):")
    for name, median in zip(runs, (alone_s, bare_s, flow_s), strict=True):
        each = ", ".join(f"{s:.1f}" for s in seconds[name])
        print(f"{name + ':':<27}{median:7.1f} s  {args.n / median:6.1f} images/s  [{each}]")
    print(f"ratio flow / bare (throughput): {bare_s / flow_s:.2f}")
    ratio = alone_s / flow_s
    met = "met" if ratio >= 0.9 else "NOT met"
    print(f"ratio flow / model alone (throughput): {ratio:.2f} (target >= 0.9: {met})")
    print(
        f"per-flow overhead (10 images): {tiny_flow - tiny_bare:.1f} s "
        f"(flow {tiny_flow:.1f} s, bare {tiny_bare:.1f} s)"
    )


if __name__ == "__main__":
    main()
