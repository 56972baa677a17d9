"""Time to first score of ``gaussian-ad score MODEL one.png``, broken down (a benchmark).

Fits a small model on synthetic images in a temp folder, then runs each step below in its
own child process, round-robin over the repeats (so that load from other processes hits all
of them alike), and prints the median CPU (user + system, ``os.wait4``), wall and peak RSS:

- references: an empty interpreter, ``import torch``, ``import torch, timm``, and
  ``import torch, timm`` + loading the weights (``load_backbone``): the floor a score call
  cannot go below;
- the imports a score call may pull in, one at a time (sklearn, scipy.stats, pandas, dask,
  distributed, zarr, matplotlib, mlflow, prefect), and the project's modules;
- the whole command, as the console script runs it.

The target of issue 13: the command at most 1 s CPU above the "+ weights" reference.

    .venv/bin/python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WEIGHTS = (
    "from gaussian_ad.backbones.models import load_backbone; load_backbone('lite0', device='cpu')"
)
STEPS: dict[str, str] = {
    "python (empty)": "pass",
    "import torch": "import torch",
    "import torch, timm": "import torch, timm",
    "import torch, timm + weights": f"import torch, timm; {WEIGHTS}",
    "the same, GC off": f"import gc; gc.disable(); import torch, timm; {WEIGHTS}",
    "import sklearn.base": "import sklearn.base",
    "import scipy.stats": "import scipy.stats",
    "import pandas": "import pandas",
    "import dask": "import dask",
    "import distributed": "import distributed",
    "import zarr": "import zarr",
    "import matplotlib.pyplot": "import matplotlib.pyplot",
    "import mlflow": "import mlflow",
    "import prefect": "import prefect",
    "import gaussian_ad.cli": "import gaussian_ad.cli",
    "import ...detection.detector": "import gaussian_ad.detection.detector",
    "import ...scoring.outputs": "import gaussian_ad.scoring.outputs",
}
COMMAND = "gaussian-ad score MODEL one.png"
# The score command's steps in one process, timed from inside (CPU of all threads).
PHASES = """
import json, sys, time
marks = [("start", time.process_time())]
from gaussian_ad.cli import app
from gaussian_ad.config import LoaderOptions
marks.append(("import the CLI (typer)", time.process_time()))
from gaussian_ad.detection.detector import Detector
marks.append(("import detection.detector (torch, timm)", time.process_time()))
from gaussian_ad.scoring.outputs import score_rows
from gaussian_ad.scoring.tables import write_table
marks.append(("import scoring.outputs, .tables (pandas)", time.process_time()))
detector = Detector.load(sys.argv[1], LoaderOptions(device="cpu"))
marks.append(("Detector.load (the model file)", time.process_time()))
detector.backbone_module()
marks.append(("backbone: timm model + weights", time.process_time()))
table, _, _ = score_rows(detector, [sys.argv[2]], [sys.argv[2]], None, ".")
marks.append(("score one image", time.process_time()))
print(json.dumps([(name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:])]))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


# Prefixed to every child's code: at exit it writes its peak RSS (VmHWM, counted from its
# exec; ru_maxrss would also count the parent's memory at the fork) to this file descriptor.
REPORT_PEAK = (
    "import atexit, os; atexit.register(lambda: os.write({fd}, "
    "[l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1].encode()))"
)


def run_child(code: str, argv: list[str] | None = None) -> dict[str, float]:
    """CPU (user + system), wall and peak RSS of ``python -c code [argv]``."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-c", f"{REPORT_PEAK.format(fd=write_end)}; {code}", *(argv or [])]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, pass_fds=(write_end,))
    os.close(write_end)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    with os.fdopen(read_end, "rb") as pipe:
        peak_kb = pipe.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return {
        "cpu": usage.ru_utime + usage.ru_stime,
        "wall": wall,
        "peak_mb": int(peak_kb) / 1024 if peak_kb else float("nan"),
    }


def make_model(folder: Path) -> tuple[Path, Path]:
    """A lite0 model fitted on a few synthetic images, and one image to score."""
    from gaussian_ad.config import DetectorConfig, LoaderOptions
    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.data.synthetic import make_dataset
    from gaussian_ad.detection.detector import Detector

    root = make_dataset(folder / "data", ["disc"], n_train=8, n_test_good=1, n_test_per_defect=0)
    records = mvtec_manifest(root, "disc")
    train = [r.path for r in records if r.split == "train"]
    image = next(Path(r.path) for r in records if r.split == "test")
    detector = Detector(DetectorConfig(), LoaderOptions(device="cpu")).fit(train)
    return detector.save(folder / "model.safetensors"), image


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine_summary

    print(machine_summary())
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        model, image = make_model(Path(tmp))
        commands = {label: (code, []) for label, code in STEPS.items()}
        score = "import sys; from gaussian_ad.cli import app; sys.exit(app())"
        commands[COMMAND] = (score, ["score", str(model), str(image), "--device", "cpu"])
        env_note = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        print(f"environment: {env_note}; {args.repeats} round-robin repeats, medians")
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in commands}
        for _ in range(args.repeats):
            for label, (code, argv) in commands.items():
                runs[label].append(run_child(code, argv))
        phase_out = subprocess.run(
            [sys.executable, "-c", PHASES, str(model), str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    medians = {
        label: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for label, rs in runs.items()
    }
    print(f"\n{COMMAND}, step by step in one process (CPU s, one run):")
    for name, seconds in json.loads(phase_out.strip().splitlines()[-1]):
        print(f"  {name:<62}{seconds:>7.2f}")
    base = medians["python (empty)"]["cpu"]
    print(f"\n{'step (own process)':<34}{'CPU s':>8}{'- empty':>9}{'wall s':>8}{'peak MB':>9}")
    for label, m in medians.items():
        own = m["cpu"] - base
        print(f"{label:<34}{m['cpu']:>8.2f}{own:>9.2f}{m['wall']:>8.2f}{m['peak_mb']:>9.0f}")
    floor = medians["import torch, timm + weights"]["cpu"]
    excess = medians[COMMAND]["cpu"] - floor
    met = "met" if excess <= 1.0 else "NOT met"
    print(
        f"\n{COMMAND}: {excess:+.2f} s CPU over import torch, timm + weights (target <= 1 s: {met})"
    )


if __name__ == "__main__":
    main()
