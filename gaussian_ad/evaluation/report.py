"""Self-contained HTML evaluation report: ROC, score histograms, per-level and per-defect AUROC,
and the most anomalous test images.

Figures are drawn on ``matplotlib.figure.Figure`` with an explicit Agg canvas (pyplot and the
global backend are never touched) and embedded as base64 PNG; thumbnails are embedded as base64
JPEG, so the report is a single file with no external assets.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from gaussian_ad.scoring.overlays import overlay
from gaussian_ad.stats.thresholds import observed_rate

if TYPE_CHECKING:  # the report itself needs no torch
    from gaussian_ad.evaluation.evaluate import Evaluation

FIGURE_DPI = 100
N_WORST = 8  # most anomalous test images shown, each with its map when there is one
THRESHOLD_COLORS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
.summary { color: #555; margin-top: 0; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
table { border-collapse: collapse; } caption { text-align: left; font-weight: 600; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0; } .thumb figcaption { font-size: 12px; word-break: break-all; }
.thumb { width: %(thumb)dpx; }
.placeholder { width: %(thumb)dpx; height: %(thumb)dpx; box-sizing: border-box;
               border: 2px dashed #b00; color: #b00; font-size: 12px; padding: 6px;
               overflow: hidden; word-break: break-all; background: #fff5f5; }
"""


@dataclass
class ReportData:
    """Everything a report shows; arrays are aligned with the n test images."""

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


def render_report(data: ReportData, n_worst: int = N_WORST, thumb_size: int = 160) -> str:
    """The report as one HTML document."""
    labels, scores = _validated(data)
    heldout = None if data.heldout_scores is None else np.asarray(data.heldout_scores, float)
    n_anomalous = int(labels.sum())
    title = html.escape(data.title)
    summary = (
        f"{labels.size} test images ({labels.size - n_anomalous} normal, {n_anomalous} anomalous)"
        f" &middot; image AUROC <b>{data.auroc:.3f}</b>"
    )
    figures = [
        _roc_figure(labels, scores, data.auroc, data.thresholds),
        _histogram_figure(labels, scores, heldout, data.thresholds),
        _levels_figure(data.levels, data.auroc_levels, data.auroc),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{CSS % {'thumb': thumb_size}}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<p class="summary">{summary}</p>',
        '<div class="row">',
        _key_value_table("Parameters", data.params),
        _key_value_table("Metrics", data.metrics),
        _defect_table(labels, scores, data.defects),
        "</div>",
        "<h2>Scores</h2>",
        '<div class="row">',
        *(_img_tag("image/png", png, alt) for png, alt in figures),
        "</div>",
        f"<h2>{min(n_worst, labels.size)} most anomalous test images</h2>",
        _worst_images(data, scores, n_worst, thumb_size),
        "</body></html>",
    ]
    return "\n".join(parts)


