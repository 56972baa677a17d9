"""The production topology on loopback: infra/docker-compose.yml's services as processes.

PostgreSQL (metadata of both servers), an ``mlflow server`` and a ``prefect server`` on it,
a Dask scheduler and two single-threaded ``GPU=1`` workers, all on 127.0.0.1. The training
and scoring flows run against them; a second case kills a worker during extraction.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import psutil
import pytest
from distributed import Client
from mlflow.tracking import MlflowClient

from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.store.feature_store import FeatureStore
from tests.services import (
    Postgres,
    dask_scheduler,
    dask_worker,
    mlflow_server,
    postgres,
    prefect_server,
    running,
)

pytestmark = pytest.mark.integration

CATEGORY = "disc"
NAME = f"gaussian-ad-{CATEGORY}"
FLOW_TIMEOUT = 300  # seconds; a flow takes about one minute on 2 CPU cores
T = TypeVar("T")


@dataclass(frozen=True)
class Services:
    """The long-lived services: PostgreSQL, MLflow and Prefect servers."""

    db: Postgres
    mlflow_uri: str
    prefect_api: str


@dataclass(frozen=True)
class Cluster:
    """A Dask scheduler and its ``dask worker`` processes (each a nanny and its worker)."""

    address: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def worker_pids(self, client: Client) -> dict[str, int]:
        """Worker address -> pid of the worker process that runs tasks."""
        return client.run(os.getpid)


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[Services]:
    """PostgreSQL with databases mlflow and prefect, and both servers on it."""
    workdir = tmp_path_factory.mktemp("topology")
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        db = stack.enter_context(postgres(workdir, ["mlflow", "prefect"]))
        # Both run their schema migrations on first start: start them side by side.
        jobs = [
            pool.submit(mlflow_server, workdir, db.url("mlflow")),
            pool.submit(prefect_server, workdir, db.url("prefect", driver="asyncpg")),
        ]
        wait(jobs)
        for job in jobs:
            if job.exception() is None:
                stack.enter_context(running(job.result()[0]))
        yield Services(db, jobs[0].result()[1], jobs[1].result()[1])


@pytest.fixture
def cluster(services, tmp_path) -> Iterator[Cluster]:
    """A fresh scheduler and two workers per test (the kill case leaves one)."""
    env = {"PREFECT_API_URL": services.prefect_api, "MLFLOW_TRACKING_URI": services.mlflow_uri}
    with contextlib.ExitStack() as stack:
        scheduler, address = dask_scheduler(tmp_path)
        stack.enter_context(running(scheduler))
        workers = [
            stack.enter_context(running(dask_worker(tmp_path, address, f"gpu-{i}", env)))
            for i in range(2)
        ]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=300)  # slow on a loaded 2-core machine
        yield Cluster(address, workers)


@pytest.fixture
def on_services(services, monkeypatch) -> Iterator[str]:
    """Flows of this test record to the services; yields a tag put on its Prefect runs.

    Only inside the test: Prefect's setting and MLflow's URI are restored afterwards, so
    Prefect's test harness and the session's mlflow server of other modules are untouched.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from prefect import tags
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_uri)
    tag = f"topology-{uuid.uuid4().hex[:8]}"
    with (
        temporary_settings({PREFECT_API_URL: services.prefect_api}),
        _use_tracking_uri(services.mlflow_uri),
        tags(tag),
    ):
        yield tag
        # Send what Prefect's log and event workers still hold while these services live:
        # left queued, they would be flushed to a stopped server when the session ends.
        APILogWorker.drain_all(timeout=60)
        EventsWorker.drain_all(timeout=60)


def prefect_runs(tag: str) -> dict[str, list]:
    """Flow name -> this test's flow runs, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
        names = {run.flow_id: client.read_flow(run.flow_id).name for run in runs}
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(names[run.flow_id], []).append(run)
    return found


def task_states(flow_run_id: uuid.UUID, name: str, expected: int, timeout: float = 60) -> list:
    """State types of a flow run's task runs called ``name``, once all are recorded and final.

    Task runs reach the server as events (from the Dask workers), so they may lag the flow.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)),
            )
            states = [r.state_type.value if r.state_type else None for r in runs]
            if len(states) >= expected and all(
                s in ("COMPLETED", "FAILED", "CRASHED") for s in states
            ):
                return states
            if time.monotonic() > deadline:
                return states
            time.sleep(1)


