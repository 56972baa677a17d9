"""Self-contained HTML evaluation report, laid out for the engineer who acts on it.

In page order: the verdict (title, technical configuration, category, model version,
champion or not and why, AUROC, pixel AUROC and PRO, recall, miss rate and false-alarm rate,
the decision rule, which score the maps show and which one decides, links to the gallery's
groups, its colour bar and the legend, the test set's confusion matrix, the FPR of the
held-out normals and whether the target FPR was reachable with them); the ROC and PRO
curves, the score histograms with the threshold and the per-defect recall and AUROC; a
gallery of the false positives, the false negatives and the most anomalous images (image |
ground truth | overlay, one colour scale shown by a colour bar, and each image's score
breakdown: deciding score, image and patch scores, per level, and which of them flagged
it); then the per-level AUROC, the per-level chi-square thresholds, the parameters and the
remaining metrics with their meaning; last a legend of every marker and term.

Figures are drawn on ``matplotlib.figure.Figure`` with an explicit Agg canvas (pyplot and the
global backend are never touched) and embedded as base64 PNG; thumbnails are embedded as
base64 JPEG (masks as PNG), so the report is a single file with no external assets.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from gaussian_ad.scoring.overlays import SCALE_SDS, map_range, overlay
from gaussian_ad.stats.fusion import Standardizer
from gaussian_ad.stats.metrics import Confusion, confusion
from gaussian_ad.stats.thresholds import observed_rate

if TYPE_CHECKING:  # the report itself needs no torch
    from gaussian_ad.evaluation.evaluate import Evaluation, ThresholdReport
    from gaussian_ad.stats.calibration import Calibration

FIGURE_DPI = 100
N_WORST = 8  # most anomalous test images shown
N_ERRORS = 24  # false positives (and false negatives) shown at most
MAP_COLORMAP = "jet"  # the colormap of gaussian_ad.scoring.overlays.overlay, for the colour bar
THRESHOLD_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
DECISION_COLOR = "#d62728"

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.35em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin: 1.4em 0 .4em; }
h3 { font-size: 1em; margin: 1em 0 .3em; }
section { border-top: 1px solid #ddd; } #verdict { border-top: none; }
.meta { margin: .2em 0 .6em; color: #444; }
.badge { display: inline-block; padding: 0 .5em; border-radius: 3px; font-weight: 600;
         color: #fff; background: #777; } .badge.champion { background: #2ca02c; }
.badge.challenger { background: #d62728; }
.tiles { display: flex; flex-wrap: wrap; gap: .8em; margin: .4em 0; }
.tile { border: 1px solid #ccc; border-radius: 4px; padding: .3em .8em; min-width: 8em; }
.tile .value { font-size: 1.6em; font-weight: 600; font-variant-numeric: tabular-nums; }
.tile .name { color: #555; font-size: 12px; }
.decision { font-size: 1.05em; margin: .5em 0; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
table { border-collapse: collapse; } caption { text-align: left; font-weight: 600; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } #chi2 td { white-space: nowrap; }
#confusion td.num { font-size: 1.2em; font-weight: 600; min-width: 4em; }
#confusion td.bad { background: #fdecea; } #confusion td.good { background: #eaf6ea; }
.note { color: #555; font-size: 12px; margin: .2em 0; }
.config { color: #555; margin: 0 0 .3em; font-size: 13px; }
.jump { margin: .4em 0; } .jump a { color: #1f5fa8; }
.breakdown { margin-top: .3em; color: #333; } .breakdown details { color: #555; }
.why { display: block; color: #8a3b00; }
figure { margin: 0; }
.item { display: flex; gap: 4px; align-items: flex-start; border: 1px solid #ddd;
        padding: 4px; }
.item figcaption { font-size: 12px; width: 9em; overflow-wrap: anywhere; }
.cell { max-width: %(thumb)dpx; text-align: center; font-size: 11px; color: #555; }
.cell img { display: block; max-width: %(thumb)dpx; }
.placeholder { width: %(thumb)dpx; height: %(thumb)dpx; box-sizing: border-box;
               border: 2px dashed #b00; color: #b00; font-size: 12px; padding: 6px;
               overflow: hidden; word-break: break-all; background: #fff5f5; }
.blank { width: %(thumb)dpx; height: %(thumb)dpx; box-sizing: border-box; border: 1px solid #ccc;
         color: #777; font-size: 12px; display: flex; align-items: center;
         justify-content: center; background: #000; }
"""


@dataclass
class LevelRule:
    """One chi-square threshold rule per level, against its observed rates."""

    name: str  # e.g. "sigma3", "fpr0.01"
    predicted_fpr: float
    thresholds: list[float]  # per level
    observed_fpr: list[float]  # per level, on held-out normals
    tpr: list[float]  # per level, on the anomalous test images


