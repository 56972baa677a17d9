"""HTML report: contents, worst images, per-defect AUROC, escaping, atomic writes."""

import base64
import html
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from gaussian_ad.evaluation.report import ReportData, render_report, write_report

N_WORST = 4
N_FIGURES = 3
TITLE = "gaussian-ad-disc v3 — lite0 & friends, levels 1-3"


def write_png(path: Path, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def report_data(tmp_path_factory: pytest.TempPathFactory) -> ReportData:
    """40 test images; the 4 highest scores are 3 real PNGs and one missing file (read-only)."""
    tmp_path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    defects = ["good"] * 16 + ["crack"] * 8 + ["scratch"] * 10 + ["hole"] * 6
    shift = {"good": 0.0, "crack": 1.5, "scratch": 0.5, "hole": 3.0}
    scores = np.array([10 + shift[d] * 2 + rng.normal(0, 2) for d in defects])
    labels = np.array([int(d != "good") for d in defects])
    paths = [""] * len(defects)
    worst = [17, 25, 30, 35]  # crack, scratch, scratch, hole
    for rank, index in enumerate(worst):
        scores[index] = 100.0 - 10 * rank
        paths[index] = write_png(tmp_path / f"worst_{rank}.png", rank)
    paths[worst[2]] = str(tmp_path / "<script>alert(1)<" / "missing.png")
    lowest = np.argsort(scores)[:3]
    for rank, index in enumerate(lowest):
        paths[index] = write_png(tmp_path / f"lowest_{rank}.png", 10 + rank)
    level_scores = np.column_stack([scores * w + rng.normal(0, 1, scores.size) for w in (0.2, 0.3)])
    level_scores = np.column_stack([level_scores, scores - level_scores.sum(axis=1)])
    return ReportData(
        title=TITLE,
        labels=labels,
        scores=scores,
        level_scores=level_scores,
        levels=[1, 2, 3],
        paths=paths,
        defects=defects,
        thresholds={"empirical FPR 1%": 15.5, "chi2 3 sigma": 18.25},
        auroc=float(roc_auc_score(labels, scores)),
        auroc_levels=[float(roc_auc_score(labels, col)) for col in level_scores.T],
        heldout_scores=rng.normal(10, 2, size=30),
        params={"backbone": "efficientnet_lite0", "levels": "1-3", "n_train": 200},
        metrics={"observed FPR @ empirical FPR 1%": 0.0625, "observed TPR @ empirical FPR 1%": 0.5},
    )


@pytest.fixture(scope="module")
def page(report_data: ReportData) -> str:
    return render_report(report_data, n_worst=N_WORST)


def defect_table_rows(page: str) -> dict[str, tuple[int, float]]:
    table = re.search(r'<table id="defects">.*?</table>', page, re.S).group(0)
    rows = re.findall(r"<tr><td>([^<]*)</td><td[^>]*>(\d+)</td><td[^>]*>([\d.]+)</td></tr>", table)
    return {name: (int(n), float(value)) for name, n, value in rows}


def test_report_contents(report_data: ReportData, page: str):
    assert html.escape(TITLE) in page
    assert f"{report_data.auroc:.3f}" in page
    assert page.count("<img ") == N_FIGURES + N_WORST - 1  # one worst image is missing
    assert page.count("data:image/png;base64,") == N_FIGURES
    assert page.count("data:image/jpeg;base64,") == N_WORST - 1
    assert page.count('class="placeholder"') == 1 and "FileNotFoundError" in page
    for key in ("backbone", "efficientnet_lite0", "observed TPR @ empirical FPR 1%", "0.0625"):
        assert key in page


def test_worst_images_are_the_highest_scoring(page: str):
    for name in ("worst_0.png", "worst_1.png", "worst_3.png", "missing.png"):
        assert name in page
    for name in ("lowest_0.png", "lowest_1.png", "lowest_2.png"):
        assert name not in page
    order = [page.index(name) for name in ("worst_0.png", "worst_1.png", "missing.png")]
    assert order == sorted(order)


def test_per_defect_auroc_matches_sklearn(report_data: ReportData, page: str):
    rows = defect_table_rows(page)
    defects = np.asarray(report_data.defects)
    normal = report_data.scores[report_data.labels == 0]
    assert set(rows) == {"crack", "scratch", "hole"}
    for defect, (count, value) in rows.items():
        anomalous = report_data.scores[defects == defect]
        expected = roc_auc_score(
            np.r_[np.zeros(normal.size), np.ones(anomalous.size)], np.r_[normal, anomalous]
        )
        assert count == anomalous.size
        assert value == pytest.approx(expected, abs=5e-4)


def test_text_is_escaped(report_data: ReportData):
    defects = [*report_data.defects]
    defects[17] = "<b>crack</b>"
    params = {**report_data.params, "note": 'a "quoted" <value>'}
    page = render_report(replace(report_data, defects=defects, params=params), n_worst=N_WORST)
    assert "<script>" not in page and "<b>crack" not in page and "<value>" not in page
    assert "&lt;script&gt;alert(1)&lt;" in page
    assert "&lt;b&gt;crack&lt;/b&gt;" in page


def test_anomaly_map_is_overlaid(report_data: ReportData):
    worst_path = report_data.paths[17]
    plain = render_report(report_data, n_worst=1)
    overlay = {worst_path: np.outer(np.arange(12.0), np.ones(16))}
    overlaid = render_report(replace(report_data, maps=overlay), n_worst=1)
    thumbs = [re.search(r"data:image/jpeg;base64,([^\"]+)", p).group(1) for p in (plain, overlaid)]
    assert thumbs[0] != thumbs[1]
    with pytest.raises(ValueError, match="2-D"):
        render_report(replace(report_data, maps={worst_path: np.zeros((2, 3, 4))}))


def test_inconsistent_data_is_rejected(report_data: ReportData):
    with pytest.raises(ValueError, match="one entry per image"):
        render_report(replace(report_data, paths=report_data.paths[:-1]))
    with pytest.raises(ValueError, match="labels must be 0"):
        render_report(replace(report_data, labels=report_data.labels * 0.5))


def test_write_report_is_atomic(report_data: ReportData, tmp_path: Path):
    target = tmp_path / "reports" / "report.html"
    assert write_report(report_data, target, n_worst=2) == target
    written = target.read_text(encoding="utf-8")
    assert written == render_report(report_data, n_worst=2)
    with pytest.raises(ValueError):
        write_report(replace(report_data, scores=report_data.scores[:-1]), target)
    assert target.read_text(encoding="utf-8") == written
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_figures_are_valid_pngs(page: str, tmp_path: Path):
    for index, payload in enumerate(re.findall(r"data:image/png;base64,([^\"]+)", page)):
        figure_path = tmp_path / f"figure_{index}.png"
        figure_path.write_bytes(base64.b64decode(payload))
        with Image.open(figure_path) as figure:
            assert figure.format == "PNG" and min(figure.size) >= 300