def within(seconds: float, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` in this context, failing instead of hanging past ``seconds``.

    A flow waits forever for Dask workers that are all gone; the thread is a daemon, so a
    failed test still ends (the fixtures then stop the services).
    """
    context = contextvars.copy_context()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = context.run(function, *args, **kwargs)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} did not finish in {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def query(db: Postgres, database: str, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of one query run directly in PostgreSQL."""
    with contextlib.closing(db.connect(database)) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def test_training_and_scoring_run_on_the_services(
    services, cluster, on_services, small_dataset, tmp_path
):
    from gaussian_ad_flows.runtime import dask_runner
    from gaussian_ad_flows.score import score
    from gaussian_ad_flows.train import train_all

    home = str(tmp_path / "home")
    [result] = within(
        FLOW_TIMEOUT,
        train_all,
        str(small_dataset),
        [CATEGORY],
        dask_address=cluster.address,
        options={"shard_size": 8, "home": home},
    )

    # Extraction shards ran on both Dask worker processes (children of our `dask worker`s).
    with Client(cluster.address, timeout=30) as client:
        pids = cluster.worker_pids(client)
    assert len(set(pids.values())) == 2
    nannies = {w.pid for w in cluster.workers}
    assert {psutil.Process(pid).ppid() for pid in pids.values()} == nannies
    store = FeatureStore.open(result["store"])
    assert len(result["shards"]) == store.n_shards > 2
    assert {s["pid"] for s in result["shards"]} == set(pids.values())
    assert {s["host"] for s in result["shards"]} == {socket.gethostname()}

    # The model version and its tags, through the MLflow server and in its PostgreSQL.
    version = MlflowClient(services.mlflow_uri).get_model_version_by_alias(NAME, "champion")
    assert version.version == result["version"]
    assert float(version.tags["auroc"]) == pytest.approx(result["auroc"], abs=1e-6)
    number = int(result["version"])
    aliases = dict(
        query(
            services.db,
            "mlflow",
            "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
            (NAME,),
        )
    )
    assert aliases == {"champion": number}  # a first version: champion, no challenger
    tags = dict(
        query(
            services.db,
            "mlflow",
            "SELECT key, value FROM model_version_tags WHERE name = %s AND version = %s",
            (NAME, number),
        )
    )
    assert tags["backbone"] == "lite0" and tags["auroc"] == version.tags["auroc"]
    assert query(
        services.db,
        "mlflow",
        "SELECT status FROM model_versions WHERE name = %s AND version = %s",
        (NAME, number),
    ) == [("READY",)]

    # Scoring with the champion, on the same scheduler.
    source = small_dataset / CATEGORY / "test"
    n_images = len(mvtec_manifest(small_dataset, CATEGORY, splits=("test",)))
    out = tmp_path / "scores"
    summary = within(
        FLOW_TIMEOUT,
        score.with_options(task_runner=dask_runner(cluster.address)),
        str(source),
        category=CATEGORY,
        out=str(out),
        shard_size=8,
        home=home,
    )
    table = pd.concat(pd.read_parquet(p) for p in sorted((out / "scores").glob("part-*.parquet")))
    assert summary["scored"] == len(table) == n_images and summary["errors"] == 0
    assert table["path"].is_unique
    assert set(table["model_version"]) == {result["version"]}

    # The flow runs and their tasks, in the PostgreSQL-backed Prefect server.
    runs = prefect_runs(on_services)
    assert {name: len(r) for name, r in runs.items()} == {"train-all": 1, "train": 1, "score": 1}
    assert all(r[0].state_type.value == "COMPLETED" for r in runs.values())
    states = task_states(runs["train"][0].id, "extract-shard", store.n_shards)
    assert states == ["COMPLETED"] * store.n_shards
    ids = [str(r[0].id) for r in runs.values()]
    recorded = query(
        services.db,
        "prefect",
        "SELECT state_type FROM flow_run WHERE id = ANY(%s::uuid[])",
        (ids,),
    )
    assert recorded == [("COMPLETED",)] * 3


def test_extraction_survives_a_killed_worker(
    services, cluster, on_services, small_dataset, tmp_path
):
    from gaussian_ad_flows.train import train_all

    home = tmp_path / "home"
    killed: dict = {}
    done = threading.Event()
    client = Client(cluster.address, timeout=30)

    def kill_a_busy_worker() -> None:
        """SIGKILL a worker (nanny and all) while it runs a shard, both workers being up.

        Preferably one that already committed a shard, so that results it held are lost
        too (Dask recomputes them: the task re-runs and finds its shard complete).
        """
        while not done.is_set():
            markers = list(home.glob("stores/*/*.zarr/shards/*.json"))
            processing = client.processing() if markers else {}
            pids = cluster.worker_pids(client) if len(processing) == 2 else {}
            committed = {json.loads(m.read_text())["info"]["pid"] for m in markers}
            busy = [a for a, keys in processing.items() if keys and a in pids]
            chosen = [a for a in busy if pids[a] in committed] or (busy if len(markers) > 2 else [])
            if chosen:
                pid = pids[chosen[0]]
                group = os.getpgid(pid)
                os.killpg(group, signal.SIGKILL)
                after_kill = home.glob("stores/*/*.zarr/shards/*.json")
                killed.update(pid=pid, group=group, before={m.name for m in after_kill})
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    try:
        [result] = within(
            FLOW_TIMEOUT,
            train_all,
            str(small_dataset),
            [CATEGORY],
            dask_address=cluster.address,
            options={"shard_size": 4, "home": str(home)},
        )
    finally:
        done.set()
        killer.join()
        client.close()
    assert killed, "no worker was killed: extraction finished too fast"
    assert killed["group"] in {w.pid for w in cluster.workers}
    assert sum(w.poll() is None for w in cluster.workers) == 1

    # Every image exactly once: one marker per shard, every row valid and finite.
    store = FeatureStore.open(result["store"])
    assert store.n_shards > 4
    shards = Path(result["store"]) / "shards"
    assert sorted(p.name for p in shards.iterdir()) == [
        f"{s:06d}.json" for s in range(store.n_shards)
    ]
    infos = [store.shard_marker(s)["info"] for s in range(store.n_shards)]
    assert [i["shard"] for i in infos] == list(range(store.n_shards))
    assert sum(i["rows"] for i in infos) == store.n_rows
    assert store.valid().sum() == store.n_rows
    for level in store.levels:
        assert np.isfinite(store.read_level(level)).all()
    # Shards committed after the kill ran on the other worker.
    after = [i for i in infos if f"{i['shard']:06d}.json" not in killed["before"]]
    assert after and killed["pid"] not in {i["pid"] for i in after}

    # A registered model, and the run completed in Prefect.
    version = MlflowClient(services.mlflow_uri).get_model_version(NAME, result["version"])
    assert version.tags["n_train"] == "25"  # every train/good image
    runs = prefect_runs(on_services)
    assert runs["train"][0].state_type.value == "COMPLETED"
    states = task_states(runs["train"][0].id, "extract-shard", store.n_shards)
    assert states.count("COMPLETED") == store.n_shards, states
