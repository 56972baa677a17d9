"""Patch-level Gaussian: accuracy, speed and fit memory (a benchmark, not a test).

On a synthetic MVTec-layout dataset (3 categories, outside the git tree), per category: fit on
4/5 of train/good, standardise on the held-out 1/5, score test/. Reports image AUROC of the
image-level model (GaussianAD, pooled levels 1-9), the patch-level model (maximum of the
anomaly map, levels 3-5) and their fusion, pixel AUROC and AU-PRO (FPR <= 0.3) of the maps,
and wall times: image-level alone (backbone to level 9, pooled), patch-level alone (backbone
to level 5, maps) and both from one backbone pass (what the fused score needs).

Then the peak RSS of ``fit_patch`` in a fresh subprocess per training-set size (train images
reused cyclically): the statistics are sums, so the peak must not grow with the image count.

    .venv/bin/python bench/patch.py [--workdir /work/bench-data/patch] [--n-train 50]
        [--memory-sizes 25 250] [--grids 28 56]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_summary  # noqa: E402

from gaussian_ad.backbones.models import load_backbone  # noqa: E402
from gaussian_ad.evaluation.evaluate import holdout_split, split_records  # noqa: E402
from gaussian_ad.features.extract import extract  # noqa: E402
from gaussian_ad.stats.fusion import Standardizer, fuse  # noqa: E402
from gaussian_ad.stats.gaussian import GaussianAD  # noqa: E402
from gaussian_ad.data.images import mvtec_manifest  # noqa: E402
from gaussian_ad.stats.metrics import auroc, pixel_auroc, pro_auc  # noqa: E402
from gaussian_ad.features.patches import PatchLayout, fit_patch, load_masks, score_patch  # noqa: E402
from gaussian_ad.data.synthetic import CATEGORIES, make_dataset  # noqa: E402

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/patch"))
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-test-per-defect", type=int, default=6)
    parser.add_argument("--size", type=int, default=256, help="synthetic image size")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[50, 250])
    parser.add_argument("--grids", type=int, nargs="+", default=[28, 56])
    parser.add_argument("--measure-fit", nargs=2, type=int, metavar=("N", "GRID"), help="internal")
    return parser.parse_args()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def accuracy(root: Path, grid: int) -> None:
    """Per-category AUROCs and wall times; the grid is the patch model's."""
    image_backbone = load_backbone("lite0", device="cpu")  # levels 1-9
    patch_backbone = load_backbone("lite0", levels=(3, 4, 5), device="cpu")
    patch_layout = PatchLayout.for_backbone(patch_backbone, grid=grid)
    shared_layout = PatchLayout.for_backbone(image_backbone, levels=(3, 4, 5), grid=grid)
    size = image_backbone.spec.image_size
    print(f"\n== accuracy (grid {grid}x{grid}, d = {len(patch_layout.channel_index)}) ==")
    print(
        f"{'category':<8} {'image':>6} {'patch':>6} {'fused':>6} {'pixel':>6} {'pro':>6}"
        f" | {'t_image':>8} {'t_patch':>8} {'t_both':>8}  (s: fit + held-out + test)"
    )
    for category in CATEGORIES:
        train, test = split_records(mvtec_manifest(root, category))
        fit_idx, held_idx = holdout_split(len(train))
        fit_paths = [train[i].path for i in fit_idx]
        held_paths = [train[i].path for i in held_idx]
        test_paths = [r.path for r in test]
        labels = np.array([r.label for r in test])

        start = time.perf_counter()
        image_model = GaussianAD().fit(extract(image_backbone, fit_paths).levels)
        image_model.anomaly_scores(extract(image_backbone, held_paths).levels)  # timed only
        image_test = image_model.anomaly_scores(extract(image_backbone, test_paths).levels)
        t_image = time.perf_counter() - start

        start = time.perf_counter()
        patch_model, _ = fit_patch(patch_backbone, fit_paths, layout=patch_layout)
        score_patch(patch_backbone, patch_model, held_paths)
        score_patch(patch_backbone, patch_model, test_paths)
        t_patch = time.perf_counter() - start

        start = time.perf_counter()
        shared_model, fit_features = fit_patch(image_backbone, fit_paths, layout=shared_layout)
        held = score_patch(image_backbone, shared_model, held_paths)
        scored = score_patch(image_backbone, shared_model, test_paths)
        both_image_model = GaussianAD().fit(fit_features.levels)
        standardizer = Standardizer.fit(both_image_model.anomaly_scores(held.pooled), held.scores)
        fused = fuse(both_image_model.anomaly_scores(scored.pooled), scored.scores, standardizer)
        t_both = time.perf_counter() - start

        assert np.allclose(both_image_model.anomaly_scores(scored.pooled), image_test, rtol=1e-4)
        masks = load_masks([r.mask for r in test], size)
        print(
            f"{category:<8} {auroc(labels, image_test):6.3f} {auroc(labels, scored.scores):6.3f}"
            f" {auroc(labels, fused):6.3f} {pixel_auroc(masks, scored.maps):6.3f}"
            f" {pro_auc(masks, scored.maps):6.3f} | {t_image:8.1f} {t_patch:8.1f} {t_both:8.1f}"
        )


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: current RSS; VmHWM: peak RSS since exec).

    Unlike ``ru_maxrss``, which Linux carries over exec from the parent, VmHWM starts afresh.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure_fit(root: Path, n_images: int, grid: int) -> None:
    """Child process: fit the patch model on ``n_images`` (cycled) and print JSON."""
    backbone = load_backbone("lite0", levels=(3, 4, 5), device="cpu")
    train, _ = split_records(mvtec_manifest(root, CATEGORIES[0]))
    paths = [train[i % len(train)].path for i in range(n_images)]
    layout = PatchLayout.for_backbone(backbone, grid=grid)
    before = proc_status_bytes("VmRSS")
    (model, _), seconds = timed(fit_patch, backbone, paths, layout=layout)
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "n": model.n_samples_}))


def memory(root: Path, sizes: list[int], grids: list[int]) -> None:
    print("\n== patch-level fit: peak RSS in a fresh subprocess (batch 32, d = 100) ==")
    print(f"{'grid':>5} {'images':>7} {'RSS before fit':>15} {'peak RSS':>10} {'fit s':>7}")
    for grid in grids:
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--workdir", str(root.parent)]
                + ["--measure-fit", str(n), str(grid)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{grid:>5} {n:>7} {result['before'] / MIB:>11.0f} MiB"
                f" {result['peak'] / MIB:>6.0f} MiB {result['seconds']:>7.1f}"
            )
        positions = grid * grid
        print(
            f"      (one (P, d, d) float64 array at {grid}x{grid}: {positions * 8e4 / 1e6:.0f} MB)"
        )


def main() -> None:
    args = parse_args()
    root = args.workdir / "synthetic"
    if args.measure_fit:
        measure_fit(root, *args.measure_fit)
        return
    print(machine_summary())
    if not root.is_dir():
        make_dataset(
            root,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_per_defect=args.n_test_per_defect,
            size=args.size,
        )
    print(
        f"data: {root} ({args.n_train} train, {args.n_test_good} good + "
        f"{args.n_test_per_defect} per defect test images per category, {args.size} px)"
    )
    for grid in args.grids:
        accuracy(root, grid)
    memory(root, args.memory_sizes, args.grids)


if __name__ == "__main__":
    main()
