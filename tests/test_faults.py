"""Fault injection: what an adversarial user does to a scoring run or a training set.

Each test reproduces one failure seen before the fix (see the reliability issue) and checks
that it cannot come back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from gaussian_ad.cli import app
from gaussian_ad.config import DetectorConfig
from gaussian_ad.data import sources
from gaussian_ad.data.images import (
    ImageDecodeError,
    ImageError,
    entry_problem,
    load_rgb,
    mvtec_manifest,
)
from gaussian_ad.data.sources import list_source, read_items
from gaussian_ad.detection.detector import Detector, patch_path
from gaussian_ad.registry.mlflow_model import log_detector, register
from gaussian_ad.scoring import outputs
from gaussian_ad.scoring.run import RunConflict, claim
from gaussian_ad.stats.arrayfile import ModelFileError
from tests.fault_support import CATEGORY, n_images, read_rows


@pytest.mark.integration
def test_rerun_with_another_shard_size_is_refused_and_the_plan_continues(
    prefect_harness, models, source, tmp_path
):
    from gaussian_ad_flows.score import score

    out = tmp_path / "scores"
    score(source, model=models[0], out=str(out), shard_size=4, home=str(tmp_path))
    parts = sorted((out / "scores").glob("part-*.parquet"))
    for part in parts[1:3]:  # an interrupted run: two shards never finished
        part.unlink()
    with pytest.raises(RunConflict, match="shard size 6 .*plan cuts 4"):
        score(source, model=models[0], out=str(out), shard_size=6)
    rerun = score(source, model=models[0], out=str(out))  # the recorded plan
    assert rerun["shards_run"] == 2
    table = read_rows(out)
    assert len(table) == n_images(source) and table["path"].is_unique


@pytest.mark.integration
def test_rerun_with_another_model_is_refused(prefect_harness, models, source, tmp_path):
    from gaussian_ad_flows.score import score

    out = tmp_path / "scores"
    score(source, model=models[0], out=str(out), shard_size=8)
    with pytest.raises(RunConflict, match="is pinned to"):
        score(source, model=models[1], out=str(out))
    with pytest.raises(RunConflict, match="source"):
        score(source + "/good", model=models[0], out=str(out))


@pytest.mark.integration
def test_rerun_after_a_new_champion_stays_on_the_pinned_version(
    prefect_harness, mlflow_uri, models, source, tmp_path
):
    from gaussian_ad_flows.score import score

    name = "gaussian-ad-faults"
    mlflow.set_tracking_uri(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    versions = []
    for model in models:
        with mlflow.start_run():
            info = log_detector(Detector.load(model))
        versions.append(register(info.model_uri, name, {"patch": "False"}, client).version)
    client.set_registered_model_alias(name, "champion", versions[0])
    out = tmp_path / "scores"
    first = score(source, model=f"models:/{name}@champion", out=str(out), shard_size=5)
    assert first["model"] == f"models:/{name}/{versions[0]}"
    for part in sorted((out / "scores").glob("part-*.parquet"))[2:]:
        part.unlink()
    client.set_registered_model_alias(name, "champion", versions[1])  # promoted meanwhile
    score(source, model=f"models:/{name}@champion", out=str(out))
    table = read_rows(out)
    assert set(table["model_version"]) == {versions[0]} and table["path"].is_unique


@pytest.mark.integration
def test_a_second_run_on_a_claimed_folder_is_refused(prefect_harness, models, source, tmp_path):
    from gaussian_ad_flows.score import score

    out = tmp_path / "scores"
    with claim(out), pytest.raises(RunConflict, match="another scoring run"):
        score(source, model=models[0], out=str(out))
    assert not (out / "scores").exists()
    summary = score(source, model=models[0], out=str(out))  # the claim died with its holder
    assert summary["scored"] == n_images(source)


@pytest.mark.integration
def test_score_archive_refusal_is_one_line_with_exit_code_2(
    prefect_harness, models, source, tmp_path
):
    out = tmp_path / "scores"
    runner = CliRunner()
    args = ["score-archive", source, "--model", models[0], "--out", str(out)]
    assert runner.invoke(app, [*args, "--shard-size", "8"]).exit_code == 0
    result = runner.invoke(app, [*args, "--shard-size", "3"])
    assert result.exit_code == 2, result.output
    assert "refused:" in result.output and "shard size 3" in result.output


def test_identical_training_images_are_refused_with_the_reason(small_dataset, tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    image = Path(mvtec_manifest(small_dataset, CATEGORY, splits=("train",))[0].path)
    for i in range(10):
        (folder / f"{i}.png").write_bytes(image.read_bytes())
    result = CliRunner().invoke(app, ["fit", str(folder), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "identical" in result.output
    assert "Traceback" not in result.output


def test_a_model_without_threshold_leaves_is_anomaly_empty(small_dataset, tmp_path):
    paths = [r.path for r in mvtec_manifest(small_dataset, CATEGORY, splits=("train",))]
    # The paper's sum (standardised levels need the calibration's normals, like fusion)
    config = DetectorConfig(levels="9", score="image", standardize_levels=False, input_size=160)
    detector = Detector(config).fit(paths)
    detector.calibration_ = None  # as a model calibrated by nothing (e.g. set_models) has
    model = detector.save(tmp_path / "m.safetensors")
    out = tmp_path / "s.parquet"
    result = CliRunner().invoke(app, ["score", str(model), paths[0], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no threshold" in result.output
    table = pd.read_parquet(out)
    assert table["is_anomaly"].isna().all() and np.isfinite(table["score"]).all()


# --------------------------------------------------------------------------- awkward inputs
def within(seconds: float, function, *args):
    """``function(*args)``, failing (instead of hanging the suite) after ``seconds``."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(function, *args).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@pytest.fixture
