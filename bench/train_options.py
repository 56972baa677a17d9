"""Cost of the training flow's beyond-the-paper options (a benchmark, not a test).

Runs the training flow side by side in one process, per category of a synthetic
MVTec-layout dataset (outside the git tree), with each option set: the paper's model
(default), ``patch=True`` (patch-level model from the same extraction pass),
``score="fused"`` (with ``patch=True``) and ``select=True`` (configuration chosen on
synthetic defects first, default grid).
Reports wall time, its ratio to the default run, the chosen score's test AUROC and the
pixel AUROC. The Prefect API is the ephemeral one and MLflow a SQLite file in a temporary
home, started before the first timed run (a warm-up run on the first category); every
run extracts afresh (the feature stores are removed between runs).

Then the peak RSS of the out-of-core patch fit (``patch_moments`` on a Zarr store of random
patch features, in a fresh subprocess per row count): the statistics are sums, so the
peak must not grow with the number of images.

    .venv/bin/python bench/train_options.py [--workdir /work/bench-data/options]
        [--n-train 50] [--categories weave disc] [--store-rows 100 200 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_summary  # noqa: E402

from gaussian_ad.config import DetectorConfig  # noqa: E402
from gaussian_ad.data.synthetic import CATEGORIES, make_dataset  # noqa: E402

OPTION_SETS = {  # TrainOptions fields, besides home and experiment
    "default": {},
    "patch": {"detector": DetectorConfig(patch=True)},
    "fused": {"detector": DetectorConfig(patch=True, score="fused")},
    "select": {"select": True},
}
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/options"))
    parser.add_argument("--n-train", type=int, default=50)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--store-rows", type=int, nargs="+", default=[100, 200, 1000])
    parser.add_argument("--measure-store", type=int, metavar="ROWS", help="internal")
    return parser.parse_args()


def flow_costs(args: argparse.Namespace) -> None:
    from gaussian_ad_flows.options import TrainOptions
    from gaussian_ad_flows.train import train

    data = args.workdir / "data"
    if not data.exists():
        make_dataset(data, n_train=args.n_train, n_test_good=20, n_test_per_defect=6, seed=5)
    with tempfile.TemporaryDirectory(dir=args.workdir) as home:
        os.environ["GAUSSIAN_AD_HOME"] = home
        train(str(data), args.categories[0], TrainOptions(home=home, experiment="warm-up"))
        print(
            f"{'category':<10}{'options':<9}{'seconds':>9}{'ratio':>7}{'score':>7}"
            f"{'AUROC':>7}{'pixel':>7}"
        )
        for category in args.categories:
            base = None
            for label, options in OPTION_SETS.items():
                shutil.rmtree(Path(home) / "stores", ignore_errors=True)  # no reuse across runs
                started = time.perf_counter()
                run_options = TrainOptions(home=home, experiment=label, **options)
                result = train(str(data), category, run_options)
                seconds = time.perf_counter() - started
                base = base or seconds
                pixel = result.get("pixel_auroc", float("nan"))
                print(
                    f"{category:<10}{label:<9}{seconds:>9.1f}{seconds / base:>7.2f}"
                    f"{result['score']:>7}{result['auroc']:>7.3f}{pixel:>7.3f}",
                    flush=True,
                )


def measure_store(rows: int, workdir: Path) -> None:
    """Child process: write a store of random patch features, fit it out-of-core, print RSS."""
    import dask

    from gaussian_ad.data.images import ImageRecord
    from gaussian_ad.store.feature_store import FeatureStore
    from gaussian_ad.store.outofcore import patch_moments

    grid, dim, shard = 28, 100, 50
    records = [ImageRecord(path=f"img{i:06d}.png") for i in range(rows)]
    layout = {"levels": [3, 4, 5], "grid": grid, "channels": list(range(dim))}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = FeatureStore.create(
            f"{tmp}/s.zarr", records, [1], [4], shard_size=shard, patch_layout=layout
        )
        rng = np.random.default_rng(0)
        for s in range(store.n_shards):
            r = store.shard_rows(s)
            n = r.stop - r.start
            x = rng.normal(size=(n, grid * grid, dim)).astype(np.float32)
            store.write_shard(
                s, [np.zeros((n, 4), np.float32)], np.ones(n, bool), ["h"] * n, patches=x
            )
        before = _hwm()
        started = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=2):
            moments = patch_moments(FeatureStore.open(store.url))
        seconds = time.perf_counter() - started
        print(f"{rows} {moments.n} {before / MIB:.0f} {_hwm() / MIB:.0f} {seconds:.1f}")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def store_memory(args: argparse.Namespace) -> None:
    print("\nout-of-core patch fit (28 x 28 grid, d = 100, chunks of 50 rows, 2 threads)")
    print(f"{'rows':>6}{'store MiB':>11}{'RSS before':>12}{'peak RSS':>10}{'seconds':>9}")
    for rows in args.store_rows:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--measure-store",
                str(rows),
                "--workdir",
                str(args.workdir),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        size = rows * 28 * 28 * 100 * 4 / MIB
        print(f"{out[0]:>6}{size:>11.0f}{out[2]:>12}{out[3]:>10}{out[4]:>9}", flush=True)


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.measure_store:
        measure_store(args.measure_store, args.workdir)
        return
    print(machine_summary())
    flow_costs(args)
    store_memory(args)


if __name__ == "__main__":
    main()