@dataclass
class ReportData:
    """Everything a report shows; arrays are aligned with the n test images.

    ``threshold`` is the decision threshold of the chosen score (``score_kind``): an image
    is flagged anomalous when its score is strictly above it. ``thresholds`` are further
    thresholds marked on the figures for reference. ``maps`` are anomaly maps by path (at
    least those of the gallery's images), ``mask_paths`` the ground-truth masks (None for
    normal images), ``pro_curve`` the (FPR, PRO) curve of the test maps. ``map_scale`` is
    the model's fixed colour scale of its maps (as the scoring overlays'); None: the range
    of the maps shown. ``configuration`` is the technical configuration shown under the
    title (:meth:`DetectorConfig.describe`); ``first_version``: promoted because there was
    no champion to compare with. ``image_scores`` and ``patch_scores`` (the anomaly maps'
    maxima) are the scores the chosen one is made of, and ``standardizer`` how the fused
    score adds them; the gallery shows each image's breakdown.
    """

    title: str
    labels: np.ndarray
    scores: np.ndarray
    level_scores: np.ndarray
    levels: list[int]
    paths: list[str]
    defects: list[str]
    thresholds: dict[str, float]
    auroc: float
    auroc_levels: list[float]
    heldout_scores: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    maps: dict[str, np.ndarray] | None = None
    threshold: float | None = None
    score_kind: str = "image"
    target_fpr: float | None = None
    category: str | None = None
    model_version: str | None = None
    promoted: bool | None = None
    promotion: str | None = None
    pixel_auroc: float | None = None
    pro: float | None = None
    pro_curve: tuple[np.ndarray, np.ndarray] | None = None
    mask_paths: list[str | None] | None = None
    level_rules: list[LevelRule] = field(default_factory=list)
    map_scale: tuple[float, float] | None = None
    configuration: str | None = None
    first_version: bool = False
    image_scores: np.ndarray | None = None
    patch_scores: np.ndarray | None = None
    standardizer: Standardizer | None = None


def render_report(
    data: ReportData, n_worst: int = N_WORST, thumb_size: int = 128, n_errors: int = N_ERRORS
) -> str:
    """The report as one HTML document; the gallery shows at most ``n_errors`` false
    positives and as many false negatives, and the ``n_worst`` highest-scoring images."""
    labels, scores = _validated(data)
    heldout = None if data.heldout_scores is None else np.asarray(data.heldout_scores, float)
    title = html.escape(data.title)
    figures = [_roc_figure(labels, scores, data.auroc, data.threshold, data.thresholds)]
    if data.pro_curve is not None:
        figures.append(_pro_figure(*data.pro_curve, data.pro))
    figures.append(_histogram_figure(labels, scores, heldout, data.threshold, data.thresholds))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{CSS % {'thumb': thumb_size}}</style></head><body>",
        f'<section id="verdict"><h1>{title}</h1>',
        _configuration(data.configuration),
        _verdict(data, labels, scores, heldout),
        "</section>",
        '<section id="curves"><h2>Curves and score distributions</h2>',
        '<div class="row">',
        *(_img_tag("image/png", png, alt, "figure") for png, alt in figures),
        "</div>",
        _defect_table(labels, scores, data.defects, data.threshold),
        "</section>",
        '<section id="gallery"><h2>Images at the threshold</h2>',
        _gallery(data, labels, scores, n_worst, n_errors, thumb_size),
        "</section>",
        '<section id="details"><h2>Details</h2>',
        '<div class="row">',
        _img_tag(
            "image/png", *_levels_figure(data.levels, data.auroc_levels, data.auroc), "figure"
        ),
        "</div>",
        _level_rules_table(data.levels, data.level_rules),
        '<div class="row">',
        _key_value_table("Parameters", data.params, "params"),
        _key_value_table("Metrics", data.metrics, "metrics", explain_metric),
        "</div>",
        "</section>",
        '<section id="legend"><h2>Legend: markers and terms</h2>',
        _legend(data),
        "</section>",
        "</body></html>",
    ]
    return "\n".join(parts)


def report_data(
    title: str,
    evaluation: Evaluation,
    paths: Sequence[str],
    defects: Sequence[str],
    params: dict[str, Any],
    *,
    masks: Sequence[str | None] | None = None,
    calibration: Calibration | None = None,
    category: str | None = None,
    model_version: str | None = None,
    promoted: bool | None = None,
    promotion: str | None = None,
    configuration: str | None = None,
    first_version: bool = False,
) -> ReportData:
    """What the report of an evaluation shows; ``paths``/``defects``/``masks`` (ground-truth
    mask paths, None for normal images) align with its test rows.

    ``calibration`` (the detector's ``calibration_``) gives the target FPR of the threshold
    and, with a patch model, the maps' fixed colour scale;
    ``model_version``, ``promoted`` and ``promotion`` (the reason) the registry's verdict,
    ``first_version`` that it was promoted for want of a champion, ``configuration`` the
    technical line under the title.
    The anomaly maps of the images in the default gallery (``N_ERRORS`` false positives and
    false negatives, ``N_WORST`` highest scores) go with it, and with masks the PRO curve.
    """
    test = evaluation.test
    scores = np.asarray(test.scores)
    labels = np.asarray(evaluation.labels)
    if evaluation.kind == "image":
        thresholds = {
            k: v for k, v in evaluation.thresholds.thresholds.items() if k.startswith("empirical")
        }
    else:
        thresholds = {}
    levels = list(params.get("levels", range(1, test.level_scores.shape[1] + 1)))
    rules, rule_metrics = _level_rules(evaluation.thresholds, levels)
    maps, curve, scale = None, None, None
    if test.maps is not None:
        if calibration is not None and calibration.standardizer is not None:
            scale = map_range(test.maps[0], calibration.standardizer)[:2]
        groups = _gallery_rows(labels, scores, evaluation.threshold).values()
        shown = np.unique(np.concatenate([rows for rows, _ in groups]))
        maps = {paths[i]: test.maps[i] for i in shown}
        curve = evaluation.pro_points
    metrics = {**evaluation.summary_metrics(), **evaluation.thresholds.metrics}
    return ReportData(
        title=title,
        labels=labels,
        scores=scores,
        level_scores=test.level_scores,
        levels=levels,
        paths=list(paths),
        defects=list(defects),
        thresholds=thresholds,
        auroc=evaluation.auroc,
        auroc_levels=evaluation.auroc_levels,
        heldout_scores=evaluation.heldout.scores,
        params=params,
        metrics={k: v for k, v in metrics.items() if k not in rule_metrics},
        maps=maps,
        threshold=evaluation.threshold,
        score_kind=evaluation.kind,
        target_fpr=None if calibration is None else calibration.target_fpr,
        category=category,
        model_version=model_version,
        promoted=promoted,
        promotion=promotion,
        pixel_auroc=evaluation.pixel_auroc,
        pro=evaluation.pro,
        pro_curve=curve,
        mask_paths=None if masks is None else list(masks),
        level_rules=rules,
        map_scale=scale,
        configuration=configuration,
        first_version=first_version,
        image_scores=np.asarray(test.image_scores),
        patch_scores=test.patch_scores,
        standardizer=None if calibration is None else calibration.standardizer,
    )


