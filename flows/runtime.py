"""Where flows run and record: work folder, MLflow URI, Dask cluster. Env vars or defaults.

- ``GAUSSIAN_AD_HOME``: work folder for feature stores and the embedded MLflow
  (default ``./.gaussian-ad``).
- ``MLFLOW_TRACKING_URI``: default ``sqlite:///$GAUSSIAN_AD_HOME/mlflow.db`` with
  artifacts in ``$GAUSSIAN_AD_HOME/mlartifacts``.
- ``GAUSSIAN_AD_DASK_ADDRESS``: a Dask scheduler; default a local cluster per flow.
- ``PREFECT_API_URL``: a Prefect server; default a temporary one for the process
  (:func:`prefect_api`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dask
from prefect.context import FlowRunContext
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from prefect_dask import DaskTaskRunner

from gaussian_ad import preflight
from gaussian_ad.cli_errors import bounded_exit, debugging

DRAIN_AFTER_FAILURE = 3.0
"""Seconds the temporary Prefect server waits for Prefect's log and event workers after a
failure or an interrupt before it stops."""


def work_dir(path: str | None = None) -> Path:
    """The folder for stores and the embedded MLflow database."""
    return Path(path or os.environ.get("GAUSSIAN_AD_HOME", ".gaussian-ad")).resolve()


def tracking_uri(path: str | None = None) -> str:
    """The MLflow tracking URI: $MLFLOW_TRACKING_URI or a SQLite file in the work folder."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = work_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(uri: str, path: str | None = None) -> str | None:
    """Where new experiments keep artifacts: beside the embedded SQLite database."""
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        return (work_dir(path) / "mlartifacts").as_uri()
    return None


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key made of ``parts``: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def dask_runner(address: str | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner on ``address`` / $GAUSSIAN_AD_DASK_ADDRESS, else a local cluster.

    The local cluster runs its workers as threads of this process: tasks share the one
    loaded backbone and Prefect's API (the ephemeral one included) instead of each
    worker process importing torch and starting an API of its own. One worker with two
    threads on CPU (torch and the decoding threads share the cores), one per GPU on CUDA.
    """
    address = address or os.environ.get("GAUSSIAN_AD_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    import torch

    # The dashboard listens on loopback only; say so in the link that gets logged.
    dask.config.set({"distributed.dashboard.link": "http://127.0.0.1:{port}/status"})
    gpus = torch.cuda.device_count()
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": max(gpus, 1),
            "threads_per_worker": 1 if gpus else 2,
            "processes": False,
            "dashboard_address": "127.0.0.1:0",  # loopback only: no authentication
            "worker_dashboard_address": "127.0.0.1:0",
            "silence_logs": logging.WARNING,
        }
    )


def check_before_run(mlflow: bool = True, dask_address: str | None = None) -> None:
    """Check, before a flow starts, where it writes (the work folder; ``PREFECT_HOME`` for
    the temporary server) and the services it talks to (MLflow when ``mlflow``, a Prefect
    API, a Dask scheduler): a :class:`~gaussian_ad.preflight.PreflightError` says which
    fails. MLflow's retries of a server lost later are bounded too."""
    preflight.bound_mlflow_retries()
    preflight.writable_folder(work_dir(), "GAUSSIAN_AD_HOME")
    if api := PREFECT_API_URL.value():
        preflight.prefect_answers(api)
    else:  # the temporary server keeps its database there
        preflight.writable_folder(PREFECT_HOME.value(), "PREFECT_HOME")
    if mlflow:
        preflight.mlflow_answers(os.environ.get("MLFLOW_TRACKING_URI"))
    preflight.dask_answers(dask_address or os.environ.get("GAUSSIAN_AD_DASK_ADDRESS"))


@contextlib.contextmanager
def flow_process() -> Iterator[str]:
    """Around a command's flows: Ctrl-C and SIGTERM end it within seconds
    (:func:`~gaussian_ad.cli_errors.bounded_exit`), the console log says each error in its
    line, and Prefect's API answers (:func:`prefect_api`); yields the API's URL."""
    with bounded_exit(), console_without_tracebacks(), prefect_api() as url:
        try:
            yield url
        except Exception as error:
            raise_if_services_lost(error)
            raise


def raise_if_services_lost(error: Exception) -> None:
    """After a failed run, say that a service it talked to stopped answering (the cause of
    ``error`` then, under whatever name the client gave it) as a
    :class:`~gaussian_ad.preflight.PreflightError`; return if every service answers."""
    timeout = min(preflight.SERVICE_TIMEOUT, 2.0)
    try:
        preflight.mlflow_answers(os.environ.get("MLFLOW_TRACKING_URI"), timeout)
        preflight.dask_answers(os.environ.get("GAUSSIAN_AD_DASK_ADDRESS"), timeout)
    except preflight.PreflightError as lost:
        raise preflight.PreflightError(
            f"{lost} (lost during the run; what was finished is kept: rerun to continue)"
        ) from error


class WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, but without its traceback or stack."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        plain = {**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None}
        return self.inner.format(logging.makeLogRecord(plain))


@contextlib.contextmanager
def console_without_tracebacks() -> Iterator[None]:
    """Prefect's console log without tracebacks, unless they were asked for (``--debug``):
    a failed task's exception is in its log line, the run's log in Prefect's UI keeps the
    traceback, and the command ends with one line that names the file or service."""
    root = logging.getLogger()
    handlers = [] if debugging() else [h for h in root.handlers if h.formatter is not None]
    formatters = [h.formatter for h in handlers]
    for handler, formatter in zip(handlers, formatters, strict=True):
        handler.setFormatter(WithoutTraceback(formatter))
    try:
        yield
    finally:
        for handler, formatter in zip(handlers, formatters, strict=True):
            handler.setFormatter(formatter)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Prefect's API for this process: ``PREFECT_API_URL`` when set, else a temporary server
    on 127.0.0.1 that lives exactly as long as this process.

    Prefect's own ephemeral server outlives a parent killed with SIGKILL; this one is
    started with ``PR_SET_PDEATHSIG``, so the kernel stops it when its parent dies. Before
    it stops, what Prefect's log and event workers hold is sent, also after a failure
    (then for at most :data:`DRAIN_AFTER_FAILURE` seconds): workers left holding records
    for a stopped server retry it for minutes at exit.
    """
    if url := PREFECT_API_URL.value():  # set in the environment, a profile or a test harness
        yield url
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, process)
        with temporary_settings({PREFECT_API_URL: url}):
            failed = True
            try:
                yield url
                failed = False
            finally:
                timeout = DRAIN_AFTER_FAILURE if failed else 30
                APILogWorker.drain_all(timeout=timeout)
                EventsWorker.drain_all(timeout=timeout)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies (Linux)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited ({process.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def gpu_annotation() -> Iterator[None]:
    """Ask for one ``GPU`` resource per task when the cluster's workers declare it."""
    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None) if context else None
    client = getattr(runner, "client", None)
    workers = client.scheduler_info(n_workers=-1)["workers"].values() if client else []
    if any("GPU" in w.get("resources", {}) for w in workers):
        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield
