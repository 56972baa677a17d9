"""Patch-level Gaussian: accuracy, speed and fit memory (a benchmark, not a test).

On a synthetic MVTec-layout dataset (3 categories, outside the git tree), per category: fit on
4/5 of train/good, standardise on the held-out 1/5, score test/. Reports image AUROC of the
image-level model (GaussianAD, pooled levels 1-9), the patch-level model (maximum of the
anomaly map, levels 3-5) and their fusion, pixel AUROC and AU-PRO (FPR <= 0.3) of the maps,
and wall times: image-level alone (backbone to level 9, pooled), patch-level alone (backbone
to level 5, maps) and both from one backbone pass (what the fused score needs).

Then the peak RSS of the patch-level fit (``training_pass`` + ``PatchGaussian.fit_moments``)
in a fresh subprocess per training-set size (train images reused cyclically): the statistics
are sums, so the peak must not grow with the image count.

    .venv/bin/python bench/patch.py [--workdir /work/bench-data/patch] [--n-train 50]
        [--memory-sizes 25 250] [--grids 28 56]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_summary  # noqa: E402

from gaussian_ad.backbones.models import Backbone, load_backbone  # noqa: E402
from gaussian_ad.config import DEFAULT_LOADER  # noqa: E402
from gaussian_ad.data.images import load_masks, mvtec_manifest  # noqa: E402
from gaussian_ad.data.synthetic import CATEGORIES, make_dataset  # noqa: E402
from gaussian_ad.detection.detector import TrainingPass, training_pass  # noqa: E402
from gaussian_ad.evaluation.evaluate import split_records  # noqa: E402
from gaussian_ad.features.extract import extract, iter_batches  # noqa: E402
from gaussian_ad.features.layout import PatchLayout  # noqa: E402
from gaussian_ad.stats.fusion import Standardizer, fuse  # noqa: E402
from gaussian_ad.stats.gaussian import GaussianAD  # noqa: E402
from gaussian_ad.stats.metrics import auroc, pixel_auroc, pro_auc  # noqa: E402
from gaussian_ad.stats.patch_gaussian import PatchGaussian  # noqa: E402
from gaussian_ad.store.plan import holdout_split  # noqa: E402

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


@dataclass
class PatchScores:
    """Patch-level results of the images that decoded, and their pooled features."""

    scores: np.ndarray  # (n,) maximum of each anomaly map
    maps: np.ndarray  # (n, size, size) float32 anomaly maps at the backbone's input size
    pooled: list[np.ndarray]  # (n, d_l) pooled features of the backbone's levels, same pass


def fit_patch(
    backbone: Backbone, paths: list[str], layout: PatchLayout
) -> tuple[PatchGaussian, TrainingPass]:
    """One backbone pass: the patch-level model, and the pass (pooled features of every
    backbone level, for an image-level model)."""
    passed = training_pass(backbone, paths, DEFAULT_LOADER, layout)
    return PatchGaussian().fit_moments(passed.patch_sums), passed


def score_patch(
    backbone: Backbone, model: PatchGaussian, layout: PatchLayout, paths: list[str]
) -> PatchScores:
    """Anomaly maps and patch-level scores at the backbone's input size, batch by batch."""
    size = backbone.spec.image_size
    scores, maps = [np.empty(0)], [np.empty((0, size, size), np.float32)]
    pooled = [[np.empty((0, d), np.float32)] for d in backbone.level_dims]
    for batch in iter_batches(backbone, paths, DEFAULT_LOADER, layout=layout):
        if len(batch.index):
            batch_scores, batch_maps = model.anomaly_maps(batch.patches, size)
            scores.append(batch_scores)
            maps.append(batch_maps)
            for parts, level in zip(pooled, batch.pooled, strict=True):
                parts.append(level)
    return PatchScores(
        np.concatenate(scores), np.concatenate(maps), [np.concatenate(p) for p in pooled]
    )


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
        image_model = GaussianAD().fit(extract(image_backbone, fit_paths).pooled)
        image_model.anomaly_scores(extract(image_backbone, held_paths).pooled)  # timed only
        image_test = image_model.anomaly_scores(extract(image_backbone, test_paths).pooled)
        t_image = time.perf_counter() - start

        start = time.perf_counter()
        patch_model, _ = fit_patch(patch_backbone, fit_paths, patch_layout)
        score_patch(patch_backbone, patch_model, patch_layout, held_paths)
        score_patch(patch_backbone, patch_model, patch_layout, test_paths)
        t_patch = time.perf_counter() - start

        start = time.perf_counter()
        shared_model, fit_pass = fit_patch(image_backbone, fit_paths, shared_layout)
        held = score_patch(image_backbone, shared_model, shared_layout, held_paths)
        scored = score_patch(image_backbone, shared_model, shared_layout, test_paths)
        both_image_model = GaussianAD().fit(fit_pass.pooled)
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
    (model, _), seconds = timed(fit_patch, backbone, paths, layout)
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