def write_report(data: ReportData, path: str | Path, **kwargs: Any) -> Path:
    """Render the report and write it atomically (temporary file + rename); returns ``path``."""
    path = Path(path)
    text = render_report(data, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _validated(data: ReportData) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) as arrays, after checking that all fields line up."""
    labels = np.asarray(data.labels).ravel()
    scores = np.asarray(data.scores, dtype=np.float64).ravel()
    n = labels.size
    level_scores = np.asarray(data.level_scores)
    if not np.isin(labels, [0, 1]).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if scores.size != n or len(data.paths) != n or len(data.defects) != n:
        raise ValueError(
            f"labels, scores, paths and defects must have one entry per image: got {n}, "
            f"{scores.size}, {len(data.paths)}, {len(data.defects)}"
        )
    if data.mask_paths is not None and len(data.mask_paths) != n:
        raise ValueError(f"mask_paths must have one entry per image: got {len(data.mask_paths)}")
    if level_scores.shape != (n, len(data.levels)) or len(data.auroc_levels) != len(data.levels):
        raise ValueError(
            f"level_scores {level_scores.shape} and auroc_levels ({len(data.auroc_levels)}) "
            f"must match {n} images x {len(data.levels)} levels"
        )
    for map_path, anomaly_map in (data.maps or {}).items():
        if np.ndim(anomaly_map) != 2:
            raise ValueError(f"anomaly map of {map_path!r} must be 2-D (H, W)")
    return labels.astype(int), scores


def _level_rules(report: ThresholdReport, levels: list[int]) -> tuple[list[LevelRule], set[str]]:
    """The chi-square rules of a threshold report, and the metric names they take over."""
    metrics = report.metrics
    rules, used = [], set()
    for key, per_level in report.thresholds.items():
        if not key.startswith("chi2_"):
            continue
        names = {
            "predicted": f"{key}_predicted_fpr",
            "observed": [f"{key}_l{level}_observed_fpr" for level in levels],
            "tpr": [f"{key}_l{level}_tpr" for level in levels],
        }
        used |= {names["predicted"], *names["observed"], *names["tpr"]}
        rules.append(
            LevelRule(
                name=key.removeprefix("chi2_"),
                predicted_fpr=metrics[names["predicted"]],
                thresholds=list(per_level),
                observed_fpr=[metrics[name] for name in names["observed"]],
                tpr=[metrics[name] for name in names["tpr"]],
            )
        )
    return rules, used


def _gallery_rows(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float | None,
    n_worst: int = N_WORST,
    n_errors: int = N_ERRORS,
) -> dict[str, tuple[np.ndarray, int]]:
    """Test rows of each gallery group and the group's full size: false positives (highest
    score first), false negatives (lowest first), at most ``n_errors`` each, and the
    ``n_worst`` highest scores."""
    groups: dict[str, tuple[np.ndarray, int]] = {}
    if threshold is not None:
        flagged = scores > threshold
        for group, rows, sign in (
            ("false-positives", np.flatnonzero(flagged & (labels == 0)), -1.0),
            ("false-negatives", np.flatnonzero(~flagged & (labels == 1)), 1.0),
        ):
            order = np.argsort(sign * scores[rows], kind="stable")
            groups[group] = rows[order][:n_errors], rows.size
    worst = np.argsort(-scores, kind="stable")[:n_worst]
    groups["most-anomalous"] = worst, worst.size
    return groups


def _percent(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{100 * value:.1f}%"


SCORE_WORDS = {
    "image": "image score (the per-level distances of the whole image's pooled features)",
    "patch": "patch score (the highest point of the anomaly map)",
    "fused": (
        "fused score (the image score's and the patch score's z-scores on good images, added)"
    ),
}


def _configuration(configuration: str | None) -> str:
    if configuration is None:
        return ""
    return f'<p class="config">Technical configuration: {html.escape(configuration)}</p>'


def maps_note(score_kind: str) -> str:
    """Which score the anomaly maps show and which one decides, in words."""
    shown = "The maps show the patch score: how unusual each spot is, red beyond good parts'"
    if score_kind == "patch":
        return f"{shown}. The patch score (the map's hottest spot) decides."
    if score_kind == "fused":
        return (
            f"{shown}. The decision uses the fused score, the image score plus the patch "
            "score: a flagged part whose map stays blue was flagged by its image score, and "
            "a red spot on a passed part was outweighed by a normal image score (each "
            "gallery image lists both)."
        )
    return (
        f"{shown}. The decision uses the image score, which the maps do not show: a passed "
        "part may glow red and a flagged one stay blue (each gallery image lists both)."
    )


def _verdict(
    data: ReportData, labels: np.ndarray, scores: np.ndarray, heldout: np.ndarray | None
) -> str:
    """The first screen: who, champion or not and why, the headline metrics, the decision
    rule with its recall, miss rate and false-alarm rate, what the maps show, links to the
    gallery and the legend, the confusion matrix and the held-out normals' FPR."""
    meta = []
    if data.category is not None:
        meta.append(f"category <b>{html.escape(data.category)}</b>")
    if data.model_version is not None:
        meta.append(f"model version <b>{html.escape(str(data.model_version))}</b>")
    if data.promoted is not None:
        badge = ("champion", "champion") if data.promoted else ("challenger", "not promoted")
        meta.append(f'<span class="badge {badge[0]}">{badge[1]}</span>')
    elif data.promotion is None:
        meta.append("champion: not decided")
    if data.first_version and data.promoted:
        meta.append(
            "the first version of this model: champion because there was no champion yet "
            "to compare it with"
        )
    elif data.promotion is not None:
        meta.append(html.escape(data.promotion))
    kind = html.escape(data.score_kind)
    tiles = [(f"image AUROC ({kind} score)", f"{data.auroc:.3f}")]
    if data.pixel_auroc is not None:
        tiles.append(("pixel AUROC", f"{data.pixel_auroc:.3f}"))
    if data.pro is not None:
        tiles.append(("PRO (AU-PRO, FPR &le; 0.3)", f"{data.pro:.3f}"))
    counts = None if data.threshold is None else confusion(labels, scores, data.threshold)
    if counts is not None:
        tiles += [
            ("recall: defective parts caught", _percent(counts.recall)),
            ("miss rate: defective parts passed", _percent(1.0 - counts.recall)),
            ("false-alarm rate: good parts flagged", _percent(counts.fpr)),
        ]
    parts = [
        f'<p class="meta">{" &middot; ".join(meta)}</p>',
        '<div class="tiles">',
        *(
            f'<div class="tile"><div class="value">{value}</div>'
            f'<div class="name">{name}</div></div>'
            for name, value in tiles
        ),
        "</div>",
    ]
    if counts is None:
        parts.append('<p class="decision">No decision threshold: the model is not calibrated.</p>')
        parts.append(_jump_links(data, labels, scores))
        return "\n".join(parts)
    n_anomalous, n_normal = counts.tp + counts.fn, counts.fp + counts.tn
    parts += [
        f'<p class="decision">Decision rule: a part is flagged defective when its '
        f"{SCORE_WORDS.get(data.score_kind, kind + ' score')} is above "
        f'<b id="threshold">{data.threshold:.6g}</b>. On the {labels.size} test images it '
        f"catches <b>{counts.tp} of {n_anomalous}</b> defective parts "
        f"(recall {_percent(counts.recall)}), misses <b>{counts.fn}</b> of them "
        f'(miss rate <span id="miss-rate">{_percent(1.0 - counts.recall)}</span>: defective '
        f"parts passed as good) and flags <b>{counts.fp} of {n_normal}</b> good parts "
        f'(false-alarm rate <span id="false-alarm-rate">{_percent(counts.fpr)}</span>, '
        "FPR).</p>",
    ]
    if data.maps:
        parts.append(f'<p class="decision" id="maps-note">{html.escape(maps_note(kind))}</p>')
    parts += [_jump_links(data, labels, scores), _confusion_table(counts, data.threshold)]
    if heldout is not None and heldout.size:
        n_over = int(np.sum(heldout > data.threshold))
        target = "" if data.target_fpr is None else f" for a target FPR of {data.target_fpr:g}"
        text = (
            f"Calibration: the threshold was set{target} on {heldout.size} held-out "
            f"(out-of-fold) normal training images; at it they have an FPR of "
            f"<b>{_percent(n_over / heldout.size)}</b> ({n_over} of {heldout.size})."
        )
        if data.target_fpr is not None and data.target_fpr < 1.0 / heldout.size:
            text += (
                f' <span id="reachable">The target {_percent(data.target_fpr)} is below '
                f"1/{heldout.size} = {_percent(1.0 / heldout.size)}, the smallest false-alarm "
                f"rate {heldout.size} good images can show: the threshold sits near their "
                "highest score, and only more good training images can confirm a rate that "
                "low.</span>"
            )
        parts.append(f'<p class="decision" id="heldout">{text}</p>')
    return "\n".join(parts)