def awkward(small_dataset, tmp_path) -> Path:
    """Two good images next to everything that looks like an image but is not one."""
    folder = tmp_path / "awkward"
    folder.mkdir()
    for record in mvtec_manifest(small_dataset, CATEGORY, splits=("train",))[:2]:
        shutil.copy(record.path, folder / Path(record.path).name)
    os.mkfifo(folder / "fifo.png")
    (folder / "folder.png").mkdir()
    (folder / "broken.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    Image.new("RGB", (8, 8)).save(folder / "multi.gif")
    (folder / "notes.txt").write_text("not an image, not named like one")
    return folder


EXPECTED_REASONS = {
    "fifo.png": "not a regular file (a FIFO)",
    "folder.png": "a folder named like an image",
    "broken.png": "broken symbolic link",
    "loop.png": "symbolic link loop",
    "multi.gif": "unsupported image format .gif",
}


def test_every_image_like_entry_is_listed_or_rejected_with_its_reason(awkward):
    items, rejected = within(30, list_source, str(awkward))
    assert len(items) == 2 and all(entry_problem(i.location) is None for i in items)
    reasons = {Path(e.path).name: e.reason for e in rejected}
    assert set(reasons) == set(EXPECTED_REASONS)
    for name, reason in EXPECTED_REASONS.items():
        assert reason in reasons[name], (name, reasons[name])


def test_a_fifo_appearing_after_listing_is_an_error_row_not_a_hang(awkward):
    items, _ = list_source(str(awkward))
    victim = Path(items[0].location)
    victim.unlink()
    os.mkfifo(victim)
    results = within(30, lambda: list(read_items(items)))
    assert isinstance(results[0][1], ImageError) and "FIFO" in results[0][1].reason
    assert isinstance(results[1][1], bytes)
    with pytest.raises(ImageDecodeError, match="FIFO"):
        within(30, load_rgb, str(victim))


def test_score_reports_every_named_input(awkward, models, tmp_path):
    model_file = models[0]  # levels 9, calibrated
    out = tmp_path / "rows.csv"
    named = [awkward / "multi.gif", awkward / "fifo.png", awkward]
    result = within(
        120,
        CliRunner().invoke,
        app,
        ["score", str(model_file), *map(str, named), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    assert (table["reason"] == "").sum() == 2  # the two images; every rejected entry a row
    reasons = {Path(p).name: r for p, r in zip(table["path"], table["reason"], strict=True)}
    for name, reason in EXPECTED_REASONS.items():
        assert name in result.output, name
        assert reason in reasons[name], (name, reasons[name])


# --------------------------------------------------------------------------- archives
def tar_of(small_dataset, path: Path, n: int) -> list[str]:
    records = mvtec_manifest(small_dataset, CATEGORY, splits=("test",))[:n]
    with tarfile.open(path, "w:gz") as tar:
        for i, record in enumerate(records):
            tar.add(record.path, arcname=f"m{i:02d}.png")
    return [f"m{i:02d}.png" for i in range(len(records))]


def test_a_truncated_tar_gz_scores_the_members_before_the_damage(small_dataset, tmp_path):
    archive = tmp_path / "cut.tar.gz"
    members = tar_of(small_dataset, archive, 8)
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * 0.6)])
    items, rejected = list_source(str(archive))
    assert 0 < len(items) < len(members)
    assert [i.member for i in items] == members[: len(items)]
    (error,) = rejected
    assert error.path == str(archive) and "truncated or damaged after member" in error.reason
    assert all(isinstance(content, bytes) for _, content in read_items(items))


