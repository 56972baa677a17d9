"""Accuracy per category and candidate on real data (a benchmark, not a test).

For every MVTec-layout category under the DATA_ROOT folders (default: every dev category
of ``../shared/devdata`` next to the repository, when it is there: visa/fryum, visa/capsules
and magnetic_tile, all in one run, so that no change is judged on one kind of product), in a
child process of its own (so its peak memory is its own):

- one backbone pass over train/good and one over test/, with every level and the default
  patch layout; every candidate below is fitted from these features through
  :meth:`Detector.fit_pass` (all normals, calibrated out of fold) and evaluated with
  :func:`~gaussian_ad.evaluation.evaluate.evaluate`: image AUROC, and pixel AUROC and PRO
  at the masks' resolution;
- what ``gaussian-ad train DATA`` gives a user: the fixed default configuration and, with
  ``--select``, the configuration that the synthetic-defect selection picks (it needs two
  more backbone passes), evaluated the same way.

Prints, per category and candidate, image AUROC, pixel AUROC, PRO, the working point on
the test set (false-alarm rate and recall at the calibrated threshold, and the best recall
any threshold reaches at that false-alarm rate), the seconds its fit + calibration +
scoring took (the shared backbone passes are printed once per category), the category's
peak memory, and the machine; then which candidate the default is and its change against
the previous default (``PREVIOUS_DEFAULT``). The protocol: a change to the default is kept
only where no dev category drops by more than 0.005.

    .venv/bin/python bench/accuracy.py [DATA_ROOT ...] [--category fryum] [--select]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_summary

DEVDATA = Path(__file__).resolve().parents[1].parent / "shared" / "devdata"
DEFAULT_ROOTS = [DEVDATA / "visa", DEVDATA / "magnetic_tile"]
# name -> DetectorConfig fields (besides patch=True): the paper's method (summed levels),
# PaDiM-like per-position patches, position-free patches, each fused with the image score,
# and the image and the fused scores with standardised levels (fused-auto-std, the pooling
# chosen from the normals: the default).
SUMMED = {"standardize_levels": False}
CANDIDATES: dict[str, dict] = {
    "image": {"score": "image", **SUMMED},
    "image-npca": {"score": "image", "reduction": "npca", **SUMMED},
    "patch": {"score": "patch", "patch_pool_radius": 0, **SUMMED},
    "patch-free": {"score": "patch", "patch_pool_radius": None, **SUMMED},
    "fused": {"score": "fused", "patch_pool_radius": 0, **SUMMED},
    "fused-free": {"score": "fused", "patch_pool_radius": None, **SUMMED},
    "image-std": {"score": "image", "standardize_levels": True},
    "fused-free-std": {"score": "fused", "patch_pool_radius": None, "standardize_levels": True},
    "fused-pos-std": {"score": "fused", "patch_pool_radius": 0, "standardize_levels": True},
    "fused-auto-std": {"score": "fused", "patch_pool_radius": "auto", "standardize_levels": True},
}

PREVIOUS_DEFAULT = "fused-free-std"  # the default before the present one, for the protocol
MAX_DROP = 0.005  # a change to the default may lower no category by more than this


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_roots", nargs="*", type=Path, default=DEFAULT_ROOTS)
    parser.add_argument("--category", action="append", help="default: every category")
    parser.add_argument("--select", action="store_true", help="also the selection's pick")
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--input-size", type=int, help="square input side (default: native)")
    parser.add_argument(
        "--candidates", default=",".join(CANDIDATES), help="comma-separated, of: %(default)s"
    )
    parser.add_argument("--json", type=Path, help="write every row as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def evaluate_candidate(name, config, passed, keys, layout, fingerprint, test, records, args):
    """One candidate from the shared passes: its evaluation row."""
    from gaussian_ad.detection.detector import Detector
    from gaussian_ad.evaluation.evaluate import evaluate_records
    from gaussian_ad.features.extract import pick_levels

    start = time.perf_counter()
    detector = Detector(config).fit_pass(passed, keys, layout, fingerprint, args.target_fpr)
    levels = pick_levels(test.pooled, passed.levels, config.image_levels)
    scores = detector.score_features(levels, test.patches, maps=True, index=test.index)
    evaluation = evaluate_records(detector, scores, [records[i] for i in scores.index])
    counts = evaluation.confusion
    return {
        "candidate": name,
        "config": config.to_dict(),
        "auroc": evaluation.auroc,
        "pixel_auroc": evaluation.pixel_auroc,
        "pro": evaluation.pro,
        "fpr": counts.fpr,
        "recall": counts.recall,
        "best_recall": evaluation.best_recall,
        "seconds": time.perf_counter() - start,
    }


def ranking(config: dict) -> dict:
    """The settings of a configuration that decide its image ranking (the patch model's
    pooling only where the score uses the patch model)."""
    keys = ["backbone", "levels", "reduction", "score", "standardize_levels", "input_size"]
    if config["score"] != "image":
        keys += ["patch_pool_radius", "patch_channels", "patch_grid"]
    return {key: config[key] for key in keys}


def run_category(args: argparse.Namespace) -> dict:
    """Every candidate on one category, in this (child) process."""
    from gaussian_ad.config import DetectorConfig, LoaderOptions
    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.detection.detector import Detector, training_pass
    from gaussian_ad.evaluation.evaluate import split_records
    from gaussian_ad.evaluation.selection import select_on_normals
    from gaussian_ad.features.extract import collect, iter_batches, source_label
    from gaussian_ad.features.layout import PatchLayout

    train, test_records = split_records(mvtec_manifest(args.data_roots[0], args.child))
    train_paths = [r.path for r in train]
    base = DetectorConfig(patch=True, input_size=args.input_size)
    loader = LoaderOptions()
    backbone = Detector(base, loader).backbone_module()
    layout = PatchLayout.for_config(backbone, base)
    start = time.perf_counter()
    passed = training_pass(backbone, train_paths, loader, layout)
    test_paths = [r.path for r in test_records]
    test = collect(iter_batches(backbone, test_paths, loader, layout=layout), backbone, layout)
    extraction = time.perf_counter() - start
    keys = [source_label(train_paths[i], i) for i in passed.index]
    shared = (passed, keys, layout, backbone.weights_fingerprint, test, test_records, args)
    names = args.candidates.split(",")
    configs = {name: base.replace(**CANDIDATES[name]) for name in names}
    rows = [evaluate_candidate(name, c, *shared) for name, c in configs.items()]
    picks = {}
    default = ranking(DetectorConfig(input_size=args.input_size).to_dict())
    for row in rows:  # what `gaussian-ad train DATA` fits
        if ranking(row["config"]) == default:
            picks["default"] = row["candidate"]
    if args.select:
        start = time.perf_counter()
        selection = select_on_normals(train_paths, base, loader=loader)
        chosen = selection.best.config(base)
        seconds = time.perf_counter() - start
        known = [r["candidate"] for r in rows if r["config"] == chosen.to_dict()]
        if known:
            picks["select"] = known[0]
        else:
            rows.append(evaluate_candidate("selected", chosen, *shared))
            picks["select"] = "selected"
        picks["select_seconds"] = seconds
        picks["select_results"] = selection.to_dict()["results"]
    return {
        "category": args.child,
        "n_train": len(passed.index),
        "n_test": len(test.index),
        "extraction_seconds": extraction,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
        "picks": picks,
    }


def print_category(result: dict) -> None:
    print(
        f"\n{result['category']}: {result['n_train']} train, {result['n_test']} test; "
        f"backbone passes {result['extraction_seconds']:.0f} s; peak {result['peak_mib']:.0f} MiB"
    )
    best = max(r["auroc"] for r in result["rows"])
    print(
        f"  {'candidate':<15}{'AUROC':>7}{'pixel':>7}{'PRO':>7}{'FPR':>7}{'recall':>7}"
        f"{'best':>7}{'s':>6}  picked by"
    )
    for row in result["rows"]:
        by = [k for k, v in result["picks"].items() if v == row["candidate"]]
        pixel = "".join(
            f"{row[k]:>7.3f}" if row[k] is not None else f"{'-':>7}" for k in ("pixel_auroc", "pro")
        )
        mark = " (best)" if row["auroc"] == best else ""
        print(
            f"  {row['candidate']:<15}{row['auroc']:>7.3f}{pixel}{row['fpr']:>7.3f}"
            f"{row['recall']:>7.3f}{row['best_recall']:>7.3f}{row['seconds']:>6.0f}"
            f"  {', '.join(by)}{mark}"
        )
    for kind in ("default", "select"):
        if kind in result["picks"]:
            name = result["picks"][kind]
            auroc = next(r["auroc"] for r in result["rows"] if r["candidate"] == name)
            print(f"  {kind} -> {name}: {auroc:.3f}, {best - auroc:.3f} below the best")


def print_protocol(results: list[dict]) -> None:
    """The default against the previous default on every category, and the verdict: kept
    only where no category drops by more than ``MAX_DROP``."""
    print(f"\ndefault against the previous default ({PREVIOUS_DEFAULT}), change per category:")
    print(f"  {'category':<15}{'AUROC':>8}{'pixel':>8}{'PRO':>8}")
    drops = []
    for result in results:
        rows = {row["candidate"]: row for row in result["rows"]}
        new, old = rows.get(result["picks"].get("default")), rows.get(PREVIOUS_DEFAULT)
        if new is None or old is None:
            print(f"  {result['category']:<15}  (the default or the previous one was not run)")
            continue
        changes = [
            None if new[k] is None or old[k] is None else new[k] - old[k]
            for k in ("auroc", "pixel_auroc", "pro")
        ]
        drops += [-c for c in changes if c is not None]
        text = "".join(f"{'-':>8}" if c is None else f"{c:>+8.3f}" for c in changes)
        print(f"  {result['category']:<15}{text}")
    if drops:
        verdict = "kept" if max(drops) <= MAX_DROP else "REFUSED"
        print(f"  largest drop {max(0.0, *drops):.3f} (limit {MAX_DROP}): {verdict}")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "true")
    if args.child:
        args.result.write_text(json.dumps(run_category(args)))
        return
    from gaussian_ad.data.images import mvtec_categories

    missing = [root for root in args.data_roots if not root.is_dir()]
    if missing:
        sys.exit(
            f"no data at {', '.join(map(str, missing))}: pass DATA_ROOT folders (MVTec layout)"
        )
    pairs = [
        (root, category)
        for root in args.data_roots
        for category in mvtec_categories(root)
        if not args.category or category in args.category
    ]
    print(machine_summary())
    print(f"data:    {', '.join(f'{root}/{category}' for root, category in pairs)}")
    results = []
    for root, category in pairs:
        out = Path(f"/tmp/accuracy-{os.getpid()}-{category}.json")
        command = [sys.executable, __file__, str(root), "--child", category]
        command += ["--result", str(out), "--target-fpr", str(args.target_fpr)]
        command += ["--candidates", args.candidates]
        command += ["--input-size", str(args.input_size)] if args.input_size else []
        command += ["--select"] if args.select else []
        subprocess.run(command, check=True)
        results.append(json.loads(out.read_text()))
        out.unlink()
        print_category(results[-1])
    print_protocol(results)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine_summary(), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
