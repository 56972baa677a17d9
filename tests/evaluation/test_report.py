"""HTML report: verdict first (threshold, confusion matrix), figures, per-defect recall and
AUROC, the FP/FN/most-anomalous gallery, configuration last; escaping, atomic writes, and
what headless Chromium draws of it."""

import base64
import html
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from gaussian_ad.detection.scores import Scores
from gaussian_ad.evaluation.evaluate import Evaluation, ThresholdReport
from gaussian_ad.evaluation.report import (
    LevelRule,
    ReportData,
    explain_metric,
    render_report,
    report_data,
    write_report,
)
from gaussian_ad.stats.calibration import Calibration
from gaussian_ad.stats.fusion import Standardizer
from gaussian_ad.stats.metrics import confusion

N_WORST = 4
THRESHOLD = 15.5
TITLE = "gaussian-ad-disc v3 — lite0 & friends, levels 1-3"
FALSE_POSITIVE = 3  # a good image scored above the threshold, below the 4 worst


def write_png(path: Path, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> ReportData:
    """40 test images; the 4 highest scores are 3 real PNGs and one missing file (read-only)."""
    tmp_path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    defects = ["good"] * 16 + ["crack"] * 8 + ["scratch"] * 10 + ["hole"] * 6
    shift = {"good": 0.0, "crack": 1.5, "scratch": 0.5, "hole": 3.0}
    scores = np.array([10 + shift[d] * 2 + rng.normal(0, 2) for d in defects])
    scores[FALSE_POSITIVE] = 30.0
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
    paths[FALSE_POSITIVE] = write_png(tmp_path / "false_positive.png", 20)
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
        thresholds={"empirical FPR 1%": THRESHOLD, "chi2 3 sigma": 18.25},
        auroc=float(roc_auc_score(labels, scores)),
        auroc_levels=[float(roc_auc_score(labels, col)) for col in level_scores.T],
        heldout_scores=rng.normal(10, 2, size=30),
        params={"backbone": "efficientnet_lite0", "levels": "1-3", "n_train": 200},
        metrics={"observed FPR @ empirical FPR 1%": 0.0625, "observed TPR @ empirical FPR 1%": 0.5},
        threshold=THRESHOLD,
        target_fpr=0.01,
        category="disc",
        model_version="3",
        promoted=False,
        promotion="AUROC 0.91 < champion 0.93",
        level_rules=[
            LevelRule("sigma3", 0.0027, [4.5, 5.5, 6.5], [0.01, 0.02, 0.03], [0.4, 0.5, 0.625])
        ],
    )


@pytest.fixture(scope="module")
def page(data: ReportData) -> str:
    return render_report(data, n_worst=N_WORST)


def block(page: str, element_id: str) -> str:
    """The HTML of the element with this id, up to the next gallery group or section."""
    start = page.index(f'id="{element_id}"')
    ends = [page.find(marker, start + 1) for marker in ('<div id="', "</section>")]
    return page[start : min(end for end in ends if end > 0)]


