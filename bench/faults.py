"""Faults an operator meets, each in its own child process: time to the message, the message,
the exit code, and what was left behind (a benchmark, not a test; see issue 26).

Makes a small synthetic dataset and model in a temp folder, then runs every fault below as
``python -m gaussian_ad.cli ...`` (so ``PYTHONPATH`` can point at another copy of the code to
compare) and prints one block per fault: seconds from the start (or from the signal) to the
process's exit, exit code, stderr line count, the last stderr line and the leftovers.

    .venv/bin/python bench/faults.py [--only NAME ...] [--cap 120]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.services, after PYTHONPATH
from machine import machine_summary  # noqa: E402

CLI = [sys.executable, "-m", "gaussian_ad.cli"]
ENV = {
    **os.environ,
    "DO_NOT_TRACK": "true",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_API_URL": "",
}


def run(
    args: list[str],
    cap: float,
    env: dict | None = None,
    stdout=None,
    shell_prefix: str = "",
    signal_when: Callable[[], bool] | None = None,
    sig: int = signal.SIGINT,
    fault: Callable[[], None] | None = None,
) -> dict:
    """Run the CLI with ``args``; with ``signal_when``, send ``sig`` (or cause ``fault``)
    once it holds and time the exit from then."""
    command = CLI + args
    if shell_prefix:
        command = ["bash", "-c", f'{shell_prefix}; exec "$@"', "bash", *command]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env={**ENV, **(env or {})},
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    signalled = None
    if signal_when is not None:
        while process.poll() is None and time.monotonic() - started < cap:
            if signal_when():
                fault() if fault else process.send_signal(sig)
                signalled = time.monotonic()
                break
            time.sleep(0.05)
    try:
        _, stderr = process.communicate(timeout=max(cap - (time.monotonic() - started), 1))
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        code = f"none: killed after {cap:.0f} s"
    elapsed = time.monotonic() - (signalled or started)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {
        "seconds": round(elapsed, 1),
        "from": ("fault" if fault else "signal") if signalled else "start",
        "exit": code,
        "stderr_lines": len(lines),
        "last": lines[-1][:200] if lines else "",
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary files and locks left under ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or p.name == ".run.lock"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of the faults to run")
    parser.add_argument("--cap", type=float, default=120, help="seconds before a kill")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    options = parser.parse_args()
    print(machine_summary())
    print(f"code under test: {os.environ.get('PYTHONPATH') or 'this checkout'}\n")

    from PIL import Image

    from gaussian_ad.config import DetectorConfig
    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.data.synthetic import make_dataset
    from gaussian_ad.detection.detector import Detector

    root = Path(tempfile.mkdtemp(prefix="faults-"))
    os.chdir(root)  # python -m finds the code on PYTHONPATH, not in the current folder
    data = make_dataset(root / "data", ["grain"], n_train=20, n_test_good=16, n_test_per_defect=6,
                        size=128, seed=1)  # fmt: skip
    train = [r.path for r in mvtec_manifest(data, "grain", splits=("train",))]
    test = str(data / "grain" / "test")
    model = str(Detector(DetectorConfig(levels="8-9")).fit(train).save(root / "m.safetensors"))
    other = str(Detector(DetectorConfig(levels="9")).fit(train).save(root / "o.safetensors"))
    fused = Detector(DetectorConfig(levels="8-9")).fit(train)
    fused.calibration_ = None
    no_threshold = str(fused.save(root / "nothreshold.safetensors"))
    flat = root / "flat"
    flat.mkdir()
    for i in range(30):
        Image.new("RGB", (64, 64), (100 + i % 2,) * 3).save(flat / f"{i:02d}.png")
    two = root / "two"
    two.mkdir()
    for path in train[:2]:
        shutil.copy(path, two)
    (root / "garbage.safetensors").write_bytes(b"\x00" * 300)
    (root / "afile").write_text("a file, not a folder")
    readonly = root / "ro"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)],
                             capture_output=True).returncode == 0  # fmt: skip
    full = root / "full"
    full.mkdir()
    full_mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)],
                                  capture_output=True).returncode == 0  # fmt: skip
    cap = options.cap

    def archive(out: Path, *extra: str) -> list[str]:
        return ["score-archive", test, "--model", model, "--out", str(out), *extra]

    def parts(out: Path) -> Callable[[], bool]:
        return lambda: any((out / "scores").glob("part-*.parquet"))

    def replaced_model() -> dict:
        out = root / "replaced"
        copy = root / "replaced.safetensors"
        shutil.copy(model, copy)
        args = ["score-archive", test, "--model", str(copy), "--out", str(out)]
        run([*args, "--shard-size", "8"], cap)
        for part in sorted((out / "scores").glob("part-*.parquet"))[1:]:
            part.unlink()
        shutil.copy(other, copy)  # the file replaced between a killed run and its rerun
        return run(args, cap)

    def stdout_capped() -> dict:
        with (root / "stdout.txt").open("w") as handle:
            result = run(["score", model, test], cap, stdout=handle, shell_prefix="ulimit -f 2")
        result["stdout_bytes"] = (root / "stdout.txt").stat().st_size
        return result

    def mlflow_lost() -> dict:
        """train with an ``mlflow server`` stopped once the feature store is being written."""
        from tests.services import mlflow_server, stop

        (root / "mlflow").mkdir()
        server, uri = mlflow_server(root / "mlflow")
        home = root / "home-lost"
        try:
            return run(
                ["train", str(data), "--category", "grain", "--shard-size", "8"],
                cap,
                env={"MLFLOW_TRACKING_URI": uri, "GAUSSIAN_AD_HOME": str(home)},
                signal_when=lambda: any(home.rglob("*.zarr")),
                fault=lambda: stop(server),
            ) | {"stores_kept": len(list(home.rglob("*.zarr")))}
        finally:
            stop(server)

    ro_out = readonly / "out.csv" if mounted else root / "afile" / "out.csv"
    faults: dict[str, Callable[[], dict]] = {
        "score --out into a read-only folder": lambda: run(
            ["score", model, test, "--out", str(ro_out)], cap
        ),
        "score --out, file size capped (ulimit -f 2)": lambda: run(
            ["score", model, test, "--out", str(root / "capped.csv")],
            cap,
            shell_prefix="ulimit -f 2",
        ),  # fmt: skip
        "score to stdout, file size capped": stdout_capped,
        "train, MLflow at http://127.0.0.1:9": lambda: run(
            ["train", str(data), "--category", "grain", "--no-patch"],
            cap,
            env={
                "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                "GAUSSIAN_AD_HOME": str(root / "home-train"),
            },
        ),  # fmt: skip
        "train, MLflow stopped mid-run": mlflow_lost,
        "score-archive, PREFECT_HOME under a missing folder": lambda: run(
            archive(root / "out-home"),
            cap,
            env={"PREFECT_HOME": str(root / "missing" / "prefect")},
        ),  # fmt: skip
        "score-archive, SIGINT after the first part": lambda: run(
            archive(root / "out-int", "--shard-size", "4"),
            cap,
            signal_when=parts(root / "out-int"),
            sig=signal.SIGINT,
        ),  # fmt: skip
        "score-archive, SIGTERM after the first part": lambda: run(
            archive(root / "out-term", "--shard-size", "4"),
            cap,
            signal_when=parts(root / "out-term"),
            sig=signal.SIGTERM,
        ),  # fmt: skip
        "score-archive rerun, model file replaced": replaced_model,
        "score-archive, disk full (16 KB tmpfs)": lambda: run(
            [
                "score-archive",
                test,
                "--model",
                model,
                "--out",
                str(full if full_mounted else root / "afile"),
            ],
            cap,
        ),  # fmt: skip
        "fit on 30 images 1 grey level apart": lambda: run(
            ["fit", str(flat), "--out", str(root / "flat.safetensors")], cap
        ),
        "fit on 2 images": lambda: run(["fit", str(two), "--out", str(root / "two.st")], cap),
        "score, model without threshold, fused": lambda: run(
            ["score", no_threshold, test, "--out", str(root / "nt.csv")], cap
        ),
        "score, missing input": lambda: run(["score", model, str(root / "nothere")], cap),
        "score, missing model": lambda: run(["score", str(root / "nomodel.st"), test], cap),
        "fit, unknown category": lambda: run(
            ["fit", str(data), "--category", "nope", "--out", str(root / "x.safetensors")], cap
        ),
        "score --out x.txt": lambda: run(["score", model, test, "--out", str(root / "x.txt")], cap),
        "score, garbage model file": lambda: run(
            ["score", str(root / "garbage.safetensors"), test], cap
        ),
    }
    try:
        for name, fault in faults.items():
            if options.only and not any(o in name for o in options.only):
                continue
            result = fault()
            left = leftovers(root)
            print(f"== {name}")
            print(
                f"   {result.pop('seconds')} s from {result.pop('from')}, exit {result.pop('exit')}"
                f", {result.pop('stderr_lines')} stderr lines"
                + "".join(f", {k} {v}" for k, v in result.items() if k != "last")
            )
            print(f"   last: {result['last']}")
            if left:
                print(f"   left behind: {left}")
            for path in root.rglob("*"):
                if path.name.endswith(".tmp") or path.name == ".run.lock":
                    path.unlink()
    finally:
        for folder in (readonly, full):
            subprocess.run(["umount", str(folder)], capture_output=True)
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
