"""The demo: synthetic data -> train_all -> a weaker challenger that loses -> registered
models -> score a tar archive.

The models include the patch-level one, so the reports show anomaly maps and the
scoring writes the overlays of every image (``maps="all"``: a good part's map beside a
flagged one's). The second training of
the scored category uses only level 1 (the backbone's stem), so the registry shows a
version that was not promoted, with the reason in its description.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pandas as pd
from gaussian_ad_flows.options import TrainOptions
from gaussian_ad_flows.runtime import tracking_uri, work_dir
from gaussian_ad_flows.score import score
from gaussian_ad_flows.train import train, train_all

from gaussian_ad.config import DetectorConfig
from gaussian_ad.data.images import mvtec_manifest
from gaussian_ad.data.synthetic import make_dataset
from gaussian_ad.registry.mlflow_model import ui_url

SCORED_CATEGORY = "disc"
# The stem alone: colour and contrast statistics pooled over the whole image, which a small
# local defect barely moves (the image score alone: no patch model to rescue it, and the
# backbone pass stops after the stem); the paper finds the early levels the weakest.
WEAK_CHALLENGER = DetectorConfig(levels="1", score="image", patch=False)


def make_archive(data_root: Path, category: str, archive: Path) -> Path:
    """A tar of the category's test images, plus one corrupt member to show error handling."""
    with tarfile.open(archive, "w") as tar:
        for record in mvtec_manifest(data_root, category, splits=("test",)):
            path = Path(record.path)
            tar.add(path, arcname=f"{record.defect}/{path.name}")
        corrupt = archive.with_suffix(".corrupt.png")
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        tar.add(corrupt, arcname="broken/corrupt.png")
        corrupt.unlink()
    return archive


def run_demo(out_dir: Path) -> None:
    """Run the whole pipeline on synthetic data under ``out_dir`` and print what it made."""
    out_dir = out_dir.resolve()
    data_root = out_dir / "data"
    if not data_root.exists():
        make_dataset(data_root)
    results = train_all(str(data_root), options=TrainOptions(detector=DetectorConfig(patch=True)))
    weak = train(str(data_root), SCORED_CATEGORY, TrainOptions(detector=WEAK_CHALLENGER))
    archive = make_archive(data_root, SCORED_CATEGORY, out_dir / f"{SCORED_CATEGORY}-test.tar")
    out = str(out_dir / "scores")
    summary = score(str(archive), category=SCORED_CATEGORY, out=out, maps="all")
    parts = sorted((out_dir / "scores" / "scores").glob("part-*.parquet"))
    table = pd.concat([pd.read_parquet(p) for p in parts]).sort_values("score", ascending=False)

    print("\n=== trained models ===")
    for r in results:
        alias = "champion" if r["promoted"] else "challenger"
        pixel = f"  pixel AUROC {r['pixel_auroc']:.4f}" if "pixel_auroc" in r else ""
        print(f"{r['name']:<24} v{r['version']:<3} {alias:<11} AUROC {r['auroc']:.4f}{pixel}")
        print(f"    report: {r['report']}")
    print(
        f"\n=== a weaker challenger: {weak['name']} v{weak['version']}, level 1 only ===\n"
        "The stem's pooled colour and contrast statistics barely move when a small part of "
        f"the image is defective. AUROC {weak['auroc']:.4f}; "
        f"{'promoted' if weak['promoted'] else 'not promoted'}: {weak['reason']}"
        " (the version's description in the registry says the same)"
        f"\n    report: {weak['report']}"
    )
    print(
        f"\n=== scored {archive.name}: {summary['scored']} images, "
        f"{summary['anomalies']} anomalous, {summary['errors']} errors ==="
    )
    columns = ["path", "score", "patch_score", "is_anomaly", "map"]
    print(table[columns].head(10).to_string(index=False))
    champion = next(r for r in results if r["category"] == SCORED_CATEGORY)
    print("\n=== look at it ===")
    page = f"experiments/{champion['experiment_id']}/runs/{champion['run_id']}/artifacts"
    print(
        f"Report:     {champion['report']}\n"
        f"            ({champion['name']} v{champion['version']}; in the MLflow UI below: "
        f"{ui_url('http://127.0.0.1:5000', page + '/report.html')}; a category's champion: "
        f"GAUSSIAN_AD_HOME={work_dir()} .venv/bin/gaussian-ad report {SCORED_CATEGORY} --open)"
    )
    print(
        f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri()} "
        f"--port 5000   # then {ui_url('http://127.0.0.1:5000', 'experiments')}"
    )
    print(
        "Prefect UI: PREFECT_SERVER_ANALYTICS_ENABLED=false "
        f"PREFECT_HOME={work_dir() / 'prefect'} .venv/bin/prefect server start"
        "   # then http://127.0.0.1:4200 (on another --port, set PREFECT_SERVER_API_PORT too)"
    )
    print(
        f"Scores:     {out_dir / 'scores'}   (anomaly-map overlays of every image, good ones "
        "too, under maps/; score-archive writes the flagged ones unless --all-maps)"
    )