def report_data(
    title: str,
    evaluation: Evaluation,
    paths: Sequence[str],
    defects: Sequence[str],
    params: dict[str, Any],
) -> ReportData:
    """What the report of an evaluation shows; ``paths``/``defects`` align with its test rows.

    The anomaly maps of the ``N_WORST`` highest-scoring test images go with it.
    """
    test = evaluation.test
    scores = np.asarray(test.scores)
    if evaluation.kind == "image":
        thresholds = {
            k: v for k, v in evaluation.thresholds.thresholds.items() if k.startswith("empirical")
        }
    else:
        thresholds = {f"{evaluation.kind} (chosen)": evaluation.threshold}
    maps = None
    if test.maps is not None:
        worst = np.argsort(-scores, kind="stable")[:N_WORST]
        maps = {paths[i]: test.maps[i] for i in worst}
    return ReportData(
        title=title,
        labels=evaluation.labels,
        scores=scores,
        level_scores=test.level_scores,
        levels=list(params.get("levels", range(1, test.level_scores.shape[1] + 1))),
        paths=list(paths),
        defects=list(defects),
        thresholds=thresholds,
        auroc=evaluation.auroc,
        auroc_levels=evaluation.auroc_levels,
        heldout_scores=evaluation.heldout.scores,
        params=params,
        metrics={**evaluation.summary_metrics(), **evaluation.thresholds.metrics},
        maps=maps,
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
    if level_scores.shape != (n, len(data.levels)) or len(data.auroc_levels) != len(data.levels):
        raise ValueError(
            f"level_scores {level_scores.shape} and auroc_levels ({len(data.auroc_levels)}) "
            f"must match {n} images x {len(data.levels)} levels"
        )
    for map_path, anomaly_map in (data.maps or {}).items():
        if np.ndim(anomaly_map) != 2:
            raise ValueError(f"anomaly map of {map_path!r} must be 2-D (H, W)")
    return labels.astype(int), scores


def _mpl_text(text: str) -> str:
    """Text for matplotlib, with ``$`` escaped so names are never parsed as mathtext."""
    return text.replace("$", r"\$")


def _colored(thresholds: dict[str, float]) -> list[tuple[str, float, str]]:
    """(name, value, colour) of each threshold, colours consistent across figures."""
    return [
        (name, value, color)
        for (name, value), color in zip(thresholds.items(), cycle(THRESHOLD_COLORS), strict=False)
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
    labels: np.ndarray, scores: np.ndarray, auroc: float, thresholds: dict[str, float]
) -> tuple[bytes, str]:
    """ROC curve of the summed score, with each threshold's operating point marked."""
    figure = _new_figure(4.2, 3.8)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":", linewidth=1)
    if np.unique(labels).size == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="#1f77b4", linewidth=2, label=f"summed score (AUROC {auroc:.3f})")
        for name, threshold, color in _colored(thresholds):
            fpr_at = observed_rate(scores[labels == 0], threshold)
            tpr_at = observed_rate(scores[labels == 1], threshold)
            ax.plot(fpr_at, tpr_at, "o", color=color, markersize=6, label=_mpl_text(name))
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "needs normal and anomalous images", ha="center", fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.set_title("ROC, summed score", fontsize=11)
    return _png(figure), "ROC curve of the summed score"


def _histogram_figure(
    labels: np.ndarray,
    scores: np.ndarray,
    heldout: np.ndarray | None,
    thresholds: dict[str, float],
) -> tuple[bytes, str]:
    """Score histograms of normal / anomalous test images (and held-out normals), thresholds.

    Bars are fractions of each group, so groups of different sizes compare; heavy-tailed
    positive scores (max > 5 x median) get log-spaced bins on a log axis.
    """
    groups = [
        ("normal (test)", scores[labels == 0], "#2ca02c"),
        ("anomalous (test)", scores[labels == 1], "#ff7f0e"),
    ]
    if heldout is not None:
        groups.append(("normal (held-out train)", heldout, "#7f7f7f"))
    groups = [(name, values[np.isfinite(values)], color) for name, values, color in groups]
    all_scores = np.concatenate([values for _, values, _ in groups])
    n_bins = int(np.clip(all_scores.size // 15, 10, 50))
    log_x = _heavy_tailed(all_scores)
    if log_x:
        bins = np.geomspace(all_scores.min(), all_scores.max(), n_bins + 1)
    else:
        bins = np.histogram_bin_edges(all_scores, bins=n_bins)
    figure = _new_figure(6.0, 3.8)
    ax = figure.add_subplot()
    for name, values, color in groups:
        if values.size:
            weights = np.full(values.size, 1.0 / values.size)
            style = {"histtype": "stepfilled", "alpha": 0.4, "color": color}
            ax.hist(values, bins, weights=weights, label=f"{name} (n={values.size})", **style)
    for name, threshold, color in _colored(thresholds):
        label = _mpl_text(f"{name} = {threshold:.4g}")
        ax.axvline(threshold, color=color, linestyle="--", linewidth=1.5, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel="summed score" + (" (log scale)" if log_x else ""), ylabel="fraction of group")
    ax.set_title("Score distributions", fontsize=11)
    ax.legend(fontsize=8)
    return _png(figure), "Histograms of the summed score with thresholds"


def _heavy_tailed(values: np.ndarray) -> bool:
    """Positive values whose maximum exceeds 5 x their median: clearer on a log axis."""
    return values.size > 0 and values.min() > 0 and values.max() > 5 * np.median(values)


def _levels_figure(levels: list[int], auroc_levels: list[float], auroc: float) -> tuple[bytes, str]:
    """Bar chart of per-level AUROC, with the summed score's AUROC as a reference line."""
    figure = _new_figure(max(3.5, 1.2 + 0.45 * len(levels)), 3.8)
    ax = figure.add_subplot()
    positions = np.arange(len(levels))
    bars = ax.bar(positions, auroc_levels, color="#1f77b4", width=0.7)
    ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.axhline(auroc, color="#d62728", linestyle="--", linewidth=1.5, label=f"summed {auroc:.3f}")
    finite = [v for v in [*auroc_levels, auroc] if np.isfinite(v)]
    ax.set_ylim(min([0.5, *finite]) - 0.02, 1.06)
    ax.set_xticks(positions, [str(level) for level in levels])
    ax.set(xlabel="level", ylabel="AUROC")
    ax.set_title("AUROC per level", fontsize=11)
    ax.legend(loc="upper left", fontsize=8)
    return _png(figure), "AUROC per level"


def _img_tag(mime: str, payload: bytes, alt: str) -> str:
    encoded = base64.b64encode(payload).decode("ascii")
    return f'<img src="data:{mime};base64,{encoded}" alt="{html.escape(alt)}">'


def _key_value_table(caption: str, rows: dict[str, Any]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_format_value(value))}</td></tr>"
        for key, value in rows.items()
    )
    return f"<table><caption>{html.escape(caption)}</caption>{body}</table>"


