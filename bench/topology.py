"""Training flow wall time: loopback production topology against the embedded default.

Embedded: a local Dask cluster per flow run, Prefect's ephemeral API, MLflow in SQLite.
Loopback: PostgreSQL, ``mlflow server`` and ``prefect server`` on it, a Dask scheduler and
two single-threaded ``GPU=1`` workers, all on 127.0.0.1 (tests/services.py), selected only
through the environment (PREFECT_API_URL, MLFLOW_TRACKING_URI, GAUSSIAN_AD_DASK_ADDRESS).
Each mode runs in a fresh process and trains the same synthetic category ``--runs`` times
(each into a fresh store); the breakdown comes from the Prefect API's task runs.

    .venv/bin/python -m bench.topology [--runs 2] [--shard-size 8] [--n-train 25]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("DO_NOT_TRACK", "true")

CATEGORY = "disc"
SERVICE_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "GAUSSIAN_AD_DASK_ADDRESS")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="training runs per mode")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=25, help="train/good images")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "HOME"), help=argparse.SUPPRESS)
    return parser.parse_args()


def task_breakdown(flow_run_id: Any, expected: int, timeout: float = 30) -> dict[str, float]:
    """Per task name: summed run time (s) of the flow run's task runs, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            done = [r for r in runs if r.end_time]
            if len(done) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        flow_run = client.read_flow_run(flow_run_id)
    sums: dict[str, float] = defaultdict(float)
    for r in done:
        sums[r.name.rsplit("-", 1)[0]] += (r.end_time - r.start_time).total_seconds()
    starts = [r.start_time for r in done if r.name.startswith("extract-shard")]
    ends = [r.end_time for r in done if r.name.startswith("extract-shard")]
    return {
        **sums,
        "extract-span": (max(ends) - min(starts)).total_seconds(),
        "flow-server": (flow_run.end_time - flow_run.start_time).total_seconds(),
    }


def child(data: str, home: str, runs: int, shard_size: int) -> list[dict[str, Any]]:
    """Train ``runs`` times in this process (configured by the environment); timings."""
    started = time.perf_counter()
    from gaussian_ad_flows.options import TrainOptions
    from gaussian_ad_flows.train import train

    imported = time.perf_counter() - started
    results = []
    for i in range(runs):
        started = time.perf_counter()
        folder = f"{home}/run{i}"
        options = TrainOptions(shard_size=shard_size, home=folder)
        state = train(data, CATEGORY, options, return_state=True)
        wall = time.perf_counter() - started
        result = state.result()
        shards = result["shards"]
        breakdown = task_breakdown(state.state_details.flow_run_id, len(shards) + 5)
        results.append(
            {
                "run": i,
                "wall": wall,
                "import": imported if i == 0 else 0.0,
                "shards": len(shards),
                "extract-compute": sum(s["seconds"] for s in shards),
                "workers": len({s["pid"] for s in shards}),
                **breakdown,
            }
        )
    return results


def run_mode(args: argparse.Namespace, data: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Run :func:`child` in a fresh interpreter with ``env`` over a service-free environment."""
    base = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    with tempfile.TemporaryDirectory() as home:
        out = Path(home) / "result.json"
        command = [sys.executable, "-m", "bench.topology", "--child", str(data), home]
        command += ["--runs", str(args.runs), "--shard-size", str(args.shard_size)]
        subprocess.run(command, check=True, env={**base, **env, "BENCH_OUT": str(out)})
        return json.loads(out.read_text())


@contextlib.contextmanager
def loopback(workdir: Path, timings: dict[str, float]) -> Any:
    """The services of infra/docker-compose.yml as processes; yields their environment."""
    from distributed import Client

    from tests.services import (
        dask_scheduler,
        dask_worker,
        mlflow_server,
        postgres,
        prefect_server,
        running,
    )

    with contextlib.ExitStack() as stack:
        clock = time.perf_counter()
        db = stack.enter_context(postgres(workdir, ["mlflow", "prefect"]))
        timings["postgres"], clock = time.perf_counter() - clock, time.perf_counter()
        process, mlflow_uri = mlflow_server(workdir, db.url("mlflow"))
        stack.enter_context(running(process))
        timings["mlflow server"], clock = time.perf_counter() - clock, time.perf_counter()
        process, api = prefect_server(workdir, db.url("prefect", driver="asyncpg"))
        stack.enter_context(running(process))
        timings["prefect server"], clock = time.perf_counter() - clock, time.perf_counter()
        env = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri}
        process, address = dask_scheduler(workdir)
        stack.enter_context(running(process))
        for i in range(2):
            stack.enter_context(running(dask_worker(workdir, address, f"gpu-{i}", env)))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=120)
        timings["dask scheduler + 2 workers"] = time.perf_counter() - clock
        yield {**env, "GAUSSIAN_AD_DASK_ADDRESS": address}


def report(name: str, rows: list[dict[str, Any]]) -> None:
    """One line per run: wall time and where it went."""
    keys = [
        "wall",
        "import",
        "flow-server",
        "build-manifest",
        "prepare-store",
        "extract-span",
        "extract-shard",
        "extract-compute",
        "fit-statistics",
        "evaluate",
        "register-model",
    ]
    print(f"\n{name}")
    print("run " + " ".join(f"{k:>15}" for k in keys) + "  workers")
    for row in rows:
        cells = " ".join(f"{row.get(k, float('nan')):15.2f}" for k in keys)
        print(f"{row['run']:>3} {cells}  {row['workers']:>7}")


def main() -> None:
    args = parse_args()
    if args.child:
        rows = child(*args.child, args.runs, args.shard_size)
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps(rows))
        return
    from gaussian_ad.data.synthetic import make_dataset

    with tempfile.TemporaryDirectory(prefix="gaussian-ad-bench-") as tmp:
        workdir = Path(tmp)
        data = make_dataset(
            workdir / "data", [CATEGORY], n_train=args.n_train, n_test_good=8,
            n_test_per_defect=3, size=160, seed=1,
        )  # fmt: skip
        embedded = run_mode(args, data, {})
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        with loopback(workdir, timings) as env:
            timings["all services"] = time.perf_counter() - clock
            served = run_mode(args, data, env)
            clock = time.perf_counter()
        timings["stop all"] = time.perf_counter() - clock
    print(f"{os.cpu_count()} CPUs; times in seconds; task columns sum Prefect task run times")
    report("embedded (local cluster, ephemeral API, SQLite MLflow)", embedded)
    report("loopback (PostgreSQL, mlflow server, prefect server, Dask scheduler)", served)
    print("\nloopback service start/stop")
    for name, seconds in timings.items():
        print(f"  {name:<28} {seconds:7.2f}")


if __name__ == "__main__":
    main()