def test_a_member_over_the_read_limit_is_refused_by_its_size(small_dataset, tmp_path, monkeypatch):
    archive = tmp_path / "big.zip"
    records = mvtec_manifest(small_dataset, CATEGORY, splits=("test",))[:2]
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(records[0].path, "small.png")
        zf.writestr("big.png", b"\0" * 300_000)
    monkeypatch.setattr(sources, "MAX_ITEM_BYTES", 200_000)
    results = dict(
        (item.member, content) for item, content in read_items(list_source(str(archive))[0])
    )
    assert isinstance(results["small.png"], bytes)
    assert isinstance(results["big.png"], ImageError)
    assert results["big.png"].path.endswith("!big.png")
    assert "too large to read" in results["big.png"].reason


def test_a_shard_holds_a_bounded_number_of_bytes(models, small_dataset, tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    members = tar_of(small_dataset, archive, 9)
    items, _ = list_source(str(archive))
    sizes = [len(content) for _, content in read_items(items)]
    monkeypatch.setattr(outputs, "BYTES_IN_FLIGHT", 3 * max(sizes))
    chunks = []
    real = outputs.score_rows

    def spy(detector, sources, names, *args, **kwargs):
        chunks.append(sum(len(s) for s in sources))
        return real(detector, sources, names, *args, **kwargs)

    monkeypatch.setattr(outputs, "score_rows", spy)
    info = outputs.score_shard(Detector.load(models[0]), items, 0, tmp_path / "out", ("m", "1"))
    assert info["rows"] == len(members) and len(chunks) >= 3
    assert max(chunks) <= 3 * max(sizes)
    table = pd.read_parquet(tmp_path / "out" / "scores" / "part-00000.parquet")
    assert sorted(table["path"]) == sorted(i.name for i in items)


# --------------------------------------------------------------------------- model files
@pytest.fixture
def saved(models, tmp_path) -> Path:
    target = tmp_path / "m.safetensors"
    shutil.copy(models[0], target)
    if patch_path(models[0]).exists():  # the patch-level model, with its file name on record
        shutil.copy(patch_path(models[0]), tmp_path / patch_path(models[0]).name)
    return target


def rewrite_metadata(path: Path, change) -> None:
    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata())
    header = json.loads(metadata["gaussian_ad"])
    change(header)
    metadata["gaussian_ad"] = json.dumps(header)
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a readable gaussian-ad model file"),
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable gaussian-ad model file"),
        (lambda p: p.write_text("hello"), "not a readable gaussian-ad model file"),
        (lambda p: p.unlink(), "file not found"),
        (
            lambda p: save_file({"x": np.zeros(1)}, str(p), metadata={"gaussian_ad": "{bad"}),
            "not valid JSON",
        ),
        (lambda p: rewrite_metadata(p, lambda h: h.pop("format_version")), "format_version"),
        (lambda p: rewrite_metadata(p, lambda h: h.update(n_levels=3)), "lacks 'level1.raw.n'"),
        (
            lambda p: rewrite_metadata(p, lambda h: h["metadata"].update(patch_file="x.p")),
            "its patch-level model x.p is missing",
        ),
        (
            lambda p: rewrite_metadata(
                p, lambda h: h["metadata"]["detector_config"].update(backbone="vgg")
            ),
            "backbone: unknown",
        ),
    ],
)
def test_a_broken_model_file_is_refused_with_its_name(saved, damage, message):
    damage(saved)
    with pytest.raises(ModelFileError, match=message) as error:
        Detector.load(saved)
    assert str(saved) in str(error.value)


