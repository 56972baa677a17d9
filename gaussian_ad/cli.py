"""The ``gaussian-ad`` command line."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from gaussian_ad import preflight
from gaussian_ad.cli_errors import DEBUG_ENV, PlainErrorsGroup, write_stdout

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see backbones.models

app = typer.Typer(
    cls=PlainErrorsGroup,  # errors as one line, tracebacks with --debug: see cli_errors
    help="Anomaly detection with a Gaussian on pretrained deep features (Rippel et al. 2020).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show the traceback of an error, not one line")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


BackboneOpt = Annotated[str, typer.Option(help="lite0-2, b0-b7, resnet18/34/50")]
LevelsOpt = Annotated[str, typer.Option(help='levels to use: "1-9", "7", "3,5,7"')]
ReductionOpt = Annotated[str, typer.Option(help="none, pca or npca")]
VarianceOpt = Annotated[float, typer.Option(help="cumulative variance t splitting PCA/NPCA")]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="backbone weights file (timm or lukemelas naming)")
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1; default: CUDA if present")]
BatchOpt = Annotated[int, typer.Option(help="images per forward pass")]
WorkersOpt = Annotated[int, typer.Option(help="decoding threads")]


PATCH_HELP = "the patch-level model too: anomaly maps, pixel AUROC, PRO"
PatchOpt = Annotated[bool, typer.Option("--patch/--no-patch", help=PATCH_HELP)]
ScoreOpt = Annotated[
    str | None,
    typer.Option(
        help="score that ranks images: image, patch or fused; default: fused with "
        "--patch, image with --no-patch"
    ),
]
InputSizeOpt = Annotated[
    int | None,
    typer.Option(
        help="square input side (multiple of 32); default: the backbone's default "
        "(lite0: 352; the others: their native side)"
    ),
]
PatchPoolOpt = Annotated[
    str,
    typer.Option(
        help="patch Gaussians: auto (the default) chooses all or 0 from the good images, "
        "all one position-free Gaussian (any product), 0 one per position (aligned "
        "products), r pooled over r grid cells around it"
    ),
]
StandardizeOpt = Annotated[
    bool,
    typer.Option(
        "--standardize-levels/--sum-levels",
        help="image score: the sum of each level's distance as a z-score on the held-out "
        "normals, or the paper's sum of the distances",
    ),
]
SeedOpt = Annotated[int, typer.Option(help="hold-out split, patch channels and defect seed")]
TargetFprOpt = Annotated[
    float, typer.Option(help="threshold at this FPR on the normals' out-of-fold scores")
]


def _configs(
    backbone: str = "lite0",
    levels: str = "1-9",
    reduction: str = "none",
    variance_threshold: float = 0.99,
    patch: bool = True,
    score: str | None = None,
    seed: int = 0,
    weights: Path | None = None,
    device: str | None = None,
    batch_size: int = 32,
    workers: int = 2,
    patch_pool: str = "auto",
    input_size: int | None = None,
    standardize_levels: bool = True,
):
    """The CLI's flags as validated configuration objects; a bad value exits with code 2."""
    from gaussian_ad.config import DetectorConfig, LoaderOptions, parse_reduction

    try:
        if not levels.strip():
            raise ValueError("levels: empty; use e.g. '1-9', '7' or '3,5,7'")
        config = DetectorConfig(
            backbone=backbone,
            levels=levels,
            reduction=parse_reduction(reduction),
            variance_threshold=variance_threshold,
            score=score,
            standardize_levels=standardize_levels,
            patch=patch,
            patch_pool_radius=_pool_radius(patch_pool),
            input_size=input_size,
            seed=seed,
        )
        loader = LoaderOptions(
            device=device, batch_size=batch_size, workers=workers, weights=weights
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    return config, loader


def _pool_radius(text: str) -> int | str | None:
    """``auto`` as is, ``all`` -> None (position-free), else a radius in grid cells."""
    word = text.strip().lower()
    if word in ("auto", "all"):
        return None if word == "all" else "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"patch-pool: 'auto', 'all' or a radius >= 0, got {text!r}") from None


@contextmanager
def _loading() -> Iterator[None]:
    """No cyclic garbage collection while torch, timm and a model load.

    Those imports create about 400,000 long-lived objects, and the collector's passes over
    them during the import cost about 1 s of CPU here (a fifth of a one-image score call).
    At the end the loaded objects leave the collector's view (``gc.freeze``): later passes
    skip them too.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _report_errors(errors) -> None:
    if errors:
        typer.secho(f"{len(errors)} image(s) could not be read:", fg="yellow", err=True)
        for error in errors:
            typer.secho(f"  {error.path}: {error.reason}", fg="yellow", err=True)


@app.command()
def synth(
    out_dir: Path,
    n_train: Annotated[int, typer.Option(help="normal training images per category")] = 60,
    n_test_good: Annotated[int, typer.Option(help="normal test images per category")] = 20,
    n_test_per_defect: Annotated[int, typer.Option(help="test images per defect type")] = 6,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 256,
    seed: int = 0,
) -> None:
    """Write the synthetic MVTec-layout dataset to OUT_DIR."""
    from gaussian_ad.data.synthetic import make_dataset

    root = make_dataset(
        out_dir,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_per_defect=n_test_per_defect,
        size=size,
        seed=seed,
    )
    typer.echo(f"wrote synthetic dataset to {root}")


@app.command()
def extract(
    data_root: Path,
    category: Annotated[str, typer.Option(help="MVTec category whose train/good to extract")],
    store: Annotated[str, typer.Option(help="feature store path or fsspec URL (Zarr v3)")],
    augment_passes: Annotated[int, typer.Option(help="K random augmentation passes")] = 0,
    seed: Annotated[int, typer.Option(help="augmentation seed")] = 0,
    shard_size: Annotated[int, typer.Option(help="images per shard (and Zarr chunk)")] = 256,
    backbone: BackboneOpt = "lite0",
    levels: LevelsOpt = "1-9",
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Extract train/good features into a Zarr store; resumes an interrupted extraction."""
    if "://" not in store:  # a local store: its folder takes writes, checked before the work
        preflight.writable_folder(Path(store).expanduser().parent, f"--store {store}: its folder")
    from tqdm.auto import tqdm

    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.detection.detector import Detector
    from gaussian_ad.features.shards import create_plan_store, extract_shard
    from gaussian_ad.store.plan import TrainingPlan

    if shard_size < 1 or augment_passes < 0:
        raise typer.BadParameter("shard-size must be >= 1 and augment-passes >= 0")
    config, loader = _configs(
        backbone,
        levels,
        seed=seed,
        weights=weights,
        device=device,
        batch_size=batch_size,
        workers=workers,
    )
    records = mvtec_manifest(data_root, category, splits=("train",))
    model = Detector(config, loader).backbone_module()
    plan = TrainingPlan(records, [], augment_passes)  # the store `train` would extract
    feature_store = create_plan_store(store, plan, model, config, loader, shard_size)
    pending = feature_store.pending_shards()
    typer.echo(
        f"{feature_store.n_rows} rows in {feature_store.n_shards} shards; {len(pending)} to go"
    )
    for shard in tqdm(pending, desc="shards"):
        extract_shard(feature_store, shard, model, loader, seed)
    _report_errors(feature_store.errors())


@app.command()
def fit(
    data_root: Annotated[Path | None, typer.Argument(help="images to fit on")] = None,
    out: Annotated[Path, typer.Option(help="model file to write (.safetensors)")] = Path(
        "model.safetensors"
    ),
    category: Annotated[
        str | None, typer.Option(help="MVTec category; without it DATA_ROOT is a folder of normals")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="fit out-of-core from this feature store instead")
    ] = None,
    backbone: BackboneOpt = "lite0",
    levels: LevelsOpt = "1-9",
    reduction: ReductionOpt = "none",
    variance_threshold: VarianceOpt = 0.99,
    patch: Annotated[
        bool | None,
        typer.Option(
            "--patch/--no-patch", help=f"{PATCH_HELP} (default: on; with --store, if it holds them)"
        ),
    ] = None,
    score: ScoreOpt = None,
    patch_pool: PatchPoolOpt = "auto",
    input_size: InputSizeOpt = None,
    standardize_levels: StandardizeOpt = True,
    target_fpr: TargetFprOpt = 0.01,
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Fit on normal images (MVTec train/good of CATEGORY, a folder, or a feature store).

    Every image fits the models; the threshold (and the fused score's standardisation) is
    calibrated on their out-of-fold scores (5 folds: each scored without its own fold).
    """
    from gaussian_ad.data.images import folder_manifest, mvtec_manifest
    from gaussian_ad.detection.detector import Detector

    if (data_root is None) == (store is None):
        raise typer.BadParameter("give DATA_ROOT or --store (not both)")
    preflight.writable_file(out, "--out")
    if store is not None:
        from gaussian_ad.store.feature_store import FeatureStore

        feature_store = FeatureStore.open(store)
        backbone = feature_store.config.get("backbone", backbone)
        levels = ",".join(map(str, feature_store.levels))
        input_size = feature_store.config.get("image_size", input_size)
        held = feature_store.patch_layout is not None
        if patch and not held:
            raise typer.BadParameter(
                f"--patch: the store {store} holds no patch features; pass --no-patch"
            )
    if patch is None:  # the store's choice, else the default
        patch = store is None or held
    config, loader = _configs(
        backbone,
        levels,
        reduction,
        variance_threshold,
        patch,
        score,
        seed,
        weights,
        device,
        batch_size,
        workers,
        patch_pool=patch_pool,
        input_size=input_size,
        standardize_levels=standardize_levels,
    )
    if not 0.0 < target_fpr < 1.0:
        raise typer.BadParameter(f"target-fpr: must lie in (0, 1), got {target_fpr}")
    detector = Detector(config, loader)
    if store is not None:
        detector.fit_store(feature_store, target_fpr=target_fpr)
    else:
        if category:
            paths = [r.path for r in mvtec_manifest(data_root, category, splits=("train",))]
        else:
            paths = [r.path for r in folder_manifest([data_root])]
        detector.fit(paths, target_fpr, progress=True)
    _report_errors(detector.errors_)
    detector.save(out)
    model = detector.model_
    threshold = "none" if detector.threshold is None else f"{detector.threshold:.4g}"
    typer.echo(
        f"fitted on {model.n_samples_} images, levels {list(config.image_levels)}, "
        f"dims {model.dims_}, threshold {threshold}; wrote {out}"
    )


@app.command()
def score(
    model: Path,
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out: Annotated[Path | None, typer.Option(help="write rows to .csv or .parquet")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="flag scores above this (default: the model's)")
    ] = None,
    maps: Annotated[
        Path | None,
        typer.Option(help="write anomaly-map overlays of the flagged images to this folder"),
    ] = None,
    all_maps: Annotated[
        bool, typer.Option(help="with --maps: overlays of every image, the good ones too")
    ] = False,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Score images with a saved model: path, score, per-level scores, is_anomaly; an
    unreadable image is a row with its reason."""
    from dataclasses import replace

    from gaussian_ad.scoring.tables import check_table_path

    if out is not None:  # where the rows go, before any image is decoded
        preflight.writable_file(check_table_path(out), "--out")
    if maps is not None:
        preflight.writable_folder(maps, "--maps folder")
    elif all_maps:
        raise typer.BadParameter("--all-maps: give the --maps folder to write them to")
    with _loading():
        from gaussian_ad.data.images import scan_images
        from gaussian_ad.detection.detector import Detector
        from gaussian_ad.scoring.outputs import score_rows
        from gaussian_ad.scoring.tables import score_table, with_error_rows, write_table

        records, rejected = scan_images(paths)
        _, loader = _configs(device=device, batch_size=batch_size, workers=workers)
        detector = Detector.load(model, loader)
        detector.backbone_module()
    if threshold is not None:
        if detector.calibration_ is None:
            raise typer.BadParameter("--threshold: this model has no calibration to override")
        detector.calibration_ = replace(detector.calibration_, threshold=threshold)
    if detector.threshold is None:
        typer.secho("this model has no threshold: is_anomaly is left empty", fg="yellow", err=True)
    # A model that cannot give its score says so before the backbone pass, not after it.
    score_table([], detector.decide(detector.empty_scores()), detector.config.image_levels)
    files = [r.path for r in records]
    table, errors, n_maps = score_rows(
        detector, files, files, maps, ".", progress=True, all_maps=all_maps
    )
    errors = rejected + errors
    if maps is not None:
        table["map"] = [str(maps / name) if name else "" for name in table["map"]]
        typer.echo(f"wrote {n_maps} overlay(s) to {maps}")
    table = with_error_rows(table, errors)
    if out is None:
        write_stdout(table.to_string(index=False))  # in one go at the end, every byte checked
    else:
        write_table(table, out)
        typer.echo(f"wrote {len(table)} rows ({len(errors)} unreadable) to {out}")
    _report_errors(errors)


@app.command("export")
def export_model(
    model: Annotated[str, typer.Argument(help="a model file or models:/NAME@ALIAS")],
    out: Annotated[Path, typer.Argument(help="the .onnx file to write")],
    check: Annotated[
        list[Path] | None,
        typer.Option(help="images the export's self-check scores (default: two generated)"),
    ] = None,
) -> None:
    """Export a model to one ONNX graph: uint8 images (N, S, S, 3) in, score, image_score,
    patch_score, normalized_score, is_anomaly, map out; written only if onnxruntime's
    scores agree with the torch path's."""
    with _loading():
        from gaussian_ad.config import LoaderOptions
        from gaussian_ad.export.onnx import OnnxCheckError, export_onnx
        from gaussian_ad.registry.mlflow_model import load_detector

        detector = load_detector(model, LoaderOptions(device="cpu"))
    try:
        result = export_onnx(detector, out, check_images=check)
    except OnnxCheckError as error:
        typer.secho(f"refused: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    errors = result.check.errors
    typer.echo(
        f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, input "
        f"{detector.config.image_size} px); onnxruntime against torch on "
        f"{result.check.n_images} images: "
        + ", ".join(f"{name} {value:.2g}" for name, value in errors.items())
    )


@app.command()
def evaluate(
    data_root: Path,
    category: Annotated[
        list[str] | None, typer.Option(help="categories to evaluate (default: all)")
    ] = None,
    backbone: BackboneOpt = "lite0",
    levels: LevelsOpt = "1-9",
    reduction: ReductionOpt = "none",
    variance_threshold: VarianceOpt = 0.99,
    patch: PatchOpt = True,
    score: ScoreOpt = None,
    patch_pool: PatchPoolOpt = "auto",
    input_size: InputSizeOpt = None,
    standardize_levels: StandardizeOpt = True,
    target_fpr: TargetFprOpt = 0.01,
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results as JSON")] = None,
) -> None:
    """Fit on train/good (calibrated out of fold), report test AUROC per category
    (summed and per level; with --patch also patch, fused, pixel AUROC and PRO)."""
    from gaussian_ad.data.images import mvtec_categories

    if json_out:
        preflight.writable_file(json_out, "--json")

    config, loader = _configs(
        backbone,
        levels,
        reduction,
        variance_threshold,
        patch,
        score,
        seed,
        weights,
        device,
        batch_size,
        workers,
        patch_pool=patch_pool,
        input_size=input_size,
        standardize_levels=standardize_levels,
    )
    categories = category or mvtec_categories(data_root)
    if not categories:
        raise typer.BadParameter(f"no MVTec-layout categories under {data_root}")
    with _loading():
        from gaussian_ad.detection.detector import Detector
        from gaussian_ad.evaluation.evaluate import evaluate_category, summary

        Detector(config, loader).backbone_module()  # the one every category's fit uses
    results = []
    for name in categories:
        typer.echo(f"[{name}] fitting, calibrating and scoring")
        result = evaluate_category(data_root, name, config, loader, target_fpr, progress=True)
        _report_errors(result.errors)
        results.append(result)
    report = {**summary(results), "config": config.to_dict(), "target_fpr": target_fpr}
    kinds = ["image", "patch", "fused"] if patch else []
    pixel = patch and any("pixel_auroc" in row for row in report["categories"].values())
    head = "".join(f"{k:>7}" for k in kinds) + (f"{'pixel':>7}{'PRO':>7}" if pixel else "")
    level_names = " ".join(f"L{level:<5d}" for level in config.image_levels)
    typer.echo(f"\n{'category':<16}{'AUROC':>7}{head}  {level_names}")
    for name, row in report["categories"].items():
        values = "".join(f"{row[f'auroc_{k}']:>7.3f}" for k in kinds)
        if pixel:
            values += "".join(
                f"{row[m]:>7.3f}" if m in row else f"{'n/a':>7}" for m in ("pixel_auroc", "pro")
            )
        per_level = " ".join(f"{a:.3f} " for a in row["auroc_levels"])
        typer.echo(f"{name:<16}{row['auroc']:>7.3f}{values}  {per_level}")
    typer.echo(f"{'mean +- SEM':<16}{report['mean_auroc']:>7.3f} +- {report['sem_auroc']:.3f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {json_out}")


@app.command("select")
def select_configuration(
    data_root: Path,
    category: Annotated[str, typer.Option(help="MVTec category whose train/good to use")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the selection")] = None,
    n_per_kind: Annotated[int, typer.Option(help="synthetic defects per kind")] = 10,
    seed: SeedOpt = 0,
    backbone: BackboneOpt = "lite0",
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Choose levels, reduction and score on synthetic defects (no real defects needed).

    Fits on 4/5 of train/good; the other fifth gives normals and their defective copies.
    """
    from gaussian_ad.data.images import mvtec_manifest
    from gaussian_ad.evaluation.selection import select_on_normals

    if json_out:
        preflight.writable_file(json_out, "--json")

    if n_per_kind < 1:
        raise typer.BadParameter(f"n-per-kind: must be >= 1, got {n_per_kind}")
    config, loader = _configs(
        backbone,
        seed=seed,
        weights=weights,
        device=device,
        batch_size=batch_size,
        workers=workers,
    )
    paths = [r.path for r in mvtec_manifest(data_root, category, splits=("train",))]
    selection = select_on_normals(paths, config, loader=loader, n_per_kind=n_per_kind)
    typer.echo(f"{'levels':<8}{'reduction':<11}{'score':<7}{'AUROC':>7}")
    for candidate, value in selection.results:
        levels, reduction = candidate.levels or "-", candidate.reduction or "none"
        typer.echo(f"{levels:<8}{reduction:<11}{candidate.score:<7}{value:>7.3f}")
    best = selection.best
    typer.echo(f"chosen: levels {best.levels}, reduction {best.reduction}, score {best.score}")
    if json_out:
        json_out.write_text(json.dumps(selection.to_dict(), indent=2))
        typer.echo(f"wrote {json_out}")


@app.command()
def train(
    data_root: Path,
    category: Annotated[list[str] | None, typer.Option(help="categories (default: all)")] = None,
    backbone: BackboneOpt = "lite0",
    levels: LevelsOpt = "1-9",
    reduction: ReductionOpt = "none",
    augment_passes: Annotated[int, typer.Option(help="K random augmentation passes")] = 0,
    no_flips: Annotated[bool, typer.Option(help="augment without flips (one category)")] = False,
    no_rotate90: Annotated[
        bool, typer.Option(help="augment without 90-degree rotations (one category)")
    ] = False,
    no_shift_scale_rotate: Annotated[
        bool, typer.Option(help="augment without shift-scale-rotate (one category)")
    ] = False,
    no_photometric: Annotated[
        bool, typer.Option(help="augment without photometric changes (one category)")
    ] = False,
    patch: PatchOpt = True,
    score: ScoreOpt = None,
    patch_pool: PatchPoolOpt = "auto",
    input_size: InputSizeOpt = None,
    standardize_levels: StandardizeOpt = True,
    select: Annotated[
        bool, typer.Option(help="choose levels, reduction and score on synthetic defects first")
    ] = False,
    target_fpr: TargetFprOpt = 0.01,
    seed: SeedOpt = 0,
    shard_size: Annotated[int, typer.Option(help="images per extraction shard")] = 64,
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
    dask_address: Annotated[
        str | None, typer.Option(envvar="GAUSSIAN_AD_DASK_ADDRESS", help="Dask scheduler")
    ] = None,
) -> None:
    """Run the training flow per category: extract, fit, evaluate, register in MLflow.

    The --no-<transform> switches turn augmentations off in the category's defaults, so
    they take exactly one --category.
    """
    from dataclasses import replace

    # The services first, before the flows' imports (seconds of CPU): a stopped MLflow
    # is said at once.
    preflight.mlflow_answers(os.environ.get("MLFLOW_TRACKING_URI"))
    preflight.dask_answers(dask_address or os.environ.get("GAUSSIAN_AD_DASK_ADDRESS"))
    from pydantic import ValidationError

    from gaussian_ad.data.augment import AugmentConfig

    switches = {
        "flips": no_flips,
        "rotate90": no_rotate90,
        "shift_scale_rotate": no_shift_scale_rotate,
        "photometric": no_photometric,
    }
    augment = None
    if any(switches.values()):
        if category is None or len(category) != 1:
            raise typer.BadParameter("--no-<transform> switches need exactly one --category")
        off = {name: False for name, turned_off in switches.items() if turned_off}
        augment = replace(AugmentConfig.for_category(category[0]), **off)

    config, loader = _configs(
        backbone,
        levels,
        reduction,
        0.99,
        patch or score not in (None, "image"),
        score,
        seed,
        weights,
        device,
        batch_size,
        workers,
        patch_pool=patch_pool,
        input_size=input_size,
        standardize_levels=standardize_levels,
    )
    from gaussian_ad_flows.options import TrainOptions

    try:
        options = TrainOptions(
            detector=config,
            loader=loader,
            augment_passes=augment_passes,
            augment=augment,
            target_fpr=target_fpr,
            shard_size=shard_size,
            select=select,
        )
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise typer.BadParameter(problems) from None
    from gaussian_ad_flows.runtime import check_before_run, flow_process
    from gaussian_ad_flows.train import train_all

    check_before_run(dask_address=dask_address)
    with flow_process():
        train_all(str(data_root), category or None, dask_address, options)


@app.command("score-archive")
def score_archive(
    source: Annotated[str, typer.Argument(help="folder, glob, tar/zip archive or fsspec URL")],
    out: Annotated[Path, typer.Option(help="output folder (Parquet parts)")],
    model: Annotated[str | None, typer.Option(help="model URI, e.g. models:/NAME@champion")] = None,
    category: Annotated[
        str | None, typer.Option(help="use models:/gaussian-ad-CATEGORY@champion")
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option(help="images per shard (default: the run's, 256 when new)")
    ] = None,
    maps: Annotated[
        bool, typer.Option(help="write anomaly-map overlays of the images above the threshold")
    ] = False,
    all_maps: Annotated[
        bool, typer.Option(help="overlays of every image, the good ones too (implies --maps)")
    ] = False,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Run the scoring flow over an archive; a rerun skips finished shards."""
    if shard_size is not None and shard_size < 1:
        raise typer.BadParameter(f"shard-size: must be >= 1, got {shard_size}")
    if (model is None) == (category is None):
        raise typer.BadParameter("give --model or --category (one of them)")
    _, loader = _configs(device=device, batch_size=batch_size, workers=workers)
    from gaussian_ad_flows.runtime import check_before_run, flow_process
    from gaussian_ad_flows.score import score as score_flow

    from gaussian_ad.scoring.run import RunConflict

    preflight.writable_folder(out, "--out")
    local_file = model is not None and "://" not in model and Path(model).is_file()
    check_before_run(mlflow=not local_file)
    try:
        with flow_process():
            score_flow(
                source,
                model=model,
                category=category,
                out=str(out),
                shard_size=shard_size,
                loader=loader,
                maps="all" if all_maps else maps,
            )
    except RunConflict as conflict:
        typer.secho(f"refused: {conflict}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    data_root: Annotated[str, typer.Argument(help="MVTec-layout data the nightly runs train on")],
    category: Annotated[list[str] | None, typer.Option(help="categories (default: all)")] = None,
    cron: Annotated[str, typer.Option(help="nightly retraining schedule")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="time zone of the schedule")] = "UTC",
    dask_address: Annotated[
        str | None, typer.Option(envvar="GAUSSIAN_AD_DASK_ADDRESS", help="Dask scheduler")
    ] = None,
) -> None:
    """Serve the nightly retraining and on-demand scoring deployments from this process."""
    from gaussian_ad_flows.nightly import serve_deployments

    serve_deployments(
        data_root,
        categories=category or None,
        cron=cron,
        timezone=timezone,
        dask_address=dask_address,
    )


@app.command("report")
def open_report(
    model: Annotated[
        str, typer.Argument(help="a category (its champion), or models:/NAME@ALIAS, models:/NAME/N")
    ],
    open_: Annotated[bool, typer.Option("--open", help="open it in the web browser")] = False,
) -> None:
    """Print where a registered version's HTML report is (a category: its champion's)."""
    import webbrowser

    import mlflow
    from gaussian_ad_flows.runtime import tracking_uri, work_dir

    from gaussian_ad.registry.mlflow_model import report_file, requested_model

    uri = model if model.startswith("models:/") else requested_model(None, model)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one clean line
    mlflow.set_tracking_uri(tracking_uri())
    path, page = report_file(uri, work_dir() / "reports")
    typer.echo(f"{uri}: {path}" + (f"\nMLflow: {page}" if page else ""))
    if open_:
        webbrowser.open(Path(path).resolve().as_uri())


@app.command()
def demo(out_dir: Annotated[Path, typer.Argument(help="where the demo writes")] = Path("demo")):
    """Synthetic data -> train_all -> registry -> score a tar archive, on embedded services."""
    home = out_dir.resolve() / ".gaussian-ad"
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GAUSSIAN_AD_HOME", str(home))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from gaussian_ad_flows.demo import run_demo
    from gaussian_ad_flows.runtime import check_before_run, flow_process

    check_before_run()
    with flow_process():
        run_demo(out_dir)


if __name__ == "__main__":
    app(prog_name="gaussian-ad")
