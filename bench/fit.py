"""Peak memory and speed of the out-of-core fit (a benchmark, not a test).

Writes (or reuses) one synthetic single-level feature store per size, shard by shard, outside
the git tree; then runs ``gaussian_ad.store.outofcore.fit_store`` over each store in a fresh
subprocess and reports its peak RSS (``ru_maxrss``) and wall time. Target: the largest store's
peak RSS within 1.2x of the smallest's, and under 1.5 GB. Finally, on the smallest store, times
the Dask fit against ``sklearn.covariance.LedoitWolf().fit`` on the same in-memory array and
compares the precision matrices.

    .venv/bin/python bench/fit.py [--sizes 100000 1000000] [--dim 1280] [--shard-size 4096]
        [--workdir /work/bench-data/fit] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import zarr
from dask.callbacks import Callback

from gaussian_ad.data.images import ImageRecord
from gaussian_ad.stats.moments import Moments
from gaussian_ad.store.feature_store import FeatureStore
from gaussian_ad.store.outofcore import fit_store

LEVEL = 0
RSS_RATIO_TARGET = 1.2
RSS_LIMIT_BYTES = 1.5e9
PRECISION_RTOL = 1e-6
DISK_MARGIN_BYTES = 2 * 2**30
MIB = 2**20
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def parse_args() -> argparse.Namespace:
    """The command line (``--measure-fit`` is the internal child mode)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1280, help="feature dimension")
    parser.add_argument("--shard-size", type=int, default=4096, help="rows per shard (chunk)")
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench-data/fit"))
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (min is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-fit", metavar="URL", help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------ machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def meminfo_gib(field: str) -> float:
    """A field of /proc/meminfo in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine may be shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_machine() -> None:
    """CPU, memory, versions, BLAS/OpenMP thread pools and the BLAS environment."""
    from threadpoolctl import threadpool_info  # imported here: the fit children skip it

    print(f"cpu:        {cpu_model()} ({platform.machine()})")
    print(f"cores:      {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})")
    print(f"load:       {load_average()}")
    print(
        f"memory:     {meminfo_gib('MemTotal'):.1f} GiB total, "
        f"{meminfo_gib('MemAvailable'):.1f} GiB available"
    )
    print(
        f"versions:   python {platform.python_version()}, numpy {np.__version__}, "
        f"dask {dask.__version__}, zarr {zarr.__version__}, pandas {pd.__version__}"
    )
    scheduler = dask.config.get("scheduler", None) or "threads (default)"
    workers = dask.config.get("num_workers", None) or os.cpu_count()
    print(f"dask:       scheduler {scheduler}, {workers} workers")
    for pool in threadpool_info():
        print(
            f"threadpool: {pool['user_api']}/{pool['internal_api']} {pool.get('version')} "
            f"arch={pool.get('architecture', '-')} threads={pool['num_threads']} "
            f"({Path(pool['filepath']).name})"
        )
    for name in BLAS_ENV:
        print(f"env:        {name}={os.environ.get(name, '(unset)')}")


# ------------------------------------------------------------ synthetic store
def store_url(workdir: Path, n: int, dim: int, shard_size: int, seed: int) -> str:
    """Where the store of these parameters lives."""
    return str(workdir / f"gauss_n{n}_d{dim}_s{shard_size}_seed{seed}.zarr")


def generator(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Covariance factor (rows scaled by a decaying spectrum, condition ~81) and offset."""
    rng = np.random.default_rng([seed, 0])
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim) / 16.0)
    factor = (scales[:, None] * rotation.T).astype(np.float32)
    offset = rng.uniform(0.0, 2.0, dim).astype(np.float32)
    return factor, offset


def shard_rows(n: int, shard: int, factor: np.ndarray, offset: np.ndarray, seed: int) -> np.ndarray:
    """The rows of one shard: z @ factor + offset, z standard normal from (seed, shard)."""
    rng = np.random.default_rng([seed, 1, shard])
    return rng.standard_normal((n, factor.shape[0]), dtype=np.float32) @ factor + offset


