"""The ``gaussian-ad`` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="Anomaly detection with a Gaussian on pretrained deep features (Rippel et al. 2020).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

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


def _detector(
    backbone, levels, reduction, variance_threshold, weights, device, batch, workers, **options
):
    from gaussian_ad.detector import Detector

    try:
        return Detector(
            backbone=backbone,
            levels=levels,
            reduction=None if reduction.lower() == "none" else reduction.lower(),
            variance_threshold=variance_threshold,
            weights=weights,
            device=device,
            batch_size=batch,
            workers=workers,
            **options,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


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
    from gaussian_ad.synthetic import make_dataset

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
    from tqdm.auto import tqdm

    from gaussian_ad.backbones import load_backbone
    from gaussian_ad.extraction import create_store, extract_shard
    from gaussian_ad.images import mvtec_manifest

    records = mvtec_manifest(data_root, category, splits=("train",))
    model = load_backbone(backbone, levels, weights=weights, device=device)
    feature_store = create_store(
        store, records, model, shard_size=shard_size, augment_passes=augment_passes
    )
    pending = feature_store.pending_shards()
    typer.echo(
        f"{feature_store.n_rows} rows in {feature_store.n_shards} shards; {len(pending)} to go"
    )
    for shard in tqdm(pending, desc="shards"):
        extract_shard(
            feature_store,
            shard,
            model,
            batch_size=batch_size,
            workers=workers,
            device=device,
            seed=seed,
        )
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
        bool, typer.Option(help="also the patch-level model (anomaly maps); holds out 1/5")
    ] = False,
    score: Annotated[str, typer.Option(help="image, patch or fused (needs --patch)")] = "image",
    target_fpr: Annotated[
        float, typer.Option(help="with --patch: threshold at this FPR on the held-out fifth")
    ] = 0.01,
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Fit on normal images (MVTec train/good of CATEGORY, a folder, or a feature store).

    With --patch, 4/5 of the images fit both models and the other fifth calibrates the
    threshold and the fused score's standardisation.
    """
    from gaussian_ad.images import folder_manifest, mvtec_manifest

    if (data_root is None) == (store is None):
        raise typer.BadParameter("give DATA_ROOT or --store (not both)")
    if patch and store is not None:
        raise typer.BadParameter("--patch fits from images; with a store use `train --patch`")
    if store is not None:
        from gaussian_ad.outofcore import fit_store
        from gaussian_ad.store import FeatureStore

        feature_store = FeatureStore.open(store)
        backbone = feature_store.config.get("backbone", backbone)
        levels = ",".join(map(str, feature_store.levels))
    detector = _detector(
        backbone,
        levels,
        reduction,
        variance_threshold,
        weights,
        device,
        batch_size,
        workers,
        patch=patch,
        score=score,
    )
    if store is not None:
        detector.model_ = fit_store(feature_store, detector.reduction, variance_threshold)
        _report_errors(feature_store.errors())
    else:
        if category:
            paths = [r.path for r in mvtec_manifest(data_root, category, splits=("train",))]
        else:
            paths = [r.path for r in folder_manifest([data_root])]
        if patch:
            from gaussian_ad.evaluation import holdout_split

            fit_idx, held_idx = holdout_split(len(paths))
            detector.fit([paths[i] for i in fit_idx], progress=True)
            detector.calibrate([paths[i] for i in held_idx], target_fpr, progress=True)
        else:
            detector.fit(paths, progress=True)
        _report_errors(detector.errors_)
    detector.save(out)
    model = detector.fitted_model()
    typer.echo(
        f"fitted on {model.n_samples_} images, levels {list(detector.levels)}, "
        f"dims {model.dims_}; wrote {out}"
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
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Score images with a saved model: path, score, per-level scores, is_anomaly."""
    from gaussian_ad.detector import Detector
    from gaussian_ad.images import folder_manifest
    from gaussian_ad.overlays import write_overlays
    from gaussian_ad.tables import score_table, write_table

    detector = Detector.load(model, device=device, batch_size=batch_size, workers=workers)
    if threshold is not None:
        detector.threshold_ = threshold
    files = [r.path for r in folder_manifest(paths)]
    result = detector.score(files, progress=True, maps=maps is not None)
    table = score_table([files[i] for i in result.index], result, detector.levels)
    if maps is not None:
        written = write_overlays(result, files, files, maps, ".", detector.standardizer_)
        table["map"] = [str(maps / written[i]) if i in written else "" for i in result.index]
        typer.echo(f"wrote {len(written)} overlay(s) to {maps}")
    if out is None:
        typer.echo(table.to_string(index=False))
    else:
        write_table(table, out)
        typer.echo(f"wrote {len(table)} rows to {out}")
    _report_errors(result.errors)


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
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results as JSON")] = None,
    patch: Annotated[
        bool, typer.Option(help="also the patch-level model: pixel AUROC, PRO, fused score")
    ] = False,
) -> None:
    """Fit on train/good and report test AUROC per category (summed and per level)."""
    from gaussian_ad.evaluation import evaluate_category, summary
    from gaussian_ad.images import mvtec_categories

    categories = category or mvtec_categories(data_root)
    if not categories:
        raise typer.BadParameter(f"no MVTec-layout categories under {data_root}")
    if patch:
        _evaluate_patch(data_root, categories, backbone, reduction, weights, device, json_out)
        return
    detector = _detector(
        backbone, levels, reduction, variance_threshold, weights, device, batch_size, workers
    )
    results = []
    for name in categories:
        typer.echo(f"[{name}] fitting and scoring")
        result = evaluate_category(data_root, name, detector, progress=True)
        _report_errors(result.errors)
        results.append(result)
    report = summary(results)
    level_names = " ".join(f"L{level:<5d}" for level in detector.levels)
    typer.echo(f"\n{'category':<16}{'AUROC':>7}  {level_names}")
    for name, row in report["categories"].items():
        per_level = " ".join(f"{a:.3f} " for a in row["auroc_levels"])
        typer.echo(f"{name:<16}{row['auroc']:>7.3f}  {per_level}")
    typer.echo(f"{'mean +- SEM':<16}{report['mean_auroc']:>7.3f} +- {report['sem_auroc']:.3f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {json_out}")


def _evaluate_patch(data_root, categories, backbone, reduction, weights, device, json_out):
    """Image-level vs patch-level vs fused AUROC, pixel AUROC and PRO per category."""
    from dataclasses import asdict

    from gaussian_ad.backbones import load_backbone
    from gaussian_ad.evaluation import evaluate_category_patch

    model = load_backbone(backbone, None, weights=weights, device=device)
    reduction = None if reduction.lower() == "none" else reduction.lower()
    typer.echo(f"{'category':<16}{'image':>7}{'patch':>7}{'fused':>7}{'pixel':>7}{'PRO':>7}")
    rows = []
    for name in categories:
        result = evaluate_category_patch(data_root, name, model, reduction, device=device)
        rows.append(asdict(result))
        pixel = "n/a" if result.pixel_auroc is None else f"{result.pixel_auroc:.3f}"
        pro = "n/a" if result.pro is None else f"{result.pro:.3f}"
        typer.echo(
            f"{name:<16}{result.auroc_image:>7.3f}{result.auroc_patch:>7.3f}"
            f"{result.auroc_fused:>7.3f}{pixel:>7}{pro:>7}"
        )
    if json_out:
        json_out.write_text(json.dumps({"categories": rows}, indent=2))
        typer.echo(f"wrote {json_out}")


@app.command("select")
def select_configuration(
    data_root: Path,
    category: Annotated[str, typer.Option(help="MVTec category whose train/good to use")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the selection")] = None,
    n_per_kind: Annotated[int, typer.Option(help="synthetic defects per kind")] = 10,
    seed: Annotated[int, typer.Option(help="hold-out split and defect seed")] = 0,
    backbone: BackboneOpt = "lite0",
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Choose levels, reduction and score on synthetic defects (no real defects needed).

    Fits on 4/5 of train/good; the other fifth gives normals and their defective copies.
    """
    from gaussian_ad.backbones import load_backbone
    from gaussian_ad.evaluation import holdout_split
    from gaussian_ad.images import mvtec_manifest
    from gaussian_ad.selection import select_configuration as select

    paths = [r.path for r in mvtec_manifest(data_root, category, splits=("train",))]
    fit_idx, held_idx = holdout_split(len(paths), seed=seed)
    model = load_backbone(backbone, None, weights=weights, device=device)
    selection = select(
        [paths[i] for i in fit_idx],
        [paths[i] for i in held_idx],
        model,
        n_per_kind=n_per_kind,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        device=device,
    )
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
    patch: Annotated[
        bool, typer.Option(help="also fit the patch-level model: anomaly maps, pixel AUROC")
    ] = False,
    score: Annotated[
        str, typer.Option(help="score that ranks images: image, patch or fused")
    ] = "image",
    select: Annotated[
        bool, typer.Option(help="choose levels, reduction and score on synthetic defects first")
    ] = False,
    dask_address: Annotated[
        str | None, typer.Option(envvar="GAUSSIAN_AD_DASK_ADDRESS", help="Dask scheduler")
    ] = None,
) -> None:
    """Run the training flow per category: extract, fit, evaluate, register in MLflow."""
    from flows.train import train_all

    options = {
        "backbone": backbone,
        "levels": levels,
        "reduction": None if reduction.lower() == "none" else reduction.lower(),
        "augment_passes": augment_passes,
        "patch": patch,
        "score": score,
        "select": select,
    }
    train_all(str(data_root), category or None, dask_address, options)