def test_non_finite_statistics_are_refused(saved):
    arrays = load_file(str(saved))
    with safe_open(str(saved), framework="numpy") as f:
        metadata = f.metadata()
    arrays["level0.raw.sum_y"] = arrays["level0.raw.sum_y"] * np.nan
    save_file(arrays, str(saved), metadata=metadata)
    with pytest.raises(ModelFileError, match="level0.raw.sum_y holds non-finite"):
        Detector.load(saved)


def test_a_patch_file_outside_the_model_folder_is_never_read(saved, tmp_path):
    outside = tmp_path.parent / "patch.safetensors"
    outside.write_bytes(b"never read")
    rewrite_metadata(
        saved,
        lambda h: h["metadata"].update(patch_file="../patch.safetensors", patch_layout={}),
    )
    with pytest.raises(ModelFileError, match="its patch-level model patch.safetensors is missing"):
        Detector.load(saved)


def test_other_weights_than_the_fitted_ones_are_refused(saved, small_dataset):
    rewrite_metadata(
        saved, lambda h: h["metadata"]["detector_config"].update(backbone="lite1")
    )  # lite0 statistics, metadata saying lite1 (same dimensions)
    detector = Detector.load(saved)
    with pytest.raises(ValueError, match="fitted with weights .* pass the weights file"):
        detector.score([mvtec_manifest(small_dataset, CATEGORY, splits=("test",))[0].path])