def bytes_to_write(url: str, n: int, dim: int) -> int:
    """Uncompressed size of the rows the store at ``url`` still lacks."""
    if not FeatureStore.exists(url):
        return n * dim * 4
    store = FeatureStore.open(url)
    return len(store.pending_shards()) * store.shard_size * dim * 4


def check_disk(workdir: Path, needed: int) -> None:
    """Stop unless ``workdir`` has room for ``needed`` bytes plus a margin."""
    free = shutil.disk_usage(workdir).free
    print(f"disk:       {free / 2**30:.1f} GiB free in {workdir}, {needed / 2**30:.1f} GiB needed")
    if free < needed + DISK_MARGIN_BYTES:
        raise SystemExit(f"not enough disk space in {workdir} (keeping a 2 GiB margin)")


def ensure_store(url: str, n: int, dim: int, shard_size: int, seed: int) -> FeatureStore:
    """Open the store at ``url``, writing its missing shards first (resumable)."""
    config = {"generator": "gaussian-decaying-spectrum", "dim": dim, "seed": seed}
    started = time.perf_counter()
    records = [ImageRecord(path=f"row{i}") for i in range(n)]
    store = FeatureStore.create(url, records, [LEVEL], [dim], shard_size=shard_size, config=config)
    del records
    if store.config != config:
        raise SystemExit(f"{url} was generated with {store.config}, expected {config}")
    pending = store.pending_shards()
    if not pending:
        print(f"store:      {url}: complete, reused ({n} x {dim})")
        return store
    factor, offset = generator(dim, seed)
    for i, shard in enumerate(pending, 1):
        rows = store.shard_rows(shard)
        count = rows.stop - rows.start
        x = shard_rows(count, shard, factor, offset, seed)
        store.write_shard(shard, [x], np.ones(count, dtype=bool), [None] * count)
        if i % max(1, len(pending) // 10) == 0:
            print(f"  wrote {i}/{len(pending)} shards", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    size = sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())
    print(
        f"store:      {url}: wrote {len(pending)} shards ({n} x {dim}) in {elapsed:.1f} s, "
        f"{size / 2**30:.2f} GiB on disk"
    )
    return store


# ------------------------------------------------------------ fit, measured
def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: current RSS, VmHWM: peak RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PartialsWatch(Callback):
    """The most ``Moments`` partials the Dask scheduler held in memory at once."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def _posttask(self, key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
        held = sum(isinstance(v, Moments) for v in state["cache"].values())
        self.peak = max(self.peak, held)


def measure_fit(url: str) -> None:
    """Child process: fit over the store, print one JSON line of memory and time."""
    after_import = proc_status_bytes("VmRSS")
    store = FeatureStore.open(url)
    after_open = proc_status_bytes("VmRSS")
    watch = PartialsWatch()
    started = time.perf_counter()
    with watch:
        model = fit_store(store)
    wall = time.perf_counter() - started
    result = {
        "wall_s": wall,
        "rss_after_import": after_import,
        "rss_after_open": after_open,
        "rss_end": proc_status_bytes("VmRSS"),
        "vmhwm": proc_status_bytes("VmHWM"),
        "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "peak_partials": watch.peak,
        "partial_bytes": sum(a.nbytes for a in model.moments_[0].to_arrays().values()),
    }
    print(json.dumps(result))


def fit_in_subprocess(url: str) -> dict[str, Any]:
    """Run :func:`measure_fit` in a fresh interpreter and return its report.

    Linux carries a process's peak RSS over exec into ``ru_maxrss``, and a child spawned
    by this (large) process would start from our peak; so the fit runs as the grandchild
    of a small launcher.
    """
    script = str(Path(__file__).resolve())
    command = [sys.executable, "-c", LAUNCHER, sys.executable, script, "--measure-fit", url]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fit subprocess failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_fit(n: int, r: dict[str, Any]) -> None:
    """Peak RSS of one size, split into imports, opening the store and the fit itself."""
    opening = r["rss_after_open"] - r["rss_after_import"]
    fitting = r["maxrss_self"] - r["rss_after_open"]
    pad = " " * 17
    print(f"fit n={n:>9}: peak RSS {r['maxrss_self'] / MIB:.0f} MiB, wall {r['wall_s']:.1f} s")
    print(
        f"{pad}= imports {r['rss_after_import'] / MIB:.0f} + open store {opening / MIB:.0f} "
        f"+ fit {fitting / MIB:.0f} MiB; after the fit {r['rss_end'] / MIB:.0f} MiB; "
        f"VmHWM {r['vmhwm'] / MIB:.0f} MiB"
    )
    print(
        f"{pad}Dask held at most {r['peak_partials']} partials x "
        f"{r['partial_bytes'] / MIB:.1f} MiB; children's peak RSS "
        f"{r['maxrss_children'] / MIB:.0f} MiB"
    )


# ------------------------------------------------------------- vs scikit-learn
def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall times of ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def max_relative_difference(a: np.ndarray, reference: np.ndarray) -> float:
    """max |a - reference| / max |reference| (entrywise relative is undefined near zero)."""
    return float(np.max(np.abs(a - reference)) / np.max(np.abs(reference)))


def compare_sklearn(store: FeatureStore, repeats: int) -> None:
    """Time fit_store against LedoitWolf().fit on the in-memory features; compare precisions."""
    from sklearn.covariance import LedoitWolf  # imported here: the fit children skip it

    x = store.read_level(LEVEL)
    x64 = x.astype(np.float64)
    print(f"in-memory:  {x.shape} {x.dtype} ({x.nbytes / MIB:.0f} MiB), float64 copy made")
    print(f"load:       {load_average()} (before timing)")
    runs = {
        "fit_store (dask, from zarr)": lambda: fit_store(store).precisions_[0],
        "LedoitWolf().fit(float32 x)": lambda: LedoitWolf().fit(x).precision_,
        "LedoitWolf().fit(float64 x)": lambda: LedoitWolf().fit(x64).precision_,
    }
    times, precisions = {}, {}
    for name, fn in runs.items():
        times[name], precisions[name] = timed(fn, repeats)
        ts = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"time:       {name}: min {min(times[name]):6.2f} s  ({ts})")
    dask_name, lw32, lw64 = runs
    for name in (lw32, lw64):
        print(f"ratio:      {dask_name} / {name} = {min(times[dask_name]) / min(times[name]):.2f}")
    reference = precisions[lw64]
    for name in (dask_name, lw32):
        diff = max_relative_difference(precisions[name], reference)
        verdict = "OK" if diff <= PRECISION_RTOL else "EXCEEDS"
        print(
            f"precision:  {name} vs {lw64}: max|dP|/max|P| = {diff:.2e} "
            f"({verdict} {PRECISION_RTOL:g})"
        )


def main() -> None:
    args = parse_args()
    if args.measure_fit:
        measure_fit(args.measure_fit)
        return
    print_machine()
    sizes = sorted(set(args.sizes))
    args.workdir.mkdir(parents=True, exist_ok=True)
    urls = {n: store_url(args.workdir, n, args.dim, args.shard_size, args.seed) for n in sizes}
    check_disk(args.workdir, sum(bytes_to_write(urls[n], n, args.dim) for n in sizes))
    for n in sizes:
        ensure_store(urls[n], n, args.dim, args.shard_size, args.seed)

    fits = {n: fit_in_subprocess(urls[n]) for n in sizes}
    for n in sizes:
        print_fit(n, fits[n])
    small, large = fits[sizes[0]]["maxrss_self"], fits[sizes[-1]]["maxrss_self"]
    ratio = large / small
    meets = ratio <= RSS_RATIO_TARGET and large < RSS_LIMIT_BYTES
    print(
        f"target:     peak RSS n={sizes[-1]} / n={sizes[0]} = {ratio:.2f} "
        f"(<= {RSS_RATIO_TARGET}), largest {large / 1e9:.2f} GB (< {RSS_LIMIT_BYTES / 1e9} GB): "
        f"{'MET' if meets else 'MISSED'}"
    )
    compare_sklearn(FeatureStore.open(urls[sizes[0]]), args.repeats)


if __name__ == "__main__":
    main()
