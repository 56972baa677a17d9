"""Fault injection on whole processes: a CLI killed, interrupted, or run against a full
disk, a Prefect home under a file, a model file replaced between runs (split from
test_faults.py so that the two halves run on separate test workers)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow
import pyarrow.parquet as pq
import pytest

from gaussian_ad.detection.detector import patch_path
from gaussian_ad.scoring.run import RunConflict
from tests.fault_support import n_images, read_rows


@pytest.mark.integration
def test_the_temporary_prefect_server_dies_with_a_killed_cli(models, source, tmp_path):
    env = {**os.environ, "DO_NOT_TRACK": "true", "GAUSSIAN_AD_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).parent / "gaussian-ad"), "score-archive", source]
    command += ["--model", models[0], "--out", str(tmp_path / "out")]
    cli = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = None
        deadline = time.monotonic() + 120
        while server is None and time.monotonic() < deadline and cli.poll() is None:
            children = psutil.Process(cli.pid).children(recursive=True)
            server = next((c for c in children if "uvicorn" in " ".join(c.cmdline())), None)
            time.sleep(0.2)
        assert server is not None, "the CLI never started its Prefect server"
        cli.kill()
        cli.wait()
        assert psutil.wait_procs([server], timeout=20)[1] == [], "the server outlived the CLI"
    finally:
        if cli.poll() is None:
            cli.kill()


@pytest.mark.integration
def test_kill_9_at_any_point_loses_and_duplicates_no_row(models, source, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DO_NOT_TRACK": "true", "GAUSSIAN_AD_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).parent / "gaussian-ad"), "score-archive", source]
    command += ["--model", models[0], "--out", str(out), "--shard-size", "2"]

    def parts() -> int:
        return len(list((out / "scores").glob("part-*.parquet")))

    kill_points = {
        "mid-manifest": lambda: (out / "manifest.parquet").exists(),
        "mid-shard": lambda: parts() >= 1,
        "later, mid-write or mid-shard": lambda: parts() >= 4,
    }
    for point, reached in kill_points.items():
        cli = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 180
        while not reached() and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        cli.kill()
        cli.wait()
        assert cli.returncode == -9, f"{point}: the run ended before it could be killed"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    files = sorted((out / "scores").glob("part-*.parquet"))
    table = pyarrow.concat_tables(pq.read_table(f) for f in files).to_pandas()
    assert len(table) == n_images(source) and table["path"].is_unique
    assert len(files) == -(-n_images(source) // 2)


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 16 KiB tmpfs: the scoring run's first parts fill it (mounting needs root)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("a full disk is a tmpfs mounted here, which needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_ends_the_flow_in_one_line_without_retries(models, source, full_disk):
    env = {**os.environ, "GAUSSIAN_AD_HOME": str(full_disk.parent / "home")}
    env.pop("PREFECT_API_URL", None)  # the CLI's own temporary server, as a user runs it
    command = [sys.executable, "-m", "gaussian_ad.cli", "score-archive", source]
    command += ["--model", models[0], "--out", str(full_disk), "--shard-size", "64"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stderr
    last = run.stderr.splitlines()[-1]
    assert last.startswith(f"error: {full_disk}/") and "(ENOSPC)" in last, run.stderr
    # The task's failure is said in its log line, not retried, and no traceback is printed.
    assert "Traceback" not in run.stderr and "Retry" not in run.stderr, run.stderr
    assert not list(full_disk.rglob("*.tmp")) and not (full_disk / ".run.lock").exists()


def test_a_prefect_home_that_cannot_be_a_folder_is_named(models, source, tmp_path):
    (tmp_path / "file").write_text("a file")
    home = tmp_path / "file" / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home), "GAUSSIAN_AD_HOME": str(tmp_path / "h")}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "gaussian_ad.cli", "score-archive", source]
    command += ["--model", models[0], "--out", str(tmp_path / "out")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"error: PREFECT_HOME {home}: lies under the file {tmp_path / 'file'}" in run.stderr


@pytest.mark.integration
def test_a_model_file_replaced_before_a_rerun_is_refused(prefect_harness, models, source, tmp_path):
    from gaussian_ad_flows.score import score

    from gaussian_ad.scoring.run import file_digest

    model, out = tmp_path / "model.safetensors", tmp_path / "scores"
    shutil.copy(models[0], model)
    for original in models:  # the patch-level models, under the names the files record
        if patch_path(original).exists():
            shutil.copy(patch_path(original), tmp_path / patch_path(original).name)
    score(source, model=str(model), out=str(out), shard_size=8)
    for part in sorted((out / "scores").glob("part-*.parquet"))[1:]:
        part.unlink()  # a killed run
    old = file_digest(model)
    shutil.copy(models[1], model)  # `fit --out` over the same file meanwhile
    with pytest.raises(RunConflict, match=f"digest {old}, but the file now has digest "):
        score(source, model=str(model), out=str(out))
    assert len(list((out / "scores").glob("part-*.parquet"))) == 1  # nothing mixed in


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_run_exits_within_10_s_and_the_rerun_goes_on(
    sig, code, prefect_harness, models, source, tmp_path
):
    from gaussian_ad_flows.score import score

    out = tmp_path / "out"
    # A Prefect home under a folder that does not exist yet: created, not a crash.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "missing" / "prefect")}
    env |= {"GAUSSIAN_AD_HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "true"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "gaussian_ad.cli", "score-archive", source]
    command += ["--model", models[0], "--out", str(out), "--shard-size", "2"]
    cli = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not any((out / "scores").glob("part-*.parquet")) and cli.poll() is None:
            assert time.monotonic() < deadline, "no shard finished"
            time.sleep(0.05)
        children = psutil.Process(cli.pid).children(recursive=True)
        cli.send_signal(sig)
        signalled = time.monotonic()
        stderr = cli.communicate(timeout=30)[1].decode()
        waited = time.monotonic() - signalled
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == code, stderr[-3000:]
    assert waited < 10, f"{waited:.1f} s to exit: {stderr[-1500:]}"
    assert "Traceback" not in stderr and "PydanticSerializationError" not in stderr, stderr
    assert "interrupted" in stderr.splitlines()[-1]
    assert psutil.wait_procs(children, timeout=5)[1] == [], "a child outlived the CLI"
    assert not list(out.rglob("*.tmp")) and not (out / ".run.lock").exists()
    score(source, model=models[0], out=str(out))  # the rerun continues
    table = read_rows(out)
    assert len(table) == n_images(source) and table["path"].is_unique