def _jump_links(data: ReportData, labels: np.ndarray, scores: np.ndarray) -> str:
    """Links from the first screen to the gallery's groups, the colour bar and the legend."""
    groups = _gallery_rows(labels, scores, data.threshold)
    names = {
        "false-positives": "false alarms",
        "false-negatives": "missed defects",
        "most-anomalous": "most anomalous",
    }
    links = [
        f'<a href="#{group}">{names[group]} ({total})</a>' for group, (_, total) in groups.items()
    ]
    if data.maps:
        links.append('<a href="#colorbar">colour bar of the maps</a>')
    links.append('<a href="#legend">legend of markers and terms</a>')
    return f'<nav class="jump" id="jump">Go to: {" &middot; ".join(links)}</nav>'


def _confusion_table(counts: Confusion, threshold: float) -> str:
    def cell(name: str, value: int, good: bool) -> str:
        kind = "good" if good else ("bad" if value else "")
        return f'<td class="num {kind}" data-cell="{name}">{value}</td>'

    return (
        f'<table id="confusion"><caption>Test set at threshold {threshold:.6g}</caption>'
        "<tr><th></th><th>flagged defective</th><th>passed as good</th><th></th></tr>"
        f"<tr><th>defective ({counts.tp + counts.fn})</th>{cell('tp', counts.tp, True)}"
        f"{cell('fn', counts.fn, False)}<td>recall on defects {_percent(counts.recall)}</td></tr>"
        f"<tr><th>good ({counts.fp + counts.tn})</th>{cell('fp', counts.fp, False)}"
        f"{cell('tn', counts.tn, True)}<td>FPR on good parts {_percent(counts.fpr)}</td></tr>"
        "</table>"
    )


