"""The project's extract + fit + score against a naive in-memory loop (a benchmark, not a test).

Writes a synthetic MVTec-layout category (``gaussian_ad.data.synthetic``, labelled defects)
into a temp folder as PNG 900x900 and as JPEG 1500x1000, then runs, each in its own child
process and alternating between the two, the same work on the same images with the same
torch threads:

- **project**: ``Detector(DetectorConfig(backbone, levels 1-9, the native input side, the
  paper's sum of levels, no patch model)).fit(train)`` (one backbone pass, Ledoit-Wolf per level,
  out-of-fold calibration) then ``.score(test)``;
- **naive**: PIL decode + convert + bilinear resize in the main thread, float [0, 1] and the
  weights' normalisation in numpy, batches through the plain timm model with forward hooks
  on the 9 levels (mean-pooled), scikit-learn ``LedoitWolf`` per level, summed Mahalanobis.

Each child is measured from outside (``os.wait4``: user + system CPU, wall) and from inside:
its peak RSS (``VmHWM``) and the CPU (all threads) and wall of its phases: imports + weights,
fit = train extraction + fit, score = test extraction + scoring. "Per image" is the score phase per
test image: the per-image cost without the fixed costs of start-up and fitting. Prints
medians over the repeats, the ratios project / naive, both methods' test AUROC and the rank
correlation of their test scores.

    .venv/bin/python bench/compare.py [--n-train 120] [--n-test-good 15]
        [--n-test-per-defect 10] [--repeats 3] [--threads N] [--workers 2] [--batch-size 16]
        [--sources png,jpeg]

``--whole`` times what a user pays instead: whole processes, from start to exit, alternating,
of ``gaussian-ad evaluate ROOT --category C`` with the paper's configuration (``--no-patch
--input-size 224 --sum-levels``; ``--project-args`` to change it) against a naive one-file
script doing the same work (:func:`run_naive_whole`: list the MVTec-layout folders, decode in
the main thread, forward with hooks, scikit-learn ``LedoitWolf`` per level, summed
Mahalanobis, ``roc_auc_score`` of the sum and of each level, printed). ROOT is ``--data``
(an MVTec-layout folder, e.g. /work/shared/devdata/visa; ``--n-train`` and ``--n-test``
images of ``--category`` are linked into a temp folder) or, without it, the synthetic
category as PNG 900x900. Prints the machine, the load before and after, medians, the
ratios project / naive (CPU, wall) and both AUROCs.

    .venv/bin/python bench/compare.py --whole [--data ROOT --category C] [--n-train 120]
        [--n-test 45] [--repeats 3] [--project-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

CATEGORY = "disc"
SOURCES = {"png": ("png", (900, 900)), "jpeg": ("jpg", (1500, 1000))}
# Targets of issue 13: project / naive.
TARGETS = {"png": {"cpu_per_image": 0.7, "wall": 0.67}, "jpeg": {"wall": 0.5}}
# Issue 23: whole processes, project / naive.
WHOLE_TARGETS = {"cpu": 0.7, "wall": 0.67}
PAPER_ARGS = "--no-patch --input-size 224 --sum-levels"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-test-good", type=int, default=15)
    parser.add_argument("--n-test-per-defect", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--workers", type=int, default=2, help="the project's decode threads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sources", default="png,jpeg", help="png, jpeg or both")
    parser.add_argument(
        "--naive-passive",
        action="store_true",
        help="run the naive loop with OMP_WAIT_POLICY=PASSIVE too (default: as a plain script)",
    )
    parser.add_argument("--whole", action="store_true", help="time whole CLI processes")
    parser.add_argument("--data", help="--whole: an MVTec-layout root (default: synthetic)")
    parser.add_argument("--category", default=CATEGORY, help="--whole: the category")
    parser.add_argument("--n-test", type=int, default=45, help="--whole --data: test images")
    parser.add_argument(
        "--project-args", default=PAPER_ARGS, help="--whole: options of gaussian-ad evaluate"
    )
    parser.add_argument(
        "--child", choices=("project", "naive", "naive-whole"), help=argparse.SUPPRESS
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ the two children
def _split(root: Path) -> tuple[list[str], list[str], list[int]]:
    from gaussian_ad.data.images import mvtec_manifest

    records = mvtec_manifest(root, CATEGORY)
    train = [r.path for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    return train, [r.path for r in test], [r.label for r in test]


def run_project(args: argparse.Namespace) -> dict:
    """The library's path: Detector.fit (with its calibration) and Detector.score."""
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    import torch

    from gaussian_ad.config import DetectorConfig, LoaderOptions
    from gaussian_ad.detection.detector import Detector

    torch.set_num_threads(args.threads)
    loader = LoaderOptions(device="cpu", batch_size=args.batch_size, workers=args.workers)
    from gaussian_ad.backbones.specs import BACKBONES

    config = DetectorConfig(  # the paper's method, as the naive loop computes it
        backbone=args.backbone,
        levels="1-9",
        input_size=BACKBONES[args.backbone].image_size,
        standardize_levels=False,
        patch=False,  # no maps: the naive loop has none
    )
    detector = Detector(config, loader)
    detector.backbone_module()  # the weights, outside the timed work as for the naive loop
    setup_cpu, setup_wall = time.process_time(), time.perf_counter()
    train, test, labels = _split(Path(args.root))
    detector.fit(train)
    fit_cpu, fit_wall = time.process_time(), time.perf_counter()
    scores = detector.score(test)
    return _phases(
        (start_cpu, setup_cpu, fit_cpu, time.process_time()),
        (start_wall, setup_wall, fit_wall, time.perf_counter()),
        len(train),
        scores.scores,
        [labels[i] for i in scores.index],
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss, which
    also counts the parent's memory at the fork)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _phases(cpu: tuple, wall: tuple, n_train: int, scores, labels: list[int]) -> dict:
    """A child's report: CPU and wall of set-up (imports, weights), fit and score."""
    report = {"n_train": n_train, "n_test": len(labels), "peak_mb": peak_rss_mb()}
    for i, phase in enumerate(("setup", "fit", "score")):
        report[f"{phase}_cpu"] = cpu[i + 1] - cpu[i]
        report[f"{phase}_wall"] = wall[i + 1] - wall[i]
    return {**report, "scores": [float(s) for s in scores], "labels": labels}


def run_naive(args: argparse.Namespace) -> dict:
    """Decode in the main thread, timm + forward hooks, scikit-learn LedoitWolf."""
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    import numpy as np
    import torch
    from sklearn.covariance import LedoitWolf

    torch.set_num_threads(args.threads)
    # torch is loaded above, so the OMP_WAIT_POLICY default of backbones.models does not apply.
    features = naive_extractor(args.backbone, args.batch_size)
    setup_cpu, setup_wall = time.process_time(), time.perf_counter()

    train, test, labels = _split(Path(args.root))
    fitted = [LedoitWolf().fit(x) for x in features(train)]
    fit_cpu, fit_wall = time.process_time(), time.perf_counter()
    scores = sum(np.sqrt(lw.mahalanobis(x)) for lw, x in zip(fitted, features(test), strict=True))
    return _phases(
        (start_cpu, setup_cpu, fit_cpu, time.process_time()),
        (start_wall, setup_wall, fit_wall, time.perf_counter()),
        len(train),
        scores,
        labels,
    )


def naive_extractor(backbone: str, batch_size: int):
    """The naive scripts' model and extraction: timm with the Lite weights and forward hooks
    on every level; the returned ``features(paths)`` decodes in the main thread, resizes,
    normalises and runs the model, giving one (n, C) float64 array of pooled maps per level."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from gaussian_ad.backbones.models import lite_package_weights, load_weights_file
    from gaussian_ad.backbones.specs import BACKBONES

    spec = BACKBONES[backbone]
    model = timm.create_model(spec.timm_name, pretrained=False)
    load_weights_file(model, lite_package_weights(backbone))
    model.eval()
    taps = [model.bn1, *model.blocks, model.bn2]
    pooled: list[torch.Tensor] = []
    for tap in taps:
        tap.register_forward_hook(lambda _m, _i, out: pooled.append(out.mean(dim=(2, 3))))
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    size = spec.image_size

    def features(paths: list[str]) -> list[np.ndarray]:
        per_level: list[list[np.ndarray]] = [[] for _ in taps]
        for start in range(0, len(paths), batch_size):
            pixels = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                pixels.append((np.asarray(rgb, np.float32) / 255.0 - mean) / std)
            x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
            pooled.clear()
            with torch.inference_mode():
                model(x)
            for level, vectors in zip(per_level, pooled, strict=True):
                level.append(vectors.numpy().astype(np.float64))
        return [np.concatenate(level) for level in per_level]

    return features


def run_naive_whole(args: argparse.Namespace) -> None:
    """The naive one-file script of ``--whole``: the same evaluation, plainly written."""
    import numpy as np
    from sklearn.covariance import LedoitWolf
    from sklearn.metrics import roc_auc_score

    folder = Path(args.root) / args.category
    images = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    train = sorted(str(p) for p in (folder / "train" / "good").iterdir())
    train = [p for p in train if p.lower().endswith(images)]
    test, labels = [], []
    for defect in sorted((folder / "test").iterdir()):
        for path in sorted(defect.iterdir()):
            if path.suffix.lower() in images:
                test.append(str(path))
                labels.append(int(defect.name != "good"))
    features = naive_extractor(args.backbone, args.batch_size)

    fitted = [LedoitWolf().fit(x) for x in features(train)]
    levels = np.stack(
        [np.sqrt(lw.mahalanobis(x)) for lw, x in zip(fitted, features(test), strict=True)], 1
    )
    result = {
        "auroc": float(roc_auc_score(labels, levels.sum(1))),
        "auroc_levels": [float(roc_auc_score(labels, column)) for column in levels.T],
    }
    print(json.dumps(result))
    if args.result:
        Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------ the parent
def write_sources(args: argparse.Namespace, folder: Path, sources: list[str]) -> dict[str, Path]:
    """The synthetic category as PNG 900x900 and/or JPEG 1500x1000 (quality 90)."""
    from PIL import Image

    from gaussian_ad.data.synthetic import make_dataset

    png_root = make_dataset(
        folder / "png",
        [CATEGORY],
        n_train=args.n_train,
        n_test_good=args.n_test_good,
        n_test_per_defect=args.n_test_per_defect,
        size=900,
    )
    roots = {"png": png_root}
    if "jpeg" in sources:
        jpeg_root = folder / "jpeg"
        for png in sorted((png_root / CATEGORY).rglob("*.png")):
            relative = png.relative_to(png_root)
            target = jpeg_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(png) as image:
                if "ground_truth" in relative.parts:
                    image.resize(SOURCES["jpeg"][1], Image.Resampling.NEAREST).save(target)
                else:
                    resized = image.convert("RGB").resize(
                        SOURCES["jpeg"][1], Image.Resampling.BICUBIC
                    )
                    resized.save(target.with_suffix(".jpg"), quality=90)
        roots["jpeg"] = jpeg_root
    return {name: roots[name] for name in sources}


def measure(kind: str, root: Path, args: argparse.Namespace, folder: Path) -> dict:
    """One child run: its rusage (os.wait4) and what it reports about itself."""
    result = folder / f"{kind}.json"
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--root",
        str(root),
        "--result",
        str(result),
        "--backbone",
        args.backbone,
        "--threads",
        str(args.threads),
        "--workers",
        str(args.workers),
        "--batch-size",
        str(args.batch_size),
    ]
    env = dict(os.environ)
    if kind == "naive" and args.naive_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind} child failed with status {status}")
    inner = json.loads(result.read_text())
    return {
        **inner,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "cpu": usage.ru_utime + usage.ru_stime,
        "wall": wall,
    }


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def report(source: str, runs: dict[str, list[dict]]) -> dict[str, float]:
    """Medians per method and the ratios project / naive; returns the ratios."""
    first = runs["naive"][0]
    rows = [
        ("process CPU s (user+sys)", "cpu"),
        ("  user s", "user"),
        ("  sys s", "sys"),
        ("process wall s", "wall"),
        ("peak RSS MB", "peak_mb"),
        ("imports + weights CPU s", "setup_cpu"),
        ("fit (train) CPU s", "fit_cpu"),
        ("fit (train) wall s", "fit_wall"),
        ("score (test) CPU s", "score_cpu"),
        ("score (test) wall s", "score_wall"),
        ("work (fit+score) CPU s", "work_cpu"),
        ("work (fit+score) wall s", "work_wall"),
        ("score CPU ms / image", "cpu_per_image"),
        ("score wall ms / image", "wall_per_image"),
    ]
    for run in (*runs["naive"], *runs["project"]):
        run["work_cpu"] = run["fit_cpu"] + run["score_cpu"]
        run["work_wall"] = run["fit_wall"] + run["score_wall"]
        run["cpu_per_image"] = 1e3 * run["score_cpu"] / run["n_test"]
        run["wall_per_image"] = 1e3 * run["score_wall"] / run["n_test"]
    medians = {
        kind: {key: statistics.median(r[key] for r in kind_runs) for _, key in rows}
        for kind, kind_runs in runs.items()
    }
    ratios = {key: medians["project"][key] / medians["naive"][key] for _, key in rows}
    print(
        f"\n== {source} {'x'.join(map(str, SOURCES[source][1]))}: {first['n_train']} train + "
        f"{first['n_test']} test images, medians of {len(runs['naive'])} alternating runs =="
    )
    print(f"{'':<28}{'naive':>10}{'project':>10}{'ratio':>8}")
    for label, key in rows:
        naive, project = medians["naive"][key], medians["project"][key]
        print(f"{label:<28}{naive:>10.2f}{project:>10.2f}{ratios[key]:>8.2f}")
    naive_run, project_run = runs["naive"][0], runs["project"][0]
    print(
        f"test AUROC: naive {auroc(naive_run['labels'], naive_run['scores']):.4f}, "
        f"project {auroc(project_run['labels'], project_run['scores']):.4f}; "
        "rank correlation of their test scores "
        f"{rank_correlation(naive_run['scores'], project_run['scores']):.4f}"
    )
    for key, target in TARGETS[source].items():
        if source == "jpeg":
            speedup = 1 / ratios["wall_per_image"]
            met = "met" if speedup >= 1 / target else "NOT met"
            print(f"target: per image >= {1 / target:.1f}x faster than naive: {speedup:.2f}x {met}")
            continue
        measured = "cpu_per_image" if key == "cpu_per_image" else "wall_per_image"
        met = "met" if ratios[measured] <= target else "NOT met"
        print(f"target: {measured} ratio <= {target}: {ratios[measured]:.2f} {met}")
    return ratios


def subsample(data: Path, category: str, n_train: int, n_test: int, folder: Path) -> Path:
    """An MVTec-layout copy of ``n_train`` train/good and ``n_test`` test images of
    ``category`` (a third good, the rest spread over the defect folders, each with its
    masks), as symbolic links under ``folder``; returns its root."""
    source, target = data / category, folder / "data" / category

    def link(paths: list[Path]) -> None:
        for path in paths:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.symlink_to(path.resolve())

    link(sorted((source / "train" / "good").iterdir())[:n_train])
    defects = sorted(d for d in (source / "test").iterdir() if d.name != "good")
    link(sorted((source / "test" / "good").iterdir())[: n_test // 3])
    bad = n_test - n_test // 3
    for i, defect in enumerate(defects):
        chosen = sorted(defect.iterdir())[: bad // len(defects) + (i < bad % len(defects))]
        link(chosen)
        masks = source / "ground_truth" / defect.name
        for image in chosen:
            link(sorted(masks.glob(f"{image.stem}*")) if masks.is_dir() else [])
    return folder / "data"


def measure_whole(kind: str, root: Path, args: argparse.Namespace, folder: Path) -> dict:
    """One whole process, start to exit: its rusage (os.wait4), wall and AUROC."""
    result = folder / f"{kind}-whole.json"
    if kind == "project":
        command = [str(Path(sys.executable).parent / "gaussian-ad"), "evaluate", str(root)]
        command += ["--category", args.category, "--backbone", args.backbone]
        command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        command += [*shlex.split(args.project_args), "--json", str(result)]
    else:
        command = [sys.executable, __file__, "--child", "naive-whole", "--root", str(root)]
        command += ["--category", args.category, "--backbone", args.backbone]
        command += ["--batch-size", str(args.batch_size), "--result", str(result)]
    env = dict(os.environ)
    if kind == "naive" and args.naive_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    start = time.perf_counter()
    log = folder / f"{kind}-whole.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{kind}: {shlex.join(command)} failed ({status}):\n{tail}")
    report = json.loads(result.read_text())
    if kind == "project":
        row = report["categories"][args.category]
        report = {"auroc": row["auroc"], "auroc_levels": row["auroc_levels"]}
    return {
        **report,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "cpu": usage.ru_utime + usage.ru_stime,
        "wall": wall,
        "peak_mb": usage.ru_maxrss / 1024,
    }


def whole(args: argparse.Namespace, summary: str) -> dict[str, float]:
    """``--whole``: alternating whole processes, medians and ratios project / naive."""
    with tempfile.TemporaryDirectory(prefix="bench-whole-") as tmp:
        folder = Path(tmp)
        if args.data:
            root = subsample(Path(args.data), args.category, args.n_train, args.n_test, folder)
            source = f"{args.data}/{args.category}"
        else:
            args.category = CATEGORY
            root = write_sources(args, folder, ["png"])["png"]
            source = "synthetic PNG 900x900"
        n_train = len(list((root / args.category / "train" / "good").iterdir()))
        n_test = sum(1 for p in (root / args.category / "test").rglob("*") if p.is_file())
        print(summary)
        print(
            f"{source}: {n_train} train + {n_test} test images; project: gaussian-ad evaluate "
            f"{args.project_args}; backbone {args.backbone}, batch {args.batch_size}; naive "
            f"OMP_WAIT_POLICY {'PASSIVE' if args.naive_passive else 'as set (default ACTIVE)'}"
        )
        runs: dict[str, list[dict]] = {"naive": [], "project": []}
        for repeat in range(args.repeats):
            order = ("naive", "project") if repeat % 2 == 0 else ("project", "naive")
            for kind in order:
                run = measure_whole(kind, root, args, folder)
                runs[kind].append(run)
                print(f"  {kind:<8} CPU {run['cpu']:6.1f} s  wall {run['wall']:6.1f} s", flush=True)
    keys = [("process CPU s (user+sys)", "cpu"), ("  user s", "user"), ("  sys s", "sys")]
    keys += [("process wall s", "wall"), ("peak RSS MB", "peak_mb")]
    medians = {
        kind: {key: statistics.median(r[key] for r in kind_runs) for _, key in keys}
        for kind, kind_runs in runs.items()
    }
    ratios = {key: medians["project"][key] / medians["naive"][key] for _, key in keys}
    print(f"\n== whole processes, medians of {args.repeats} alternating runs ==")
    print(f"{'':<28}{'naive':>10}{'project':>10}{'ratio':>8}")
    for label, key in keys:
        naive, project = medians["naive"][key], medians["project"][key]
        print(f"{label:<28}{naive:>10.2f}{project:>10.2f}{ratios[key]:>8.2f}")
    naive, project = runs["naive"][0], runs["project"][0]
    print(f"AUROC (sum of levels): naive {naive['auroc']:.4f}, project {project['auroc']:.4f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for key, target in WHOLE_TARGETS.items():
        met = "met" if ratios[key] <= target else "NOT met"
        print(f"target: whole-process {key} ratio <= {target}: {ratios[key]:.2f} {met}")
    return ratios


def main() -> None:
    args = parse_args()
    if args.child == "naive-whole":
        run_naive_whole(args)
        return
    if args.child is not None:
        result = run_project(args) if args.child == "project" else run_naive(args)
        Path(args.result).write_text(json.dumps(result))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine_summary

    if args.whole:
        whole(args, machine_summary())
        return

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise SystemExit(f"--sources: unknown {unknown}; choose from {sorted(SOURCES)}")
    print(machine_summary())
    print(
        f"backbone {args.backbone}, levels 1-9, batch {args.batch_size}, torch threads "
        f"{args.threads}, project decode threads {args.workers}; "
        f"{args.n_train} train + {args.n_test_good + 3 * args.n_test_per_defect} test images; "
        f"OMP_WAIT_POLICY: project {os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, naive "
        f"{'PASSIVE' if args.naive_passive else os.environ.get('OMP_WAIT_POLICY', 'default')}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        folder = Path(tmp)
        roots = write_sources(args, folder, sources)
        for source, root in roots.items():
            runs: dict[str, list[dict]] = {"naive": [], "project": []}
            for repeat in range(args.repeats):
                order = ("naive", "project") if repeat % 2 == 0 else ("project", "naive")
                for kind in order:
                    runs[kind].append(measure(kind, root, args, folder))
            report(source, runs)


if __name__ == "__main__":
    main()