def _format_value(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return str(value)


def _defect_table(labels: np.ndarray, scores: np.ndarray, defects: list[str]) -> str:
    """AUROC of each defect type against the normal test images."""
    defects_array = np.asarray(defects, dtype=object)
    normal_scores = scores[labels == 0]
    rows = []
    for defect in sorted(set(defects_array[labels == 1])):
        defect_scores = scores[(labels == 1) & (defects_array == defect)]
        auroc = _auroc_vs_normal(normal_scores, defect_scores)
        rows.append(
            f"<tr><td>{html.escape(str(defect))}</td><td class='num'>{defect_scores.size}</td>"
            f"<td class='num'>{'n/a' if np.isnan(auroc) else f'{auroc:.3f}'}</td></tr>"
        )
    header = "<tr><th>defect</th><th>n</th><th>AUROC vs normal</th></tr>"
    return (
        f'<table id="defects"><caption>Per defect type ({normal_scores.size} normal)</caption>'
        f"{header}{''.join(rows)}</table>"
    )


def _auroc_vs_normal(normal_scores: np.ndarray, defect_scores: np.ndarray) -> float:
    if normal_scores.size == 0 or defect_scores.size == 0:
        return float("nan")
    labels = np.r_[np.zeros(normal_scores.size), np.ones(defect_scores.size)]
    return float(roc_auc_score(labels, np.r_[normal_scores, defect_scores]))


def _worst_images(data: ReportData, scores: np.ndarray, n_worst: int, thumb_size: int) -> str:
    """Thumbnails (or placeholders) of the n_worst highest-scoring test images."""
    worst = np.argsort(-scores, kind="stable")[:n_worst]
    maps = data.maps or {}
    value_range = _map_range(maps)
    cells = []
    for rank, index in enumerate(worst, start=1):
        path = data.paths[index]
        try:
            thumbnail = _thumbnail(path, thumb_size, maps.get(path), value_range)
            picture = _img_tag("image/jpeg", thumbnail, f"test image {rank}")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            reason = f"{type(error).__name__}: {error}"
            picture = f'<div class="placeholder">image unavailable<br>{html.escape(reason)}</div>'
        name = Path(path).name if path else "(unknown path)"
        caption = (
            f"#{rank} &middot; score {scores[index]:.4g} &middot; "
            f"{html.escape(str(data.defects[index]))}<br>{html.escape(name)}"
        )
        cells.append(
            f'<figure class="thumb" title="{html.escape(path)}">{picture}'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f'<div class="row">{"".join(cells)}</div>'


def _map_range(maps: dict[str, np.ndarray]) -> tuple[float, float]:
    """One colour scale shared by all anomaly maps, so overlays compare across images."""
    finite = [np.asarray(m, float)[np.isfinite(m)] for m in maps.values()]
    finite = [values for values in finite if values.size]
    if not finite:
        return 0.0, 1.0
    return min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)


def _thumbnail(
    path: str,
    size: int,
    anomaly_map: np.ndarray | None,
    value_range: tuple[float, float],
) -> bytes:
    """JPEG bytes of the image downsized to fit size x size, with its anomaly map overlaid."""
    if not path:
        raise ValueError("no path recorded for this image")
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
        image = image.convert("RGB")
    image.thumbnail((size, size))
    if anomaly_map is not None:
        image = overlay(image, anomaly_map, value_range)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