def _mpl_text(text: str) -> str:
    """Text for matplotlib, with ``$`` escaped so names are never parsed as mathtext."""
    return text.replace("$", r"\$")


def _reference_thresholds(
    threshold: float | None, thresholds: dict[str, float]
) -> list[tuple[str, float, str]]:
    """(name, value, colour) of each reference threshold that is not the decision threshold,
    colours consistent across figures."""
    others = [
        (name, value)
        for name, value in thresholds.items()
        if threshold is None or not np.isclose(value, threshold)
    ]
    return [
        (name, value, color)
        for (name, value), color in zip(others, cycle(THRESHOLD_COLORS), strict=False)
    ]


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _roc_figure(
    labels: np.ndarray,
    scores: np.ndarray,
    auroc: float,
    threshold: float | None,
    thresholds: dict[str, float],
) -> tuple[bytes, str]:
    """ROC curve of the chosen score, with the decision threshold's operating point marked."""
    figure = _new_figure(3.5, 3.4)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":", linewidth=1)
    if np.unique(labels).size == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="#1f77b4", linewidth=2, label=f"AUROC {auroc:.3f}")
        points = _reference_thresholds(threshold, thresholds)
        if threshold is not None:
            points.insert(0, (f"threshold {threshold:.4g}", threshold, DECISION_COLOR))
        for name, value, color in points:
            fpr_at = observed_rate(scores[labels == 0], value)
            tpr_at = observed_rate(scores[labels == 1], value)
            ax.plot(fpr_at, tpr_at, "o", color=color, markersize=7, label=_mpl_text(name))
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "needs normal and anomalous images", ha="center", fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.set_title("ROC, test images", fontsize=11)
    return _png(figure), "ROC curve of the chosen score"


def _pro_figure(fpr: np.ndarray, pro: np.ndarray, pro_auc: float | None) -> tuple[bytes, str]:
    """The per-region-overlap curve, with the FPR <= 0.3 range of AU-PRO shaded."""
    figure = _new_figure(3.5, 3.4)
    ax = figure.add_subplot()
    ax.plot(fpr, pro, color="#1f77b4", linewidth=2)
    inside = fpr <= 0.3
    ax.fill_between(fpr[inside], pro[inside], color="#1f77b4", alpha=0.15)
    ax.axvline(0.3, color="#777", linestyle=":", linewidth=1)
    label = "" if pro_auc is None else f" (AU-PRO {pro_auc:.3f})"
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="pixel false-positive rate", ylabel="PRO")
    ax.set_title(f"Per-region overlap{label}", fontsize=11)
    return _png(figure), "PRO curve of the anomaly maps"


def _histogram_figure(
    labels: np.ndarray,
    scores: np.ndarray,
    heldout: np.ndarray | None,
    threshold: float | None,
    thresholds: dict[str, float],
) -> tuple[bytes, str]:
    """Score histograms of good / defective test images (and held-out normals), thresholds.

    Bars are fractions of each group, so groups of different sizes compare; heavy-tailed
    positive scores (max > 5 x median) get log-spaced bins on a log axis.
    """
    groups = [
        ("good (test)", scores[labels == 0], "#2ca02c"),
        ("defective (test)", scores[labels == 1], "#ff7f0e"),
    ]
    if heldout is not None:
        groups.append(("good (held-out train)", heldout, "#7f7f7f"))
    groups = [(name, values[np.isfinite(values)], color) for name, values, color in groups]
    all_scores = np.concatenate([values for _, values, _ in groups])
    n_bins = int(np.clip(all_scores.size // 15, 10, 50))
    log_x = _heavy_tailed(all_scores)
    if log_x:
        bins = np.geomspace(all_scores.min(), all_scores.max(), n_bins + 1)
    else:
        bins = np.histogram_bin_edges(all_scores, bins=n_bins)
    figure = _new_figure(4.9, 3.8)
    ax = figure.add_subplot()
    for name, values, color in groups:
        if values.size:
            weights = np.full(values.size, 1.0 / values.size)
            style = {"histtype": "stepfilled", "alpha": 0.4, "color": color}
            ax.hist(values, bins, weights=weights, label=f"{name} (n={values.size})", **style)
    if threshold is not None:
        ax.axvline(
            threshold, color=DECISION_COLOR, linewidth=2.5, label=f"threshold = {threshold:.4g}"
        )
    for name, value, color in _reference_thresholds(threshold, thresholds):
        label = _mpl_text(f"{name} = {value:.4g}")
        ax.axvline(value, color=color, linestyle="--", linewidth=1.2, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel="score" + (" (log scale)" if log_x else ""), ylabel="fraction of group")
    ax.set_title("Score distributions", fontsize=11)
    figure.legend(loc="outside lower center", ncols=2, fontsize=7)
    return _png(figure), "Histograms of the score, good against defective, with the threshold"


def _heavy_tailed(values: np.ndarray) -> bool:
    """Positive values whose maximum exceeds 5 x their median: clearer on a log axis."""
    return values.size > 0 and values.min() > 0 and values.max() > 5 * np.median(values)


def _levels_figure(levels: list[int], auroc_levels: list[float], auroc: float) -> tuple[bytes, str]:
    """Bar chart of per-level AUROC, with the chosen score's AUROC as a reference line."""
    figure = _new_figure(max(3.5, 1.2 + 0.45 * len(levels)), 3.8)
    ax = figure.add_subplot()
    positions = np.arange(len(levels))
    bars = ax.bar(positions, auroc_levels, color="#1f77b4", width=0.7)
    ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.axhline(auroc, color="#d62728", linestyle="--", linewidth=1.5, label=f"chosen {auroc:.3f}")
    finite = [v for v in [*auroc_levels, auroc] if np.isfinite(v)]
    ax.set_ylim(min([0.5, *finite]) - 0.02, 1.06)
    ax.set_xticks(positions, [str(level) for level in levels])
    ax.set(xlabel="level", ylabel="AUROC")
    ax.set_title("AUROC per level", fontsize=11)
    ax.legend(loc="upper left", fontsize=8)
    return _png(figure), "AUROC per level"


def _colorbar_figure(value_range: tuple[float, float]) -> tuple[bytes, str]:
    """A horizontal colour bar of the gallery's anomaly-map scale."""
    low, high = value_range
    figure = _new_figure(5.0, 0.85)
    ax = figure.add_subplot()
    scale = ScalarMappable(Normalize(low, max(high, low + 1e-12)), colormaps[MAP_COLORMAP])
    bar = figure.colorbar(scale, cax=ax, orientation="horizontal")
    bar.set_label(f"anomaly-map value, {low:.4g} to {high:.4g}", fontsize=9)
    ax.tick_params(labelsize=8)
    return _png(figure), "colour bar of the anomaly maps"


def _img_tag(mime: str, payload: bytes, alt: str, css_class: str) -> str:
    encoded = base64.b64encode(payload).decode("ascii")
    return f'<img class="{css_class}" src="data:{mime};base64,{encoded}" alt="{html.escape(alt)}">'


def _key_value_table(
    caption: str,
    rows: dict[str, Any],
    table_id: str,
    explain: Callable[[str], str] | None = None,
) -> str:
    """A two-column table, or three with ``explain``'s meaning of each key."""
    if not rows:
        return ""
    body = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_format_value(value))}</td>"
        + (f"<td>{html.escape(explain(str(key)))}</td>" if explain else "")
        + "</tr>"
        for key, value in rows.items()
    )
    return f'<table id="{table_id}"><caption>{html.escape(caption)}</caption>{body}</table>'


