"""The gaussian-ad command line on the synthetic dataset."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaussian_ad.cli import app
from gaussian_ad.detection.detector import Detector
from gaussian_ad.store.feature_store import FeatureStore

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
        assert row["n_train"] == 25 and row["n_test"] == 17  # all fit, calibrated out of fold
    assert report["mean_auroc"] >= 0.95
    assert "mean +- SEM" in text


@pytest.fixture(scope="module")
def disc_model(small_dataset, tmp_path_factory):
    """``fit --category disc --levels 7-9`` (otherwise the defaults), once for the module."""
    model = tmp_path_factory.mktemp("disc") / "disc.safetensors"
    invoke("fit", small_dataset, "--category", "disc", "--levels", "7-9", "--out", model)
    return model


def test_fit_then_score_writes_one_row_per_image(small_dataset, disc_model, tmp_path):
    model = disc_model
    broken = tmp_path / "imgs" / "broken.png"
    broken.parent.mkdir()
    broken.write_text("not an image")
    out = tmp_path / "scores.csv"
    test_dir = small_dataset / "disc" / "test"
    output = invoke("score", model, test_dir, broken.parent, "--out", out, "--threshold", "1e9")
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 18  # 17 scored, and the unreadable one with its reason
    assert list(table.columns) == [
        "path",
        "score",
        "score_l7",
        "score_l8",
        "score_l9",
        "image_score",
        "patch_score",
        "is_anomaly",
        "normalized_score",
        "reason",
    ]  # the patch model is on by default
    scored, unreadable = table[table["reason"] == ""], table[table["reason"] != ""]
    assert len(scored) == 17 and (scored["is_anomaly"] == "False").all()
    assert list(unreadable["path"]) == [str(broken)] and unreadable["score"].item() == ""
    assert "broken.png" in output and "not an image" in output


def test_score_command_imports_only_what_scoring_needs(small_dataset, disc_model, tmp_path):
    # Every score call and worker pays for what it imports: scikit-learn, SciPy, matplotlib,
    # MLflow, Prefect, Dask and Zarr cost 0.2-2 s of CPU each and scoring needs none of them.
    model = disc_model
    image = next((small_dataset / "disc" / "test").rglob("*.png"))
    out = tmp_path / "scores.csv"
    heavy = ("sklearn", "scipy", "matplotlib", "mlflow", "prefect", "dask", "distributed", "zarr")
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print(gc.isenabled(), gc.get_freeze_count() > 100_000))\n"
        f"atexit.register(lambda: print(sorted({{m.split('.')[0] for m in sys.modules}}"
        f" & set({heavy!r}))))\n"
        "from gaussian_ad.cli import app\n"
        f"sys.argv = ['gaussian-ad', 'score', {str(model)!r}, {str(image)!r},"
        f" '--out', {str(out)!r}]\n"
        "app()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(pd.read_csv(out)) == 1
    assert run.stdout.strip().splitlines()[-2:] == ["[]", "True True"], run.stdout


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
    assert "fitted on 25 images" in out  # all of them; the threshold comes out of fold
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
            "--no-patch",
            "--score",
            "fused",
            "--out",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert result.exit_code != 0 and "patch=True" in result.output


# --------------------------------------------------------------------------- every flag reaches
def fails(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return result.output


def loader_log(caplog) -> str:
    return " ".join(
        r.getMessage() for r in caplog.records if r.name == "gaussian_ad.features.extract"
    )


def test_synth_flags_shape_the_dataset(tmp_path):
    invoke(
        "synth",
        tmp_path / "a",
        "--n-train",
        3,
        "--n-test-good",
        2,
        "--n-test-per-defect",
        1,
        "--size",
        64,
        "--seed",
        5,
    )
    invoke("synth", tmp_path / "b", "--n-train", 3, "--size", 64, "--seed", 6)
    train = sorted((tmp_path / "a" / "disc" / "train" / "good").glob("*.png"))
    assert len(train) == 3
    assert len(list((tmp_path / "a" / "disc" / "test" / "good").glob("*.png"))) == 2
    assert Image.open(train[0]).size == (64, 64)
    other = tmp_path / "b" / "disc" / "train" / "good" / train[0].name
    assert train[0].read_bytes() != other.read_bytes()  # --seed reaches the generator


def test_extract_flags_shape_the_store(small_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    store = tmp_path / "s.zarr"
    invoke(
        "extract",
        small_dataset,
        "--category",
        "disc",
        "--store",
        store,
        "--levels",
        "7,9",
        "--augment-passes",
        2,
        "--shard-size",
        16,
        "--seed",
        3,
        "--batch-size",
        7,
        "--workers",
        1,
    )
    opened = FeatureStore.open(str(store))
    assert opened.levels == [7, 9] and opened.n_rows == 50 and opened.n_shards == 4
    assert sorted(set(opened.manifest["augment_pass"])) == [0, 1]
    assert "batches of 7, 1 decoding threads" in loader_log(caplog)
    again = tmp_path / "t.zarr"
    invoke(
        "extract",
        small_dataset,
        "--category",
        "disc",
        "--store",
        again,
        "--levels",
        "9",
        "--augment-passes",
        1,
        "--seed",
        4,
    )
    rows = slice(0, 25)
    assert not np.allclose(  # --seed reaches the augmentation
        opened.read_level(9)[rows], FeatureStore.open(str(again)).read_level(9)[rows]
    )
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"not weights")
    result = runner.invoke(
        app,
        [
            "extract",
            str(small_dataset),
            "--category",
            "disc",
            "--store",
            str(tmp_path / "u.zarr"),
            "--weights",
            str(bogus),
        ],
    )
    assert result.exit_code == 1 and "weights.safetensors" in result.output


def test_fit_flags_reach_the_saved_model(small_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    default, tuned = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    small = ("--input-size", 160)  # the images' own side: the flags, not the accuracy
    invoke("fit", small_dataset, "--category", "grain", "--levels", "8", *small, "--out", default)
    invoke(
        "fit",
        small_dataset,
        "--category",
        "grain",
        "--levels",
        "8",
        *small,
        "--out",
        tuned,
        "--reduction",
        "npca",
        "--variance-threshold",
        "0.9",
        "--target-fpr",
        "0.2",
        "--seed",
        2,
        "--batch-size",
        5,
        "--workers",
        1,
    )
    a, b = Detector.load(default), Detector.load(tuned)
    assert b.config.reduction == "npca" and b.config.variance_threshold == 0.9
    assert b.model_.components_ is not None and a.model_.components_ is None
    assert b.config.seed == 2 and b.calibration_.target_fpr == 0.2
    assert a.calibration_.target_fpr == 0.01 and a.threshold != b.threshold
    assert "batches of 5, 1 decoding threads" in loader_log(caplog)
    fails("fit", small_dataset, "--category", "grain", "--reduction", "bogus")
    fails("fit", small_dataset, "--category", "grain", "--variance-threshold", "1.5")
    fails("fit", small_dataset, "--category", "grain", "--levels", "")
    fails("fit", small_dataset, "--category", "grain", "--target-fpr", "0")
    fails("fit", small_dataset, "--category", "grain", "--batch-size", "0")


def test_score_runtime_flags_reach_the_loader(small_dataset, tmp_path, caplog):
    model = tmp_path / "m.safetensors"
    args = ("--levels", "9", "--input-size", 160)  # the images' own side
    invoke("fit", small_dataset, "--category", "disc", *args, "--out", model)
    caplog.set_level(logging.INFO)
    invoke(
        "score", model, small_dataset / "disc" / "test" / "good", "--batch-size", 3, "--workers", 1
    )
    assert "batches of 3, 1 decoding threads" in loader_log(caplog)


def test_evaluate_flags_reach_the_evaluation(small_dataset, tmp_path):
    out = tmp_path / "e.json"
    invoke(
        "evaluate",
        small_dataset,
        "--category",
        "disc",
        "--levels",
        "7-9",
        "--reduction",
        "npca",
        "--variance-threshold",
        "0.95",
        "--target-fpr",
        "0.1",
        "--seed",
        1,
        "--json",
        out,
    )
    report = json.loads(out.read_text())
    config = report["config"]
    assert (config["levels"], config["reduction"], config["variance_threshold"]) == (
        [7, 8, 9],
        "npca",
        0.95,
    )
    assert config["seed"] == 1 and report["target_fpr"] == 0.1
    row = report["categories"]["disc"]
    assert len(row["auroc_levels"]) == 3 and row["threshold"] > 0


def test_select_flags_reach_the_selection(small_dataset, tmp_path):
    out = tmp_path / "s.json"
    invoke(
        "select",
        small_dataset,
        "--category",
        "disc",
        "--n-per-kind",
        2,
        "--seed",
        1,
        "--batch-size",
        8,
        "--json",
        out,
    )
    selection = json.loads(out.read_text())
    assert selection["seed"] == 1 and selection["n_per_kind"] == 2
    assert selection["counts"]["validation_defective"] == 8  # 4 kinds x 2


def test_patch_pool_flag_sets_the_pooling_radius():
    import pytest
    import typer

    from gaussian_ad.cli import _configs

    assert _configs(patch=True, patch_pool="all")[0].patch_pool_radius is None
    assert _configs(patch=True, patch_pool="2")[0].patch_pool_radius == 2
    assert _configs(patch=True, patch_pool="0")[0].patch_pool_radius == 0
    assert _configs(patch=True, patch_pool="AUTO")[0].patch_pool_radius == "auto"
    assert _configs()[0].patch and _configs()[0].patch_pool_radius == "auto"  # the default
    for bad in ("-1", "some"):
        with pytest.raises(typer.BadParameter, match="patch"):
            _configs(patch=True, patch_pool=bad)
    assert _configs(input_size=448)[0].image_size == 448
    with pytest.raises(typer.BadParameter, match="input_size"):
        _configs(input_size=300)
