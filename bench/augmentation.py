"""Which augmentations help the default detector, one transform family at a time (a benchmark).

For every MVTec-layout category under DATA_ROOT (default: ``../shared/devdata/visa`` next to
the repository), the default detector (``DetectorConfig()``: fused score of standardised
levels, position-free patch model) is fitted on train/good plus ``--passes`` augmented
passes over it, with one family of transforms switched on at a time
(``gaussian_ad.data.augment.AugmentConfig``: photometric, flips, 90-degree rotations,
shift-scale-rotate), with all of them (the paper's), and with none (the plain fit). The
augmented rows are the feature store's (seed, row) and share their image's fold, as in the
training flow; the fit and its out-of-fold calibration are :meth:`Detector.fit_pass`.

It also scores, with the model fitted without fold 0, fold 0's normals as they are and
flipped or rotated: the AUROC of transformed against plain normals says whether the good
parts of the product look the same mirrored or turned (0.5: they do; 1: they never do).

Prints the test image AUROC of each setting and its difference to the plain fit, the
invariance AUROCs, the seconds per setting and the machine.

    .venv/bin/python bench/augmentation.py [DATA_ROOT] [--category fryum] [--passes 1]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from accuracy import DEFAULT_ROOT
from machine import machine_summary
from PIL import Image

FAMILIES = ("photometric", "flips", "rotate90", "shift_scale_rotate")
TURNS = {
    "mirrored left-right": Image.Transpose.FLIP_LEFT_RIGHT,
    "mirrored top-bottom": Image.Transpose.FLIP_TOP_BOTTOM,
    "turned 90 degrees": Image.Transpose.ROTATE_90,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", nargs="?", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", action="append", help="default: every category")
    parser.add_argument("--passes", type=int, default=1, help="augmented passes per setting")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from gaussian_ad.config import DetectorConfig, LoaderOptions
    from gaussian_ad.data.augment import AugmentConfig, SeededAugment
    from gaussian_ad.data.images import mvtec_categories, mvtec_manifest
    from gaussian_ad.detection.detector import Detector, TrainingPass
    from gaussian_ad.evaluation.evaluate import split_records
    from gaussian_ad.features.extract import Features, collect, iter_batches, source_label
    from gaussian_ad.features.layout import PatchLayout
    from gaussian_ad.stats.metrics import auroc
    from gaussian_ad.stats.patch_gaussian import BatchMoments
    from gaussian_ad.store.plan import fold_ids

    print(machine_summary())
    config, loader = DetectorConfig(), LoaderOptions()
    backbone = Detector(config, loader).backbone_module()
    layout = PatchLayout.for_config(backbone, config)
    off = AugmentConfig(flips=False, rotate90=False, shift_scale_rotate=False, photometric=False)
    settings = {f: replace(off, **{f: True}) for f in FAMILIES} | {"all": AugmentConfig()}

    def features(sources, transform=None) -> Features:
        batches = iter_batches(backbone, sources, loader, layout=layout, transform=transform)
        return collect(batches, backbone, layout)

    def training_pass(parts: list[Features], rows: np.ndarray | None = None) -> TrainingPass:
        pooled = [np.concatenate(level) for level in zip(*(p.pooled for p in parts), strict=True)]
        patches = np.concatenate([p.patches for p in parts])
        index = np.concatenate([p.index for p in parts])
        if rows is not None:
            pooled, patches, index = [x[rows] for x in pooled], patches[rows], index[rows]
        sums = BatchMoments.from_array(patches)
        return TrainingPass(pooled, backbone.levels, index, patches, sums, [])

    def scores(detector: Detector, found: Features) -> np.ndarray:
        levels = detector.image_levels_of(found.pooled)
        return detector.decide(detector.score_features(levels, found.patches)).scores

    for category in args.category or mvtec_categories(args.data_root):
        train, test = split_records(mvtec_manifest(args.data_root, category))
        paths = [r.path for r in train]
        start = time.perf_counter()
        plain = features(paths)
        test_found = features([r.path for r in test])
        labels = [test[i].label for i in test_found.index]
        keys = [source_label(paths[i], i) for i in plain.index]
        print(
            f"\n{category}: {len(paths)} train, {len(labels)} test, {args.passes} passes; "
            f"plain passes {time.perf_counter() - start:.0f} s"
        )

        folds = fold_ids(keys, seed=config.seed)
        kept, held = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
        without_fold = Detector(config, loader).fit_pass(
            training_pass([plain], kept), [keys[i] for i in kept], layout, None
        )
        held_paths = [paths[plain.index[i]] for i in held]
        as_they_are = scores(without_fold, features(held_paths))
        for name, turn in TURNS.items():
            turned = scores(without_fold, features(held_paths, lambda im, t=turn: im.transpose(t)))
            is_turned = np.r_[np.zeros(len(as_they_are)), np.ones(len(turned))]
            value = auroc(is_turned, np.r_[as_they_are, turned])
            print(f"  fold-0 normals {name}: AUROC against as they are {value:.3f}")

        base = None
        for name, augment in {"none": None, **settings}.items():
            start = time.perf_counter()
            parts, part_keys = [plain], list(keys)
            for p in range(args.passes if augment is not None else 0):
                rows = range(p * len(paths), (p + 1) * len(paths))
                found = features(paths, [SeededAugment(augment, config.seed, r) for r in rows])
                parts.append(found)
                part_keys += [source_label(paths[i], i) for i in found.index]  # its image's fold
            detector = Detector(config, loader).fit_pass(
                training_pass(parts), part_keys, layout, None
            )
            value = auroc(labels, scores(detector, test_found))
            base = value if base is None else base
            print(
                f"  {name:<20} AUROC {value:.3f}  ({value - base:+.3f})  "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
