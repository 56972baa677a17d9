"""Evaluation metrics: image and pixel AUROC, per-level AUROC, PRO, mean +- SEM, the confusion
matrix at a threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; labels are 1 for anomalous, 0 for normal.

    Equal to scikit-learn's ``roc_auc_score`` (ties make one ROC point), from one sort in
    numpy: importing scikit-learn would cost an evaluation about 1.5 s of CPU.
    """
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels and {scores.size} scores differ in length")
    if np.unique(labels).size != 2:
        raise ValueError("AUROC needs both normal (0) and anomalous (1) images")
    if not np.isfinite(scores).all():
        raise ValueError("AUROC of scores that are not all finite (NaN or inf)")
    fpr, tpr, _, _ = roc_points(labels == labels.max(), scores)
    return roc_area(fpr, tpr)


def level_aurocs(labels: np.ndarray, level_scores: np.ndarray) -> list[float]:
    """AUROC of each level's score column of an (n, L) array."""
    return [auroc(labels, column) for column in np.asarray(level_scores).T]


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean +- SEM of no values")
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), sem


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of all images: ``masks`` (n, H, W) binary, ``maps`` same shape.

    Normal images have all-zero masks. Equal to scikit-learn's ``roc_auc_score`` over the
    raveled pixels (the area under the ROC points of :func:`pixel_curves`).
    """
    fpr, tpr, _ = pixel_curves(masks, maps)
    return roc_area(fpr, tpr)


def roc_area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under ROC points running from (0, 0) to (1, 1)."""
    return float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve (FPR, PRO) over every threshold of ``maps``.

    As the MVTec AD evaluation code: regions are the 8-connected components of each image's
    mask; at a threshold t (anomalous: map >= t), PRO is the mean over all regions of the
    fraction of the region above t and FPR the fraction of normal pixels above t.
    """
    fpr, _, pro = pixel_curves(masks, maps, regions=True)
    return fpr, pro  # type: ignore[return-value]


def pixel_curves(
    masks: np.ndarray, maps: np.ndarray, regions: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """FPR, TPR and (with ``regions``) PRO at every distinct threshold of ``maps``, from one
    sort of all pixels, from (0, 0, 0) to (1, 1, 1); tied scores make one point.

    ``masks`` (n, H, W) binary, ``maps`` the same shape. TPR is the fraction of anomalous
    pixels above the threshold, PRO that of :func:`pro_curve` (None without ``regions``).
    One sort serves pixel AUROC and PRO: in place of scikit-learn's ``roc_auc_score`` and a
    stable sort of its own for PRO (13.6 s of a 53 s ``evaluate`` of fryum in cProfile),
    it took that run's CPU from 57.3 to 48.9 s (``bench/padim.py``).
    """
    masks, maps = np.asarray(masks) > 0, np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"expected (n, H, W) masks and maps, got {masks.shape}, {maps.shape}")
    anomalous = masks.ravel()
    n_anomalous = int(anomalous.sum())
    if n_anomalous == 0 or n_anomalous == anomalous.size:
        raise ValueError("pixel metrics need both normal and anomalous pixels")
    fpr, tpr, order, last_of_tie = roc_points(anomalous, maps.ravel())
    if not regions:
        return fpr, tpr, None
    weights, n_regions = _region_weights(masks)
    return fpr, tpr, _from_origin(np.cumsum(weights.ravel()[order])[last_of_tie] / n_regions)


def roc_points(
    positive: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FPR and TPR at every distinct threshold of ``values`` (1-D, both classes present in
    the boolean ``positive``), from (0, 0) to (1, 1), and the sort behind them: ``order``
    (descending values) and ``last_of_tie`` (the sorted positions where a threshold ends)."""
    n_positive = int(positive.sum())
    order = np.argsort(values)[::-1]  # ties are merged below, so no stable sort is needed
    ordered = values[order]
    last_of_tie = np.append(ordered[1:] != ordered[:-1], True)
    hits = np.cumsum(positive[order])[last_of_tie]
    ranks = np.flatnonzero(last_of_tie) + 1  # values at or above each threshold
    fpr = _from_origin((ranks - hits) / (positive.size - n_positive))
    tpr = _from_origin(hits / n_positive)
    return fpr, tpr, order, last_of_tie


