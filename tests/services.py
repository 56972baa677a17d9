"""Start and stop real services on 127.0.0.1 for the tests (processes, stopped by pid)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg2.extensions

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    command: list[str], log: Path, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.Popen:
    """Start a service in its own process group, output to ``log``, as ``user`` if given."""
    handle = log.open("ab")
    return subprocess.Popen(
        command,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        **as_user(user),
    )


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``url`` answers 200, failing early with the log if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: service exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
    """Stop a service and its children by process group: ``sig``, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)
    except ProcessLookupError:
        pass


def mlflow_server(workdir: Path, backend_uri: str | None = None) -> tuple[subprocess.Popen, str]:
    """An ``mlflow server`` on a free loopback port; returns (process, tracking URI)."""
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    log = workdir / "mlflow-server.log"
    process = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(workdir / "mlartifacts"),
            "--workers",
            "1",
        ],
        log,
        # No job runner: its huey consumers (seven processes, 240 MB each) serve MLflow's
        # GenAI jobs, which the registry does not use, and cost about 3 s of every start.
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", process, log)
    except BaseException:
        stop(process)
        raise
    return process, uri


@contextlib.contextmanager
def running(process: subprocess.Popen, sig: int = signal.SIGTERM) -> Iterator[subprocess.Popen]:
    """Yield ``process``; stop its process group on exit, also on failure."""
    try:
        yield process
    finally:
        stop(process, sig=sig)


def postgres_bin() -> Path:
    """PostgreSQL's server binaries, installing Debian's ``postgresql`` package if missing."""
    for attempt in range(2):
        found = shutil.which("initdb")
        if found and shutil.which("postgres", path=str(Path(found).parent)):
            return Path(found).parent
        folders = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"), key=lambda f: int(Path(f).parent.name)
        )
        if folders:
            return Path(folders[-1])
        if attempt or os.geteuid() != 0 or not shutil.which("apt-get"):
            break
        apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=apt)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=apt)
    raise RuntimeError("PostgreSQL not found; install it (apt-get install postgresql)")


def postgres_user() -> str | None:
    """The user to run PostgreSQL as: None unless root (which it refuses), then ``postgres``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "postgres"], check=True
        )
    return "postgres"


def as_user(user: str | None) -> dict[str, Any]:
    """``subprocess`` keyword arguments that run a child as ``user`` (None: as this process)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


@dataclass(frozen=True)
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, user postgres)."""

    process: subprocess.Popen
    port: int

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL of ``database``."""
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg2.extensions.connection:
        """A psycopg2 connection to ``database``."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)

    def wait(self, log: Path, timeout: float = 60) -> None:
        """Wait until the server accepts connections, failing early if it exited."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            try:
                self.connect().close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        raise RuntimeError(f"postgres exited ({self.process.returncode}):\n{log.read_text()}")


@contextlib.contextmanager
def postgres(workdir: Path, databases: list[str]) -> Iterator[Postgres]:
    """A fresh cluster in a temporary folder with ``databases``; stopped and removed on exit."""
    binaries, user = postgres_bin(), postgres_user()
    # Outside pytest's 0700 tmp tree, so that the postgres user can enter it.
    data = Path(tempfile.mkdtemp(prefix="gaussian-ad-pg-"))
    try:
        if user:
            shutil.chown(data, user, user)
        initdb = [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        subprocess.run(initdb + ["--no-sync"], check=True, capture_output=True, **as_user(user))
        port, log = free_port(), workdir / "postgres.log"
        command = [
            str(binaries / "postgres"), "-D", str(data), "-p", str(port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
        ]  # fmt: skip
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for clients to disconnect).
        with running(start(command, log, user=user), sig=signal.SIGINT) as process:
            cluster = Postgres(process, port)
            cluster.wait(log)
            connection = cluster.connect()
            connection.autocommit = True
            with connection.cursor() as cursor:
                for name in databases:
                    cursor.execute(f'CREATE DATABASE "{name}"')
            connection.close()
            yield cluster
    finally:
        shutil.rmtree(data, ignore_errors=True)


def prefect_server(workdir: Path, database_url: str) -> tuple[subprocess.Popen, str]:
    """A ``prefect server start`` on a free loopback port; returns (process, API URL)."""
    port = free_port()
    log = workdir / "prefect-server.log"
    env = {
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = start(command, log, env)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", process, log, timeout=180)
    except BaseException:
        stop(process)
        raise
    return process, api


# A loaded 2-core CI machine can starve an event loop for tens of seconds.
DASK_ENV = {"DO_NOT_TRACK": "true", "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "120s"}


def dask_scheduler(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A ``dask scheduler`` on free loopback ports; returns (process, address)."""
    port, dashboard = free_port(), free_port()
    log = workdir / "dask-scheduler.log"
    command = [
        str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
        "--dashboard-address", f"127.0.0.1:{dashboard}",
    ]  # fmt: skip
    process = start(command, log, DASK_ENV)
    try:
        wait_http(f"http://127.0.0.1:{dashboard}/health", process, log)
    except BaseException:
        stop(process)
        raise
    return process, f"tcp://127.0.0.1:{port}"


def dask_worker(
    workdir: Path,
    address: str,
    name: str,
    env: dict[str, str] | None = None,
    preload: tuple[str, ...] = ("gaussian_ad_flows.train", "gaussian_ad_flows.score"),
) -> subprocess.Popen:
    """A ``dask worker`` (nanny + one single-threaded worker holding ``GPU=1``).

    ``preload`` modules are imported before the worker registers: unpickling the first task
    would otherwise import torch and the project on the worker's event loop.
    """
    command = [
        str(BIN / "dask"), "worker", address, "--name", name, "--host", "127.0.0.1",
        "--nthreads", "1", "--resources", "GPU=1", "--no-dashboard", "--death-timeout", "60",
    ]  # fmt: skip
    for module in preload:
        command += ["--preload", module]
    return start(command, workdir / f"dask-{name}.log", {**DASK_ENV, **(env or {})})