# --------------------------------------------------------------------------- processes
def test_a_shard_where_nothing_decodes_writes_an_empty_part(models, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.png").write_bytes(b"not a png")
    items, _ = list_source(str(junk))
    info = outputs.score_shard(Detector.load(models[0]), items, 0, tmp_path / "out", ("m", "1"))
    assert (info["rows"], info["errors"]) == (0, 3)
    table = pd.read_parquet(tmp_path / "out" / "scores" / "part-00000.parquet")
    assert len(table) == 0 and {"path", "score", "is_anomaly"} <= set(table.columns)


def test_a_stalled_read_ends_the_shard_not_the_run(models, small_dataset, tmp_path, monkeypatch):
    items, _ = list_source(str(small_dataset / CATEGORY / "test" / "good"))
    stalled = threading.Event()

    def stalling(shard_items):
        yield from read_items(shard_items[:2])
        stalled.wait(60)  # the third read never returns (within the test)

    monkeypatch.setattr(outputs, "read_items", stalling)
    monkeypatch.setattr(outputs, "READ_TIMEOUT", 1.0)
    try:
        info = within(
            30, outputs.score_shard, Detector.load(models[0]), items, 0, tmp_path / "o", ("m", "1")
        )
    finally:
        stalled.set()
    assert (info["rows"], info["errors"]) == (2, len(items) - 2)
    errors = pd.read_parquet(tmp_path / "o" / "errors" / "part-00000.parquet")
    assert errors["reason"].str.contains("stalled for over 1 s").all()


# --------------------------------------------------------------------------- second battery
# Where output goes, failed writes, services that do not answer and signals (issue 26):
# each error is one line naming the path or URL, a non-zero exit and no traceback.
def one_line_error(result, decoded: bool = False) -> str:
    """The CLI's error line, after checking that it failed plainly (and, unless
    ``decoded``, before any image went through the backbone)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert decoded or "features:" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nothing can be written to, root included: a read-only tmpfs where this
    process may mount one, else a folder without write permission (not root), else a
    "folder" under a regular file."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
        return
    (tmp_path / "file").write_text("a file")
    yield tmp_path / "file" / "ro"


def test_score_into_an_unwritable_folder_fails_before_any_image(models, source, unwritable):
    out = unwritable / "out.csv"
    result = CliRunner().invoke(app, ["score", models[0], source, "--out", str(out)])
    line = one_line_error(result)
    assert str(unwritable) in line and "--out" in line
    assert not out.exists()


def test_extract_into_an_unwritable_folder_fails_before_the_backbone(small_dataset, unwritable):
    store = unwritable / "features.zarr"
    args = ["extract", str(small_dataset), "--category", CATEGORY, "--store", str(store)]
    line = one_line_error(CliRunner().invoke(app, args))
    assert f"--store {store}: its folder {unwritable}: cannot write there" in line
    assert not store.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "{model}", "{source}", "--out", "{tmp}/rows.txt"], "unsupported table format"),
        (["score", "{model}", "{tmp}/nothere"], "image file or folder not found: {tmp}/nothere"),
        (["score", "{tmp}/no.safetensors", "{source}"], "{tmp}/no.safetensors: gaussian-ad model"),
        (["score", "{tmp}/junk.safetensors", "{source}"], "not a readable gaussian-ad model"),
        (["fit", "{data}", "--category", "nope", "--out", "{tmp}/m"], "category folder not found"),
    ],
)
def test_the_projects_errors_are_one_line(args, message, models, source, small_dataset, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 300)
    names = {"model": models[0], "source": source, "tmp": tmp_path, "data": small_dataset}
    result = CliRunner().invoke(app, [a.format(**names) for a in args])
    assert message.format(**names) in one_line_error(result)
    assert not (tmp_path / "rows.txt").exists()


def test_debug_shows_the_traceback(models, tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSIAN_AD_DEBUG", "0")  # restored after the test: --debug sets it
    result = CliRunner().invoke(app, ["--debug", "score", models[0], str(tmp_path / "x")])
    assert result.exit_code == 1 and "Traceback" in result.output
    assert "FileNotFoundError" in result.output


def test_a_model_that_cannot_give_its_score_says_so_before_scoring(models, source, tmp_path):
    detector = Detector.load(models[0])  # the fused score, standardised with the calibration
    detector.calibration_ = None
    model = detector.save(tmp_path / "uncalibrated.safetensors")
    result = CliRunner().invoke(
        app, ["score", str(model), source, "--out", str(tmp_path / "s.csv")]
    )
    assert "need a calibrated detector" in one_line_error(result)


def test_two_training_images_are_counted_as_given(small_dataset, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for record in mvtec_manifest(small_dataset, CATEGORY, splits=("train",))[:2]:
        shutil.copy(record.path, folder)
    result = CliRunner().invoke(app, ["fit", str(folder), "--out", str(tmp_path / "m")])
    assert "need at least 3 readable training images" in one_line_error(result, decoded=True)
    assert "got 2" in result.output


def cli_under_file_limit(args: list[str], stdout, kib: int = 2) -> subprocess.CompletedProcess:
    """The CLI in a child whose files may not grow past ``kib`` KiB (``ulimit -f``)."""
    command = [sys.executable, "-m", "gaussian_ad.cli", *args]
    shell = ["bash", "-c", f'ulimit -f {kib}; exec "$@"', "bash", *command]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        shell, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=300
    )


def test_a_table_over_the_file_size_limit_fails_and_leaves_nothing(models, source, tmp_path):
    out = tmp_path / "rows.csv"
    run = cli_under_file_limit(["score", models[0], source, "--out", str(out)], None)
    assert run.returncode == 1, run.stderr
    assert f"error: {out}: File too large" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []  # neither the table nor its temporary file


def test_a_table_cut_short_on_stdout_is_no_success(models, source, tmp_path):
    with (tmp_path / "stdout.txt").open("w") as stdout:
        run = cli_under_file_limit(["score", models[0], source], stdout)
    assert run.returncode == 1, run.stderr
    assert "error: stdout: File too large" in run.stderr and "Traceback" not in run.stderr


def test_write_table_removes_its_temporary_file_on_a_full_disk(tmp_path):
    code = (
        "import numpy as np, pandas as pd, sys\n"
        "from gaussian_ad.scoring.tables import write_table\n"
        "try:\n"
        f"    write_table(pd.DataFrame({{'x': np.arange(10_000)}}), {str(tmp_path / 't.csv')!r})\n"
        "except OSError as error:\n"
        "    print(error, file=sys.stderr); sys.exit(3)\n"
    )
    shell = ["bash", "-c", 'ulimit -f 4; exec "$@"', "bash", sys.executable, "-c", code]
    run = subprocess.run(shell, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "File too large" in run.stderr, run.stderr
    assert str(tmp_path / "t.csv") in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_mlflow_that_refuses_connections_stops_train_at_once(
    small_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("GAUSSIAN_AD_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["train", str(small_dataset), "--category", CATEGORY])
    line = one_line_error(result)
    assert "MLflow at http://127.0.0.1:9 does not answer" in line and "refused" in line


def test_a_service_lost_during_a_run_is_named_as_the_cause(prefect_harness, monkeypatch):
    from gaussian_ad_flows.runtime import flow_process
    from mlflow.exceptions import MlflowException

    from gaussian_ad.preflight import PreflightError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # stopped meanwhile
    lost = r"MLflow at http://127.0.0.1:9 does not answer .* \(lost during the run; what was"
    with pytest.raises(PreflightError, match=lost) as raised, flow_process():
        raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/get failed")
    assert isinstance(raised.value.__cause__, MlflowException)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # every service answers: the run's own error
    with pytest.raises(ValueError, match="a bad shard"), flow_process():
        raise ValueError("a bad shard")


def test_an_unreachable_dask_scheduler_or_prefect_api_stops_the_run(
    small_dataset, models, source, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GAUSSIAN_AD_HOME", str(tmp_path / "home"))
    train = ["train", str(small_dataset), "--category", CATEGORY]
    with temporary_settings({PREFECT_API_URL: None}):
        result = CliRunner().invoke(app, [*train, "--dask-address", "tcp://127.0.0.1:9"])
    assert "the Dask scheduler at tcp://127.0.0.1:9 does not answer" in one_line_error(result)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        archive = ["score-archive", source, "--model", models[0], "--out", str(tmp_path / "o")]
        result = CliRunner().invoke(app, archive)
    assert "the Prefect API at http://127.0.0.1:9/api does not answer" in one_line_error(result)


def test_the_run_lock_goes_and_unfinished_writes_are_removed(tmp_path):
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    stale = out / "scores" / ".part-00003.parquet.4242.tmp"  # a killed run's unfinished write
    stale.write_bytes(b"partial")
    with claim(out):
        assert (out / ".run.lock").exists() and not stale.exists()
    assert not (out / ".run.lock").exists()
    with claim(out):  # and the folder can be claimed again
        pass
