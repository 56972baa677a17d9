"""The gaussian-ad command line on the synthetic dataset."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from gaussian_ad.cli import app

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_evaluate_reaches_the_target_auroc_on_every_category(small_dataset, tmp_path):
    out = tmp_path / "eval.json"
    text = invoke("evaluate", small_dataset, "--json", out)
    report = json.loads(out.read_text())
    assert set(report["categories"]) == {"weave", "grain", "disc"}
    for name, row in report["categories"].items():
        assert row["auroc"] >= 0.95, (name, row)
        assert len(row["auroc_levels"]) == 9
        assert row["n_train"] == 20 and row["n_test"] == 17  # 4/5 fit, 1/5 calibrates
    assert report["mean_auroc"] >= 0.95
    assert "mean +- SEM" in text


def test_fit_then_score_writes_one_row_per_image(small_dataset, tmp_path):
    model = tmp_path / "disc.safetensors"
    invoke("fit", small_dataset, "--category", "disc", "--levels", "7-9", "--out", model)
    broken = tmp_path / "imgs" / "broken.png"
    broken.parent.mkdir()
    broken.write_text("not an image")
    out = tmp_path / "scores.csv"
    test_dir = small_dataset / "disc" / "test"
    output = invoke("score", model, test_dir, broken.parent, "--out", out, "--threshold", "1e9")
    table = pd.read_csv(out)
    assert len(table) == 17
    assert list(table.columns) == [
        "path",
        "score",
        "score_l7",
        "score_l8",
        "score_l9",
        "is_anomaly",
    ]
    assert not table["is_anomaly"].any()
    assert "broken.png" in output and "not an image" in output


def test_evaluate_patch_reports_pixel_metrics(small_dataset, tmp_path):
    out = tmp_path / "patch.json"
    invoke("evaluate", small_dataset, "--category", "grain", "--patch", "--json", out)
    row = json.loads(out.read_text())["categories"]["grain"]
    assert row["pixel_auroc"] >= 0.9 and row["pro"] > 0.5
    assert row["auroc_fused"] >= max(row["auroc_image"], row["auroc_patch"]) - 0.01


def test_fit_patch_fused_then_score_writes_overlays_of_flagged_images(small_dataset, tmp_path):
    model = tmp_path / "weave.safetensors"
    out = invoke(
        "fit",
        small_dataset,
        "--category",
        "weave",
        "--levels",
        "7-9",
        "--patch",
        "--score",
        "fused",
        "--target-fpr",
        "0.05",
        "--out",
        model,
    )
    assert "fitted on 20 images" in out  # 4/5 of 25: the other fifth calibrates
    maps, scores = tmp_path / "maps", tmp_path / "scores.parquet"
    invoke("score", model, small_dataset / "weave" / "test", "--out", scores, "--maps", maps)
    table = pd.read_parquet(scores)
    flagged = table[table["is_anomaly"]]
    assert len(flagged) >= 1 and {"image_score", "patch_score"} <= set(table.columns)
    assert sorted(flagged["map"]) == sorted(str(p) for p in maps.glob("*.png"))
    assert (table.loc[~table["is_anomaly"], "map"] == "").all()
    result = runner.invoke(
        app,
        [
            "fit",
            str(small_dataset),
            "--category",
            "weave",
            "--score",
            "fused",
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert result.exit_code != 0 and "patch=True" in result.output
