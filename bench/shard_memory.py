"""Peak memory of one scoring shard whose archive holds large members (a benchmark).

A zip holds ``--images`` synthetic test images and ``--large`` members of ``--large-mb`` MB
each (random bytes named like PNGs: they fail to decode, as large junk would). One shard
over all of them is scored in a fresh process, twice side by side: with the shard's bytes in
flight bounded (the default, ``scoring.outputs.BYTES_IN_FLIGHT``) and with the bound lifted
(every member held at once, as before the bound existed). Prints peak RSS of each.

    .venv/bin/python bench/shard_memory.py [--large 3 --large-mb 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine_summary  # noqa: E402


def child(model: str, archive: str, out: str, unbounded: bool) -> None:
    from gaussian_ad.data.sources import list_source
    from gaussian_ad.detection.detector import Detector
    from gaussian_ad.scoring import outputs

    if unbounded:
        outputs.BYTES_IN_FLIGHT = 1 << 62
    items, _ = list_source(archive)
    info = outputs.score_shard(Detector.load(model), items, 0, out, ("bench", "1"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak, "rows": info["rows"], "errors": info["errors"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=200)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, archive, out, unbounded = args.child
        child(model, archive, out, unbounded == "1")
        return

    from gaussian_ad.config import DetectorConfig
    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.data.synthetic import make_dataset
    from gaussian_ad.detection.detector import Detector

    print(machine_summary())
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "data", n_train=20, n_test_good=args.images, size=256)
        train = [r.path for r in mvtec_manifest(root, "disc", splits=("train",))]
        model = Detector(DetectorConfig()).fit(train[:16]).calibrate(train[16:])
        model_file = str(model.save(Path(tmp) / "m.safetensors"))
        archive = Path(tmp) / "big.zip"
        tests = mvtec_manifest(root, "disc", splits=("test",))[: args.images]
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for i, record in enumerate(tests):
                zf.write(record.path, f"img/{i:03d}.png")
            for i in range(args.large):
                zf.writestr(f"large/{i}.png", os.urandom(args.large_mb << 20))
        print(
            f"archive: {len(tests)} images + {args.large} x {args.large_mb} MB members, "
            f"{archive.stat().st_size / 2**20:.0f} MiB"
        )
        results = {}
        for label, unbounded in (("bounded (default)", "0"), ("unbounded (before)", "1")):
            out = Path(tmp) / f"out-{unbounded}"
            command = [sys.executable, __file__, "--child", model_file, str(archive), str(out)]
            done = subprocess.run([*command, unbounded], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        for label, result in results.items():
            print(
                f"{label:<20} peak RSS {result['peak_mib']:7.0f} MiB  rows {result['rows']}"
                f"  errors {result['errors']}"
            )
        bounded, unbounded = (r["peak_mib"] for r in results.values())
        print(f"ratio bounded / unbounded: {bounded / unbounded:.2f}")


if __name__ == "__main__":
    main()