def _from_origin(curve: np.ndarray) -> np.ndarray:
    """A cumulative rate with 0 before it and 1 after it, rounding above 1 clipped."""
    return np.concatenate([[0.0], np.clip(curve, None, 1.0), [1.0]])


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Each anomalous pixel's 1 / (size of its 8-connected region), and the region count."""
    from scipy.ndimage import label  # only here: not a cost of every evaluation's import

    weights = np.zeros(masks.shape)
    n_regions = 0
    for image_mask, image_weights in zip(masks, weights, strict=True):
        labels, count = label(image_mask, structure=np.ones((3, 3), dtype=int))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        inverse_sizes = np.zeros(count + 1)
        inverse_sizes[1:] = 1.0 / sizes[1:]
        image_weights[...] = inverse_sizes[labels]
        n_regions += count
    return weights, n_regions


def pro_auc(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` (MVTec AD's AU-PRO).

    The curve is integrated with the trapezoidal rule and cut at ``max_fpr`` by linear
    interpolation, as the MVTec AD evaluation code does.
    """
    return pro_area(*pro_curve(masks, maps), max_fpr=max_fpr)


def pro_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float = 0.3) -> float:
    """:func:`pro_auc` of a curve already computed by :func:`pro_curve`."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
    inside = fpr <= max_fpr
    x, y = fpr[inside], pro[inside]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    if x[-1] < max_fpr:  # the next point lies beyond max_fpr: add the interpolated piece
        after = int(np.argmax(~inside))
        x0, y0, x1, y1 = fpr[after - 1], pro[after - 1], fpr[after], pro[after]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += 0.5 * (y_cut + y0) * (max_fpr - x0)
    return float(area / max_fpr)


@dataclass(frozen=True)
class Confusion:
    """Counts of a thresholded score on labelled images (positive: anomalous)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def fpr(self) -> float:
        """False-positive rate: the fraction of normal images flagged (NaN without normals)."""
        normals = self.fp + self.tn
        return self.fp / normals if normals else float("nan")

    @property
    def recall(self) -> float:
        """Recall (TPR): the fraction of anomalous images flagged (NaN without anomalies)."""
        anomalies = self.tp + self.fn
        return self.tp / anomalies if anomalies else float("nan")


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Confusion:
    """The confusion matrix of ``scores > threshold`` (the detector's decision rule) against
    ``labels`` (1 anomalous, 0 normal)."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels and {scores.size} scores differ in length")
    if not np.isin(labels, [0, 1]).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    flagged, anomalous = scores > threshold, labels == 1
    return Confusion(
        tp=int(np.sum(flagged & anomalous)),
        fp=int(np.sum(flagged & ~anomalous)),
        tn=int(np.sum(~flagged & ~anomalous)),
        fn=int(np.sum(~flagged & anomalous)),
    )


def best_recall(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """The highest recall any threshold reaches with a false-positive rate <= ``max_fpr``:
    what a threshold chosen with the test labels would give at the same false-alarm rate,
    the yardstick of a calibrated threshold's recall.

    Examples
    --------
    >>> import numpy as np
    >>> from gaussian_ad.stats.metrics import best_recall
    >>> labels = np.array([0, 0, 0, 0, 1, 1, 1])
    >>> scores = np.array([1.0, 2.0, 3.0, 6.0, 4.0, 5.0, 7.0])
    >>> best_recall(labels, scores, 0.0), best_recall(labels, scores, 0.25)
    (0.3333333333333333, 1.0)
    """
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    normal, anomalous = np.sort(scores[labels == 0]), scores[labels == 1]
    if not normal.size or not anomalous.size:
        return float("nan")
    allowed = int(np.floor(max_fpr * normal.size + 1e-9))  # normals that may score above
    threshold = normal[normal.size - 1 - allowed] if allowed < normal.size else -np.inf
    return float(np.mean(anomalous > threshold))
