"""The ``gaussian-ad`` command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("DO_NOT_TRACK", "true")

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


def _detector(backbone, levels, reduction, variance_threshold, weights, device, batch, workers):
    from gaussian_ad.detector import Detector

    return Detector(
        backbone=backbone,
        levels=levels,
        reduction=None if reduction.lower() == "none" else reduction.lower(),
        variance_threshold=variance_threshold,
        weights=weights,
        device=device,
        batch_size=batch,
        workers=workers,
    )


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
def fit(
    data_root: Path,
    out: Annotated[Path, typer.Option(help="model file to write (.safetensors)")],
    category: Annotated[
        str | None, typer.Option(help="MVTec category; without it DATA_ROOT is a folder of normals")
    ] = None,
    backbone: BackboneOpt = "lite0",
    levels: LevelsOpt = "1-9",
    reduction: ReductionOpt = "none",
    variance_threshold: VarianceOpt = 0.99,
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Fit on normal images (MVTec train/good of CATEGORY, or every image under DATA_ROOT)."""
    from gaussian_ad.images import folder_manifest, mvtec_manifest

    if category:
        paths = [r.path for r in mvtec_manifest(data_root, category, splits=("train",))]
    else:
        paths = [r.path for r in folder_manifest([data_root])]
    detector = _detector(
        backbone, levels, reduction, variance_threshold, weights, device, batch_size, workers
    )
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
    device: DeviceOpt = None,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 2,
) -> None:
    """Score images with a saved model: path, score, per-level scores, is_anomaly."""
    from gaussian_ad.detector import Detector
    from gaussian_ad.images import folder_manifest
    from gaussian_ad.tables import score_table, write_table

    detector = Detector.load(model, device=device, batch_size=batch_size, workers=workers)
    if threshold is not None:
        detector.fitted_model().threshold_ = threshold
    files = [r.path for r in folder_manifest(paths)]
    result = detector.score(files, progress=True)
    table = score_table([files[i] for i in result.index], result, detector.levels)
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
) -> None:
    """Fit on train/good and report test AUROC per category (summed and per level)."""
    from gaussian_ad.evaluation import evaluate_category, summary
    from gaussian_ad.images import mvtec_categories

    categories = category or mvtec_categories(data_root)
    if not categories:
        raise typer.BadParameter(f"no MVTec-layout categories under {data_root}")
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


if __name__ == "__main__":
    app()
