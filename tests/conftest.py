"""Shared fixtures: telemetry off, one Prefect harness, an mlflow server, synthetic data."""

from __future__ import annotations

import os
import shutil

os.environ["DO_NOT_TRACK"] = "true"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gaussian_ad.data.images import mvtec_manifest  # noqa: E402
from gaussian_ad.data.synthetic import make_dataset  # noqa: E402
from tests.services import mlflow_server, stop  # noqa: E402

pytest_plugins = ["tests.fault_support"]  # its fixtures, for the fault-injection test files


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset (3 categories), made once per session."""
    return make_dataset(
        tmp_path_factory.mktemp("data") / "synthetic",
        n_train=25,
        n_test_good=8,
        n_test_per_defect=3,
        size=160,
        seed=1,
    )


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API and database), once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """A real ``mlflow server`` process on 127.0.0.1 with a SQLite backend."""
    workdir = tmp_path_factory.mktemp("mlflow")
    process, uri = mlflow_server(workdir)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    stop(process)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def copy_new_normals(dataset: Path, category: str, n: int, folder: Path) -> Path:
    """A folder of ``n`` "new" normal images: copies of the category's first train images."""
    folder.mkdir()
    for record in mvtec_manifest(dataset, category, splits=("train",))[:n]:
        shutil.copy(record.path, folder / f"new_{Path(record.path).name}")
    return folder