METRIC_MEANINGS = [
    (
        r"auroc",
        "AUROC of the deciding score on the test images: the chance that a defective part "
        "scores above a good one (1 perfect, 0.5 chance)",
    ),
    (r"auroc_(\w+)", "AUROC of the {0} score on the test images"),
    (r"champion_auroc", "AUROC of the champion on the same test images"),
    (r"threshold", "decision threshold: a part scoring above it is flagged defective"),
    (r"pixel_auroc", "AUROC of the anomaly maps' pixels against the defect masks"),
    (
        r"pro",
        "AU-PRO: how much of each defect region the maps cover, averaged up to a pixel "
        "false-positive rate of 0.3 (1 perfect)",
    ),
    (r"test_fpr", "false-alarm rate: share of good test images flagged"),
    (r"test_recall", "recall: share of defective test images flagged"),
    (r"heldout_fpr", "share of held-out good training images above the threshold"),
    (r"n_train", "good images the model was fitted on"),
    (
        r"empirical_fpr([\d.e+-]+)",
        "reference threshold: the image score that a share {0} of held-out good images exceed",
    ),
    (
        r"empirical_fpr([\d.e+-]+)_test_normal_fpr",
        "share of good test images above the empirical_fpr{0} threshold (its false-alarm rate)",
    ),
    (
        r"empirical_fpr([\d.e+-]+)_tpr",
        "share of defective test images above the empirical_fpr{0} threshold (its recall)",
    ),
]


def explain_metric(key: str) -> str:
    """A metric key in words (empty for a key the report does not know)."""
    for pattern, meaning in METRIC_MEANINGS:
        if match := re.fullmatch(pattern, key):
            return meaning.format(*match.groups())
    return ""


def _legend(data: ReportData) -> str:
    """What every marker of the figures and every term of the page means."""
    markers = [
        (
            "threshold (solid red line, red dot)",
            "the decision threshold and, on the ROC curve, the test set's operating point at it",
        ),
        (
            "dashed lines, coloured dots",
            "reference thresholds, not used to decide: "
            "empirical_fprX is the image score that a share X of held-out good images exceed "
            "(empirical_fpr0.001: 0.1% of them)",
        ),
        ("grey histogram", "held-out (out-of-fold) good training images, which set the threshold"),
        (
            "recall",
            "share of defective parts flagged; miss rate = 1 - recall, the share passed as good",
        ),
        ("false-alarm rate (FPR)", "share of good parts flagged defective"),
        (
            "image score",
            "distance of the image's pooled features from the good images', per "
            "level, added up (L1 .. L9: the backbone's levels, L1 the earliest)",
        ),
        ("patch score", "the anomaly map's peak: the most unusual spot of the image"),
        (
            "fused score",
            "the image score's and the patch score's z-scores on good images, "
            "added: image part + patch part",
        ),
        (
            "colour scale of the maps",
            "blue: no hotter than a typical good image's hottest "
            "spot; red: beyond what good images reach",
        ),
        (
            "chi-square rules (sigmaN, fprX)",
            "per-level thresholds from the Gaussian model's "
            "theory, with the rate they predict and the rates observed",
        ),
    ]
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in markers
    )
    explained = {k: explain_metric(k) for k in data.metrics if explain_metric(k)}
    rows += "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in explained.items()
    )
    return f'<table id="terms">{rows}</table>'


