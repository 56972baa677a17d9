"""CPU per scored image: the default detector against the paper's configuration (a benchmark).

Both detectors are fitted on the same normal images (not timed), then score the same test
images in turns, ``--repeats`` times each, alternating (default, paper, default, ...), so
that the machine's load falls on both alike. Each turn's process CPU time (all threads:
decoding, the backbone, the scores and maps) per image is recorded; the medians and their
ratio are printed with the machine. The paper's configuration is ``--no-patch --input-size
224 --sum-levels``: Lite0 at its native side, the sum of the nine levels' distances.

    .venv/bin/python bench/cost.py [CATEGORY_DIR] [--n-train 40] [--n-test 64] [--repeats 3]

CATEGORY_DIR is an MVTec-layout category (default: ``../shared/devdata/visa/fryum``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from machine import machine_summary

DEFAULT_CATEGORY = Path(__file__).resolve().parents[1].parent / "shared/devdata/visa/fryum"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("category_dir", nargs="?", type=Path, default=DEFAULT_CATEGORY)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "true")
    if not args.category_dir.is_dir():
        sys.exit(f"no data at {args.category_dir}: pass an MVTec-layout category folder")
    from gaussian_ad.config import DetectorConfig
    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.detection.detector import Detector

    records = mvtec_manifest(args.category_dir.parent, args.category_dir.name)
    train = [r.path for r in records if r.split == "train"][: args.n_train]
    test = [r.path for r in records if r.split == "test"][: args.n_test]
    configs = {
        "default": DetectorConfig(),
        "paper": DetectorConfig(patch=False, input_size=224, standardize_levels=False),
    }
    detectors = {name: Detector(config).fit(train) for name, config in configs.items()}
    print(machine_summary())
    print(f"data:    {args.category_dir}: {len(train)} train (fit, not timed), {len(test)} scored")
    seconds: dict[str, list[float]] = {name: [] for name in detectors}
    for _ in range(args.repeats):
        for name, detector in detectors.items():
            start = time.process_time()
            detector.score(test, maps=detector.patch_model_ is not None)
            seconds[name].append((time.process_time() - start) / len(test))
    for name, config in configs.items():
        runs = ", ".join(f"{1000 * s:.1f}" for s in seconds[name])
        median = 1000 * statistics.median(seconds[name])
        print(f"  {name:<8} {config.describe()}: {median:.1f} ms CPU/image (runs {runs})")
    ratio = statistics.median(seconds["default"]) / statistics.median(seconds["paper"])
    print(f"  default / paper: {ratio:.2f}x CPU per image (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