@app.command("score-archive")
def score_archive(
    source: Annotated[str, typer.Argument(help="folder, glob, tar/zip archive or fsspec URL")],
    out: Annotated[Path, typer.Option(help="output folder (Parquet parts)")],
    model: Annotated[str | None, typer.Option(help="model URI, e.g. models:/NAME@champion")] = None,
    category: Annotated[
        str | None, typer.Option(help="use models:/gaussian-ad-CATEGORY@champion")
    ] = None,
    shard_size: Annotated[int, typer.Option(help="images per shard")] = 256,
    maps: Annotated[
        bool, typer.Option(help="write anomaly-map overlays of the images above the threshold")
    ] = False,
) -> None:
    """Run the scoring flow over an archive; a rerun skips finished shards."""
    from flows.score import score as score_flow

    score_flow(
        source, model=model, category=category, out=str(out), shard_size=shard_size, maps=maps
    )


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
    from flows.nightly import serve_deployments

    serve_deployments(
        data_root,
        categories=category or None,
        cron=cron,
        timezone=timezone,
        dask_address=dask_address,
    )


@app.command()
def demo(out_dir: Annotated[Path, typer.Argument(help="where the demo writes")] = Path("demo")):
    """Synthetic data -> train_all -> registry -> score a tar archive, on embedded services."""
    home = out_dir.resolve() / ".gaussian-ad"
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GAUSSIAN_AD_HOME", str(home))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from flows.demo import run_demo

    run_demo(out_dir)


if __name__ == "__main__":
    app()
