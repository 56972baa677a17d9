"""Which augmentations help the paper's augmented fit, one transform at a time (a benchmark).

For every MVTec-layout category under DATA_ROOT (default: ``../shared/devdata/visa`` next to
the repository), the paper's image-level model (all 9 levels, no reduction) is fitted on
the statistics of train/good plus ``--passes`` augmented passes over it, with one family of
transforms switched on at a time (``gaussian_ad.data.augment.AugmentConfig``: photometric,
flips, 90-degree rotations, shift-scale-rotate), with all of them, and with none (the plain
fit). Augmented features are reduced straight into sums
(:func:`~gaussian_ad.features.shards.augmented_moments`), as the out-of-core fit does.
Prints the test image AUROC of each and its difference to the plain fit, and the machine.

    .venv/bin/python bench/augmentation.py [DATA_ROOT] [--category fryum] [--passes 2]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from accuracy import DEFAULT_ROOT
from machine import machine_summary

FAMILIES = ("photometric", "flips", "rotate90", "shift_scale_rotate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", nargs="?", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", action="append", help="default: every category")
    parser.add_argument("--passes", type=int, default=2, help="augmented passes per setting")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from gaussian_ad.backbones.models import cached_backbone
    from gaussian_ad.data.augment import AugmentConfig
    from gaussian_ad.data.images import mvtec_categories, mvtec_manifest
    from gaussian_ad.evaluation.evaluate import split_records
    from gaussian_ad.features.extract import extract
    from gaussian_ad.features.shards import augmented_moments
    from gaussian_ad.stats.gaussian import GaussianAD
    from gaussian_ad.stats.metrics import auroc
    from gaussian_ad.stats.moments import Moments

    print(machine_summary())
    backbone = cached_backbone("lite0", tuple(range(1, 10)), None, True, "cpu")
    off = AugmentConfig(flips=False, rotate90=False, shift_scale_rotate=False, photometric=False)
    settings = {"none": None, **{f: replace(off, **{f: True}) for f in FAMILIES}}
    settings["all"] = AugmentConfig()
    for category in args.category or mvtec_categories(args.data_root):
        train, test = split_records(mvtec_manifest(args.data_root, category))
        paths = [r.path for r in train]
        plain = [Moments.from_array(x) for x in extract(backbone, paths).pooled]
        test_features = extract(backbone, [r.path for r in test])
        labels = [test[i].label for i in test_features.index]
        print(f"\n{category}: {len(paths)} train, {len(labels)} test, {args.passes} passes")
        base = None
        for name, config in settings.items():
            start = time.perf_counter()
            moments = plain
            if config is not None:
                extra = augmented_moments(backbone, paths, args.passes, config)
                moments = [a + b for a, b in zip(plain, extra, strict=True)]
            model = GaussianAD().fit_moments(moments)
            value = auroc(labels, model.anomaly_scores(test_features.pooled))
            base = value if base is None else base
            print(
                f"  {name:<20} AUROC {value:.3f}  ({value - base:+.3f})  "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