def gallery_indices(page: str, group: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="item" data-index="(\d+)"', block(page, group))]


def defect_table_rows(page: str) -> dict[str, tuple[int, int, float]]:
    table = re.search(r'<table id="defects">.*?</table>', page, re.S).group(0)
    cell = r"<td[^>]*>([^<]*)</td>"
    rows = re.findall(rf"<tr><td>([^<]*)</td>{cell}{cell}{cell}{cell}</tr>", table)
    return {name: (int(n), int(flagged), value) for name, n, flagged, _, value in rows}


def test_report_contents(data: ReportData, page: str):
    assert html.escape(TITLE) in page
    assert f"{data.auroc:.3f}" in page
    assert page.count('<img class="figure"') == 3  # ROC, histogram, per-level AUROC
    worst = block(page, "most-anomalous")
    assert worst.count('<img class="thumb" src="data:image/jpeg;base64,') == N_WORST - 1
    assert worst.count('class="placeholder"') == 1 and "FileNotFoundError" in worst
    assert "overlay" not in worst and "No anomaly maps" in page
    for key in ("backbone", "efficientnet_lite0", "observed TPR @ empirical FPR 1%", "0.0625"):
        assert key in page


def test_verdict_comes_first_with_threshold_and_confusion_matrix(data: ReportData, page: str):
    verdict = page[page.index('<section id="verdict"') : page.index("</section>")]
    assert page.index('<section id="verdict"') < page.index("<img ")
    assert f'id="threshold">{THRESHOLD:.6g}<' in verdict
    assert "category <b>disc</b>" in verdict and "model version <b>3</b>" in verdict
    assert "not promoted" in verdict and "AUROC 0.91 &lt; champion 0.93" in verdict
    scores, labels = np.asarray(data.scores), np.asarray(data.labels)
    flagged = scores > THRESHOLD
    expected = {
        "tp": int(np.sum(flagged & (labels == 1))),
        "fp": int(np.sum(flagged & (labels == 0))),
        "tn": int(np.sum(~flagged & (labels == 0))),
        "fn": int(np.sum(~flagged & (labels == 1))),
    }
    cells = dict(re.findall(r'data-cell="(\w+)">(\d+)<', verdict))
    assert {name: int(value) for name, value in cells.items()} == expected
    assert expected["fp"] >= 1 and expected["fn"] >= 1 and expected["tp"] >= 1
    fpr = expected["fp"] / (expected["fp"] + expected["tn"])
    recall = expected["tp"] / (expected["tp"] + expected["fn"])
    assert f"FPR on good parts {100 * fpr:.1f}%" in verdict
    assert f"recall on defects {100 * recall:.1f}%" in verdict
    heldout_over = int(np.sum(data.heldout_scores > THRESHOLD))
    assert f"({heldout_over} of {data.heldout_scores.size})" in verdict
    assert "target FPR of 0.01" in verdict


def test_gallery_lists_exactly_the_misclassified_images(data: ReportData, page: str):
    scores, labels = np.asarray(data.scores), np.asarray(data.labels)
    false_positives = np.flatnonzero((scores > THRESHOLD) & (labels == 0))
    false_negatives = np.flatnonzero((scores <= THRESHOLD) & (labels == 1))
    assert gallery_indices(page, "false-positives") == list(
        false_positives[np.argsort(-scores[false_positives])]
    )
    assert gallery_indices(page, "false-negatives") == list(
        false_negatives[np.argsort(scores[false_negatives])]
    )
    assert FALSE_POSITIVE in gallery_indices(page, "false-positives")
    capped = render_report(data, n_worst=N_WORST, n_errors=1)
    assert len(gallery_indices(capped, "false-negatives")) == 1
    assert f"(showing 1 of {false_negatives.size})" in block(capped, "false-negatives")


def test_worst_images_are_the_highest_scoring(data: ReportData, page: str):
    worst = block(page, "most-anomalous")
    assert gallery_indices(page, "most-anomalous") == [17, 25, 30, 35]
    for name in ("worst_0.png", "worst_1.png", "worst_3.png", "missing.png"):
        assert name in worst
    for name in ("lowest_0.png", "lowest_1.png", "lowest_2.png"):
        assert name not in worst
    order = [worst.index(name) for name in ("worst_0.png", "worst_1.png", "missing.png")]
    assert order == sorted(order)


def test_parameter_tables_come_after_the_figures_and_gallery(page: str):
    last_figure = page.rindex('<img class="figure"')
    assert page.index('id="gallery"') < page.index('id="details"') < last_figure
    for table in ('<table id="chi2"', '<table id="params"', '<table id="metrics"'):
        assert page.index(table) > last_figure
    chi2 = re.search(r'<table id="chi2">.*?</table>', page, re.S).group(0)
    assert "predicted FPR 0.0027" in chi2
    assert "t 5.5<br>FPR 0.020 &middot; TPR 0.500" in chi2


def test_per_defect_recall_and_auroc_match_numpy_and_sklearn(data: ReportData, page: str):
    rows = defect_table_rows(page)
    defects = np.asarray(data.defects)
    normal = data.scores[data.labels == 0]
    assert set(rows) == {"good", "crack", "scratch", "hole"}
    assert rows["good"][:2] == (normal.size, int(np.sum(normal > THRESHOLD)))
    for defect in ("crack", "scratch", "hole"):
        count, flagged, value = rows[defect]
        anomalous = data.scores[defects == defect]
        expected = roc_auc_score(
            np.r_[np.zeros(normal.size), np.ones(anomalous.size)], np.r_[normal, anomalous]
        )
        assert (count, flagged) == (anomalous.size, int(np.sum(anomalous > THRESHOLD)))
        assert float(value) == pytest.approx(expected, abs=5e-4)


def test_text_is_escaped(data: ReportData):
    defects = [*data.defects]
    defects[17] = "<b>crack</b>"
    params = {**data.params, "note": 'a "quoted" <value>'}
    page = render_report(replace(data, defects=defects, params=params), n_worst=N_WORST)
    assert "<script>" not in page and "<b>crack" not in page and "<value>" not in page
    assert "&lt;script&gt;alert(1)&lt;" in page
    assert "&lt;b&gt;crack&lt;/b&gt;" in page


def test_every_thumbnail_has_its_mask_and_overlay(data: ReportData, tmp_path: Path):
    real = [i for i, p in enumerate(data.paths) if p and Path(p).exists()]
    maps = {data.paths[i]: np.outer(np.arange(12.0), np.ones(16)) * (i + 1) for i in real}
    mask_file = tmp_path / "mask.png"
    Image.fromarray(np.eye(48, 64, dtype=np.uint8) * 255).save(mask_file)
    masks = [None if label == 0 else str(mask_file) for label in data.labels]
    page = render_report(replace(data, maps=maps, mask_paths=masks), n_worst=N_WORST)
    gallery = block(page, "gallery")
    items = re.findall(r'<figure class="item".*?</figure>', page, re.S)
    with_thumbs = [item for item in items if 'class="thumb"' in item]
    assert len(with_thumbs) >= 4  # the false positive and three of the worst
    for item in with_thumbs:
        assert item.count('class="overlay"') == 1
        index = int(re.search(r'data-index="(\d+)"', item).group(1))
        assert ('class="mask"' in item) == (data.labels[index] == 1)
    groups = ("false-positives", "false-negatives", "most-anomalous")
    in_gallery = {data.paths[i] for group in groups for i in gallery_indices(page, group)}
    shown = [anomaly_map for path, anomaly_map in maps.items() if path in in_gallery]
    low, high = min(m.min() for m in shown), max(m.max() for m in shown)
    assert '<img class="colorbar"' in gallery
    assert f"anomaly-map value {low:.4g} (blue) to {high:.4g} (red)" in gallery
    assert "the range of the maps shown" in gallery
    plain = re.search(r'class="thumb" src="data:image/jpeg;base64,([^"]+)', page).group(1)
    overlaid = re.search(r'class="overlay" src="data:image/jpeg;base64,([^"]+)', page).group(1)
    assert plain != overlaid
    with pytest.raises(ValueError, match="2-D"):
        render_report(replace(data, maps={data.paths[17]: np.zeros((2, 3, 4))}))


def test_pro_curve_and_pixel_metrics_are_shown_with_masks(data: ReportData):
    fpr = np.linspace(0, 1, 11)
    page = render_report(
        replace(data, pixel_auroc=0.987, pro=0.912, pro_curve=(fpr, np.sqrt(fpr))), n_worst=1
    )
    assert page.count('<img class="figure"') == 4
    assert 'alt="PRO curve of the anomaly maps"' in page
    verdict = page[: page.index("</section>")]
    assert "0.987" in verdict and "0.912" in verdict


def test_report_data_of_an_evaluation(tmp_path: Path):
    labels = np.array([0, 0, 0, 1, 1, 1])
    level_scores = np.array([[1.0, 1], [2, 1], [3, 3], [2.5, 2], [5, 5], [6, 6]])
    sums = level_scores.sum(axis=1)
    maps = np.stack([np.full((4, 4), s, np.float32) for s in sums])
    test = Scores(np.arange(6), level_scores, sums / 2, maps, sums, sums > 5.0)
    held = Scores(np.arange(4), level_scores[:4] * 0.9, scores=sums[:4] * 0.9)
    rule = {"chi2_sigma3": [2.0, 2.5]}
    rule_metrics = {"chi2_sigma3_predicted_fpr": 0.0027}
    for level, (fpr, tpr) in zip((7, 8), ((0.1, 0.6), (0.2, 0.7)), strict=True):
        rule_metrics |= {
            f"chi2_sigma3_l{level}_observed_fpr": fpr,
            f"chi2_sigma3_l{level}_tpr": tpr,
        }
    evaluation = Evaluation(
        kind="image",
        labels=labels,
        test=test,
        heldout=held,
        aurocs={"image": 0.9},
        auroc_levels=[0.8, 0.85],
        threshold=5.0,
        thresholds=ThresholdReport({**rule, "empirical_fpr0.01": 5.0}, rule_metrics),
        pixel_auroc=0.95,
        pro=0.9,
        pro_points=(np.linspace(0.0, 1.0, 5), np.array([0.0, 0.5, 0.8, 0.9, 1.0])),
    )
    mask_file = tmp_path / "mask.png"
    Image.fromarray(np.eye(4, dtype=np.uint8) * 255).save(mask_file)
    paths = [f"img{i}.png" for i in range(6)]
    masks = [None, None, None, *[str(mask_file)] * 3]
    data = report_data(
        "t",
        evaluation,
        paths,
        ["good"] * 3 + ["cut"] * 3,
        {"levels": [7, 8]},
        masks=masks,
        calibration=Calibration("image", 5.0, 0.05, 4, Standardizer(5.0, 1.0, 2.0, 0.5)),
        model_version="4",
        promoted=True,
        promotion="first model",
    )
    assert data.threshold == 5.0 and data.score_kind == "image" and data.target_fpr == 0.05
    assert data.map_scale == (2.0, 3.5)  # the overlays' fixed scale: mean, mean + 3 SD
    assert (data.model_version, data.promoted, data.promotion) == ("4", True, "first model")
    assert data.level_rules == [LevelRule("sigma3", 0.0027, [2.0, 2.5], [0.1, 0.2], [0.6, 0.7])]
    assert not any(key.startswith("chi2_") for key in data.metrics)
    assert data.metrics["auroc"] == 0.9 and data.metrics["threshold"] == 5.0
    assert set(data.maps) == set(paths)  # 6 images: every one is in the default gallery
    fpr, pro = data.pro_curve
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and np.all(np.diff(pro) >= 0)
    page = render_report(data)
    assert page.count('<img class="figure"') == 4
    assert gallery_indices(page, "false-negatives") == [3]  # 2.5 + 2 = 4.5 <= 5
    assert "the model's" in page and "anomaly-map value 2 (blue) to 3.5 (red)" in page


def test_inconsistent_data_is_rejected(data: ReportData):
    with pytest.raises(ValueError, match="one entry per image"):
        render_report(replace(data, paths=data.paths[:-1]))
    with pytest.raises(ValueError, match="labels must be 0"):
        render_report(replace(data, labels=data.labels * 0.5))
    with pytest.raises(ValueError, match="mask_paths"):
        render_report(replace(data, mask_paths=[None]))


def test_write_report_is_atomic(data: ReportData, tmp_path: Path):
    target = tmp_path / "reports" / "report.html"
    assert write_report(data, target, n_worst=2) == target
    written = target.read_text(encoding="utf-8")
    assert written == render_report(data, n_worst=2)
    with pytest.raises(ValueError):
        write_report(replace(data, scores=data.scores[:-1]), target)
    assert target.read_text(encoding="utf-8") == written
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_figures_are_valid_pngs(page: str, tmp_path: Path):
    payloads = re.findall(r'class="figure" src="data:image/png;base64,([^"]+)', page)
    assert len(payloads) == 3
    for index, payload in enumerate(payloads):
        figure_path = tmp_path / f"figure_{index}.png"
        figure_path.write_bytes(base64.b64decode(payload))
        with Image.open(figure_path) as figure:
            assert figure.format == "PNG" and min(figure.size) >= 300


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_headless_chromium_renders_the_report(data: ReportData, tmp_path: Path):
    report = write_report(data, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            report.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def first_screen_text(report: Path, width: int = 1400, height: int = 1000) -> str:
    """The text headless Chromium lays out within the first ``width`` x ``height`` screen of
    ``report``: a script in a copy of the page collects every text node whose box starts
    above the fold and the DOM is dumped with it."""
    probe = report.with_name("probe.html")
    script = (
        "<script>window.addEventListener('load', () => {const out = [];"
        "const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);"
        "const range = document.createRange();"
        "while (walk.nextNode()) {const node = walk.currentNode;"
        "if (!node.textContent.trim()) continue; range.selectNodeContents(node);"
        "const box = range.getBoundingClientRect();"
        "if (box.height > 0 && box.top < innerHeight && box.left < innerWidth)"
        " out.push(node.textContent.trim());}"
        "const pre = document.createElement('pre'); pre.id = 'first-screen';"
        "pre.textContent = out.join(' '); document.body.appendChild(pre);});</script>"
    )
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size={width},{height}",
            "--dump-dom",
            probe.as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r'<pre id="first-screen">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run"
    return re.sub(r"\s+", " ", html.unescape(found.group(1)))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_first_screen_shows_verdict_threshold_recall_miss_and_false_alarm_rates(
    data: ReportData, tmp_path: Path
):
    report = write_report(
        replace(data, configuration="lite0 at 352 px, levels 1-3"), tmp_path / "r.html"
    )
    seen = first_screen_text(report)
    counts = confusion(data.labels, data.scores, THRESHOLD)
    for text in (
        "not promoted",
        "AUROC 0.91 < champion 0.93",
        f"{THRESHOLD:.6g}",
        f"recall {100 * counts.recall:.1f}%",
        f"miss rate {100 * (1 - counts.recall):.1f}%",  # in the decision rule's sentence
        f"false-alarm rate {100 * counts.fpr:.1f}%",
        "miss rate: defective parts passed",  # the tiles
        "false-alarm rate: good parts flagged",
        "false alarms",  # the links to the gallery and the legend
        "legend of markers and terms",
        "Technical configuration: lite0 at 352 px, levels 1-3",
    ):
        assert text in seen, text
    assert "Legend: markers and terms" not in seen  # the page's end is below the fold


def test_reachable_fpr_is_stated_when_the_target_is_below_one_over_n(data: ReportData):
    verdict = render_report(data)[: render_report(data).index("</section>")]
    n = data.heldout_scores.size  # 30 held-out normals, target 0.01 < 1/30
    assert f"below 1/{n} = {100 / n:.1f}%" in verdict
    reachable = render_report(replace(data, target_fpr=0.05))
    assert 'id="reachable"' not in reachable


def test_first_version_reads_as_champion_for_want_of_one(data: ReportData):
    page = render_report(replace(data, promoted=True, first_version=True, promotion="x"))
    meta = re.search(r'<p class="meta">.*?</p>', page, re.S).group(0)
    assert '<span class="badge champion">champion</span>' in meta
    assert "first version of this model: champion because there was no champion yet" in meta
    assert "x" not in meta.removeprefix('<p class="meta">').replace("badge", "")


def test_metrics_and_markers_are_explained_in_the_legend(data: ReportData):
    metrics = {"empirical_fpr0.001": 3.5, "empirical_fpr0.001_tpr": 0.4, "auroc_image": 0.9}
    page = render_report(replace(data, metrics=metrics))
    legend = page[page.index('<section id="legend"') :]
    assert "empirical_fpr0.001: 0.1% of them" in legend
    assert "a share 0.001 of held-out good images exceed" in legend
    assert "above the empirical_fpr0.001 threshold (its recall)" in page
    assert "AUROC of the image score on the test images" in legend
    assert explain_metric("no_such_metric") == ""


def test_gallery_says_which_score_flagged_an_image_whose_map_stays_blue(
    data: ReportData, tmp_path: Path
):
    """Fused score: a false positive flagged by its image score, with a cool map, and a
    missed defect whose map glows red but whose image score kept it under the threshold."""
    scale = Standardizer(image_mean=10.0, image_std=2.0, patch_mean=1.0, patch_std=0.5)
    image_scores = np.asarray(data.scores, float).copy()
    patch_scores = np.full(image_scores.size, 1.0)
    defective = np.flatnonzero(data.labels == 1)
    missed = int(defective[np.argmin(data.scores[defective])])  # image part below 0.5
    patch_scores[missed] = 2.5  # 3 SDs: red on the map's scale
    fused = (image_scores - 10.0) / 2.0 + (patch_scores - 1.0) / 0.5
    threshold = 4.0
    maps = {
        data.paths[FALSE_POSITIVE]: np.full((4, 4), 1.0),  # at the blue end
        data.paths[missed]: np.full((4, 4), 2.5),
    }
    missed_path = write_png(tmp_path / "missed.png", 30)
    maps[missed_path] = maps.pop(data.paths[missed])
    paths = [*data.paths]
    paths[missed] = missed_path
    page = render_report(
        replace(
            data,
            scores=fused,
            threshold=threshold,
            score_kind="fused",
            paths=paths,
            maps=maps,
            map_scale=(1.0, 2.5),
            image_scores=image_scores,
            patch_scores=patch_scores,
            standardizer=scale,
            thresholds={},
        )
    )
    assert "The decision uses the fused score" in page
    items = dict(re.findall(r'data-index="(\d+)".*?<figcaption>(.*?)</figcaption>', page, re.S))
    positive = items[str(FALSE_POSITIVE)]
    assert f"fused score {fused[FALSE_POSITIVE]:.4g} &gt; threshold 4" in positive
    assert f"image part {(30.0 - 10.0) / 2.0:.3g} + patch part 0" in positive
    assert "flagged mainly by its image score; its map stays blue" in positive
    negative = items[str(missed)]
    assert "patch score (map peak) 2.5" in negative and "&le; threshold 4" in negative
    assert (
        "passed: its two parts add up to no more than the threshold; its map glows red" in negative
    )
    assert negative.count("<details><summary>distance per level</summary>L1 ") == 1