def _format_value(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return str(value)


def _level_rules_table(levels: list[int], rules: list[LevelRule]) -> str:
    """Per level (rows) and chi-square rule (columns): threshold, observed FPR, TPR."""
    if not rules:
        return ""
    header = "".join(
        f"<th>{html.escape(rule.name)}<br>predicted FPR {rule.predicted_fpr:.3g}</th>"
        for rule in rules
    )
    rows = []
    for column, level in enumerate(levels):
        cells = "".join(
            f"<td class='num'>t {rule.thresholds[column]:.4g}<br>"
            f"FPR {rule.observed_fpr[column]:.3f} &middot; TPR {rule.tpr[column]:.3f}</td>"
            for rule in rules
        )
        rows.append(f"<tr><th>level {level}</th>{cells}</tr>")
    return (
        '<table id="chi2"><caption>Per-level chi-square thresholds t = sqrt(chi2.ppf(1 - a, k)):'
        " observed FPR on held-out normals, TPR on defective test images</caption>"
        f"<tr><th></th>{header}</tr>{''.join(rows)}</table>"
    )


def _defect_table(
    labels: np.ndarray, scores: np.ndarray, defects: list[str], threshold: float | None
) -> str:
    """Per defect type: count, recall at the threshold and AUROC against the good images;
    the good images' row gives their false-positive count and rate."""
    defects_array = np.asarray(defects, dtype=object)
    normal_scores = scores[labels == 0]

    def flagged(values: np.ndarray) -> str:
        if threshold is None:
            return "<td class='num'>n/a</td><td class='num'>n/a</td>"
        count = int(np.sum(values > threshold))
        rate = count / values.size if values.size else float("nan")
        return f"<td class='num'>{count}</td><td class='num'>{_percent(rate)}</td>"

    rows = [f"<tr><td>good</td><td class='num'>{normal_scores.size}</td>{flagged(normal_scores)}"]
    rows[0] += "<td class='num'>&mdash;</td></tr>"
    for defect in sorted(set(defects_array[labels == 1])):
        defect_scores = scores[(labels == 1) & (defects_array == defect)]
        auroc = _auroc_vs_normal(normal_scores, defect_scores)
        rows.append(
            f"<tr><td>{html.escape(str(defect))}</td><td class='num'>{defect_scores.size}</td>"
            f"{flagged(defect_scores)}"
            f"<td class='num'>{'n/a' if np.isnan(auroc) else f'{auroc:.3f}'}</td></tr>"
        )
    header = (
        "<tr><th>type</th><th>n</th><th>flagged</th><th>rate (recall; FPR for good)</th>"
        "<th>AUROC vs good</th></tr>"
    )
    caption = "Per defect type" + ("" if threshold is None else f" at threshold {threshold:.6g}")
    return f'<table id="defects"><caption>{caption}</caption>{header}{"".join(rows)}</table>'


def _auroc_vs_normal(normal_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    if normal_scores.size == 0 or defect_scores.size == 0:
        return float("nan")
    labels = np.r_[np.zeros(normal_scores.size), np.ones(defect_scores.size)]
    return float(roc_auc_score(labels, np.r_[normal_scores, defect_scores]))


GALLERY_TITLES = {
    "false-positives": "False positives: good parts flagged defective",
    "false-negatives": "False negatives: defective parts passed as good",
    "most-anomalous": "Most anomalous test images",
}


def _gallery(
    data: ReportData,
    labels: np.ndarray,
    scores: np.ndarray,
    n_worst: int,
    n_errors: int,
    thumb_size: int,
) -> str:
    """The gallery's groups, each image as image | ground truth | overlay, and the colour
    bar of the maps' shared scale."""
    groups = _gallery_rows(labels, scores, data.threshold, n_worst, n_errors)
    maps = data.maps or {}
    shown = {data.paths[i] for rows, _ in groups.values() for i in rows}
    value_range = data.map_scale or _map_range({p: maps[p] for p in shown if p in maps})
    with_masks = data.mask_paths is not None and any(data.mask_paths)
    parts = []
    if maps:
        parts.append(f'<p class="note">{html.escape(maps_note(data.score_kind))}</p>')
        colorbar = _img_tag("image/png", *_colorbar_figure(value_range), "colorbar")
        parts.append(f'<p id="colorbar">{colorbar}</p>')
        columns = "image | ground-truth mask | overlay" if with_masks else "image | overlay"
        scale = (
            f"the model's: blue at the held-out normals' mean map maximum, red {SCALE_SDS:g}"
            " standard deviations above it, values outside clipped"
            if data.map_scale
            else "the range of the maps shown"
        )
        parts.append(
            f'<p class="note">Each row: {columns}. One colour scale for all maps, {scale}: '
            f"anomaly-map value {value_range[0]:.4g} (blue) to {value_range[1]:.4g} (red).</p>"
        )
    else:
        parts.append('<p class="note">No anomaly maps: the model scores whole images only.</p>')
    if data.threshold is None:
        parts.append('<p class="note">No threshold: no false positives or negatives.</p>')
    for group, (rows, total) in groups.items():
        shown_note = f" (showing {rows.size} of {total})" if rows.size < total else ""
        items = "".join(
            _gallery_item(data, scores, index, rank, maps, value_range, with_masks, thumb_size)
            for rank, index in enumerate(rows, start=1)
        )
        parts.append(
            f'<div id="{group}"><h3>{GALLERY_TITLES[group]}: {total}{shown_note}</h3>'
            f'<div class="row">{items or "<p class=note>none</p>"}</div></div>'
        )
    return "\n".join(parts)


def _gallery_item(
    data: ReportData,
    scores: np.ndarray,
    index: int,
    rank: int,
    maps: dict[str, np.ndarray],
    value_range: tuple[float, float],
    with_masks: bool,
    thumb_size: int,
) -> str:
    path = data.paths[index]
    cells = []
    try:
        image = _thumbnail(path, thumb_size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = f"{type(error).__name__}: {error}"
        cells.append(f'<div class="placeholder">image unavailable<br>{html.escape(reason)}</div>')
    else:
        cells.append(_cell(_img_tag("image/jpeg", _jpeg(image), f"test image {index}", "thumb")))
        mask_path = data.mask_paths[index] if data.mask_paths is not None else None
        if with_masks:
            cells.append(_cell(_mask_cell(mask_path, image.size)))
        if path in maps:
            overlaid = overlay(image, maps[path], value_range)
            cells.append(
                _cell(_img_tag("image/jpeg", _jpeg(overlaid), f"overlay {index}", "overlay"))
            )
        elif maps:
            cells.append(_cell('<div class="blank">map not kept</div>'))
    name = Path(path).name if path else "(unknown path)"
    decision = ""
    if data.threshold is not None:
        decision = " &middot; flagged" if scores[index] > data.threshold else " &middot; passed"
    caption = (
        f"#{rank}{decision}<br>{html.escape(str(data.defects[index]))}<br>"
        f"{html.escape(name)}{_breakdown(data, scores, index, maps.get(path), value_range)}"
    )
    return (
        f'<figure class="item" data-index="{index}" title="{html.escape(path)}">'
        f"{''.join(cells)}<figcaption>{caption}</figcaption></figure>"
    )


def _breakdown(
    data: ReportData,
    scores: np.ndarray,
    index: int,
    anomaly_map: np.ndarray | None,
    value_range: tuple[float, float],
) -> str:
    """An image's scores: the deciding one against the threshold, the image and patch
    scores it is made of (the fused score's two parts), per level; and which score
    flagged (or passed) it, with what its map looks like."""
    kind, threshold, score = data.score_kind, data.threshold, float(scores[index])
    flagged = threshold is not None and score > threshold
    head = f"{html.escape(kind)} score {score:.4g}"
    if threshold is not None:
        head += f" {'&gt;' if flagged else '&le;'} threshold {threshold:.4g}"
    lines = [f"<b>{head}</b> (decides)"]
    image = None if data.image_scores is None else float(data.image_scores[index])
    patch = None if data.patch_scores is None else float(data.patch_scores[index])
    parts = None
    if kind == "fused" and data.standardizer is not None and None not in (image, patch):
        scale = data.standardizer
        parts = (
            (image - scale.image_mean) / scale.image_std,
            (patch - scale.patch_mean) / scale.patch_std,
        )
        lines.append(f"= image part {parts[0]:.3g} + patch part {parts[1]:.3g}")
    if kind != "image" and image is not None:
        lines.append(f"image score {image:.4g}")
    if kind != "patch" and patch is not None:
        lines.append(f"patch score (map peak) {patch:.4g}")
    levels = " &middot; ".join(
        f"L{level} {value:.3g}"
        for level, value in zip(data.levels, np.asarray(data.level_scores)[index], strict=True)
    )
    lines.append(f"<details><summary>distance per level</summary>{levels}</details>")
    why = _why(kind, flagged, parts, anomaly_map, value_range) if threshold is not None else ""
    why = f'<span class="why">{why}</span>' if why else ""
    return f'<div class="breakdown">{"<br>".join(lines)}{why}</div>'


def _why(
    kind: str,
    flagged: bool,
    parts: tuple[float, float] | None,
    anomaly_map: np.ndarray | None,
    value_range: tuple[float, float],
) -> str:
    """Which score flagged or passed the image, and how that squares with its map."""
    look = ""
    if anomaly_map is not None and np.isfinite(anomaly_map).any():
        low, high = value_range
        peak = (float(np.nanmax(anomaly_map)) - low) / max(high - low, 1e-12)
        if peak < 0.25:
            look = "stays blue"
        elif peak < 0.5:
            look = "stays cool (no spot beyond cyan)"
        else:
            look = "glows red" if peak >= 0.75 else ""
    if kind == "patch":
        return f"{'flagged' if flagged else 'passed'} by its map's hottest spot"
    if kind == "fused" and parts is not None:
        if not flagged:
            return "passed: its two parts add up to no more than the threshold" + (
                f"; its map {look}" if look else ""
            )
        main = "image score" if parts[0] >= parts[1] else "map's hot spot (patch part)"
        return f"flagged mainly by its {main}" + (f"; its map {look}" if look else "")
    if kind == "image":
        verdict = "flagged" if flagged else "passed"
        return f"{verdict} by its image score; the map does not decide" + (
            f" (it {look})" if look else ""
        )
    return ""


def _cell(content: str) -> str:
    return f'<div class="cell">{content}</div>'


def _mask_cell(mask_path: str | None, size: tuple[int, int]) -> str:
    """The ground-truth mask at the thumbnail's size, or why there is none."""
    if mask_path is None:
        return '<div class="blank">no defect mask</div>'
    try:
        with Image.open(mask_path) as mask:
            resized = mask.convert("L").resize(size, Image.Resampling.NEAREST)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = f"{type(error).__name__}: {error}"
        return f'<div class="placeholder">mask unavailable<br>{html.escape(reason)}</div>'
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return _img_tag("image/png", buffer.getvalue(), "ground-truth mask", "mask")


def _map_range(maps: dict[str, np.ndarray]) -> tuple[float, float]:
    """One colour scale shared by all anomaly maps, so overlays compare across images."""
    finite = [np.asarray(m, float)[np.isfinite(m)] for m in maps.values()]
    finite = [values for values in finite if values.size]
    if not finite:
        return 0.0, 1.0
    return min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)


def _thumbnail(path: str, size: int) -> Image.Image:
    """The RGB image downsized to fit size x size."""
    if not path:
        raise ValueError("no path recorded for this image")
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
        image = image.convert("RGB")
    image.thumbnail((size, size))
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
