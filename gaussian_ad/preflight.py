"""Checks made before a run's work starts, so that it fails in seconds and says why.

- Where output goes: the folder is created if missing and a temporary file is written and
  removed in it (permission bits alone say nothing for root or a read-only mount).
- The services a run talks to answer within :data:`SERVICE_TIMEOUT` seconds
  (``GAUSSIAN_AD_SERVICE_TIMEOUT``): an MLflow tracking server, a Prefect API, a Dask
  scheduler. A service lost later is bounded by :func:`bound_mlflow_retries`.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

SERVICE_TIMEOUT = float(os.environ.get("GAUSSIAN_AD_SERVICE_TIMEOUT", 5))
"""Seconds a service may take to answer the check before the run is refused."""
MLFLOW_RETRIES = {
    # MLflow's defaults (7 retries, back-off factor 2, 120 s per request) retry a server
    # that is gone for minutes; these end a request within about 3 x 15 s + 6 s.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


class PreflightError(RuntimeError):
    """A run that cannot start: where its output goes, or a service it needs (one line)."""


def writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """``folder``, created if missing, after writing and removing a temporary file in it."""
    folder = Path(folder).expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under the file {existing}"
        raise PreflightError(f"{what} {folder}: {where}, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".gaussian-ad-write-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        reason = error.strerror or str(error)
        raise PreflightError(f"{what} {folder}: cannot write there: {reason}") from None
    return folder


def writable_file(path: str | Path, what: str = "output file") -> Path:
    """``path``, once its folder is writable (see :func:`writable_folder`) and it is not a
    folder itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PreflightError(f"{what} {path}: is a folder, not a file")
    writable_folder(path.parent, f"{what} {path}: its folder")
    return path


def service_answers(url: str, name: str, timeout: float = SERVICE_TIMEOUT) -> None:
    """Raise :class:`PreflightError` unless ``url`` answers HTTP within ``timeout`` seconds
    (any status counts: the service is there); ``name`` says which service, and where."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise PreflightError(
            f"{name} does not answer within {timeout:g} s ({reason}); start it or fix the address"
        ) from None


def mlflow_answers(uri: str | None, timeout: float = SERVICE_TIMEOUT) -> None:
    """Check an ``http(s)`` MLflow tracking URI (others are files or databases: no server)."""
    if uri and uri.startswith(("http://", "https://")):
        service_answers(f"{uri.rstrip('/')}/health", f"MLflow at {uri}", timeout)


def prefect_answers(url: str | None, timeout: float = SERVICE_TIMEOUT) -> None:
    """Check a Prefect API URL (``.../api``) through its health endpoint."""
    if url:
        service_answers(f"{url.rstrip('/')}/health", f"the Prefect API at {url}", timeout)


def dask_answers(address: str | None, timeout: float = SERVICE_TIMEOUT) -> None:
    """Check that a ``tcp://`` or ``tls://`` Dask scheduler accepts connections."""
    if not address:
        return
    parsed = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or parsed.hostname is None or parsed.port is None:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise PreflightError(
            f"the Dask scheduler at {address} does not answer within {timeout:g} s ({reason}); "
            "start it or fix the address"
        ) from None


def bound_mlflow_retries() -> None:
    """Bound how long one MLflow request retries a lost server (unless already set)."""
    for key, value in MLFLOW_RETRIES.items():
        os.environ.setdefault(key, value)
