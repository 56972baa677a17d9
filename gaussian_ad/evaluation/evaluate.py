"""Evaluation: a calibrated detector on a labelled test set, one implementation for all.

:func:`evaluate` takes the held-out normals' and the test images' :class:`Scores` however
they were computed (from images, or from a feature store's rows) and gives image-level,
patch-level and fused AUROC, per-level AUROC, pixel AUROC and PRO where masks exist, and
the chi-square and empirical thresholds against their observed rates.
:func:`evaluate_category` is the whole protocol on an MVTec-layout folder: fit on every
train/good image, calibrate on their out-of-fold scores (see :mod:`gaussian_ad.store.plan`),
score the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.images import ImageError, ImageRecord, load_masks, mvtec_manifest
from gaussian_ad.detection.detector import Detector, score_store_rows
from gaussian_ad.detection.scores import Scores
from gaussian_ad.stats.calibration import combine
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.metrics import (
    Confusion,
    auroc,
    best_recall,
    confusion,
    level_aurocs,
    mean_sem,
    pixel_curves,
    pro_area,
    roc_area,
)
from gaussian_ad.stats.patch_gaussian import upsample_bilinear
from gaussian_ad.stats.thresholds import empirical_threshold, observed_rate, sigma_to_fpr

if TYPE_CHECKING:  # the store imports Dask, distributed and Zarr: only where a store is read
    from gaussian_ad.store.feature_store import FeatureStore

logger = logging.getLogger(__name__)

PRO_POINTS = 501  # the PRO curve an evaluation keeps, at evenly spaced FPRs
PIXEL_MAX_SIDE = 1024  # pixel metrics at the masks' resolution, at most this long a side
SIGMAS = (1, 2, 3, 4, 5)
TARGET_FPRS = (0.01, 0.001)


def split_records(records: Iterable[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train/good, test) records of a manifest."""
    records = list(records)
    return [r for r in records if r.split == "train"], [r for r in records if r.split == "test"]


@dataclass
class ThresholdReport:
    """Per-level chi-square and summed empirical thresholds against their observed rates."""

    thresholds: dict[str, Any]  # name -> summed value or per-level list, JSON-ready
    metrics: dict[str, float]  # observed rates


def threshold_report(
    model: GaussianAD,
    levels: Sequence[int],
    held: Scores,
    test: Scores,
    test_labels: np.ndarray,
) -> ThresholdReport:
    """Chi-square per-level thresholds (sigma 1-5, FPR 1%/0.1%) and empirical ones of the
    image score (the paper's sum, or the standardised sum the detector decided with).

    Observed FPR is measured on held-out normal training images (never seen by the fit),
    TPR on the anomalous test images.
    """
    labels = np.asarray(test_labels)
    held_image, test_image = held.image_scores, test.image_scores
    held, test = held.level_scores, test.level_scores
    anomalous = test[labels == 1]
    thresholds: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    rules = [(f"sigma{s}", sigma_to_fpr(s), {"sigma": s}) for s in SIGMAS]
    rules += [(f"fpr{f:g}", f, {"fpr": f}) for f in TARGET_FPRS]
    for name, predicted, rule in rules:
        per_level = model.thresholds(**rule)
        thresholds[f"chi2_{name}"] = [float(t) for t in per_level]
        metrics[f"chi2_{name}_predicted_fpr"] = predicted
        for column, label in enumerate(levels):
            metrics[f"chi2_{name}_l{label}_observed_fpr"] = observed_rate(
                held[:, column], per_level[column]
            )
            metrics[f"chi2_{name}_l{label}_tpr"] = observed_rate(
                anomalous[:, column], per_level[column]
            )
    for fpr in TARGET_FPRS:
        value = empirical_threshold(held_image, fpr)
        thresholds[f"empirical_fpr{fpr:g}"] = value
        metrics[f"empirical_fpr{fpr:g}_test_normal_fpr"] = observed_rate(
            test_image[labels == 0], value
        )
        metrics[f"empirical_fpr{fpr:g}_tpr"] = observed_rate(test_image[labels == 1], value)
    return ThresholdReport(thresholds, metrics)


@dataclass
class Evaluation:
    """A calibrated detector on the test split and on held-out normal training images."""

    kind: str  # the detector's chosen score
    labels: np.ndarray
    test: Scores  # chosen scores and decisions filled in; maps with a patch model
    heldout: Scores
    aurocs: dict[str, float]  # score kind -> test AUROC ("image" always)
    auroc_levels: list[float]
    threshold: float
    thresholds: ThresholdReport
    pixel_auroc: float | None = None
    pro: float | None = None
    pro_points: tuple[np.ndarray, np.ndarray] | None = None  # (FPR, PRO), PRO_POINTS each

    @property
    def confusion(self) -> Confusion:
        """The test set's confusion matrix (and FPR, recall) at the threshold."""
        return confusion(self.labels, self.test.scores, self.threshold)

    @property
    def best_recall(self) -> float:
        """The best recall any threshold reaches on the test set at the calibrated
        threshold's test false-positive rate (how much recall the calibration gives away)."""
        return best_recall(self.labels, self.test.scores, self.confusion.fpr)

    @property
    def heldout_fpr(self) -> float:
        """The held-out (out-of-fold) normals' false-positive rate at the threshold."""
        return observed_rate(self.heldout.scores, self.threshold)

    @property
    def auroc(self) -> float:
        """Test AUROC of the chosen score."""
        return self.aurocs[self.kind]

    def summary_metrics(self) -> dict[str, float]:
        """auroc (of the chosen score), auroc_<kind> of every kind available, threshold,
        and pixel_auroc and pro where masks exist."""
        metrics = {"auroc": self.auroc, **{f"auroc_{k}": v for k, v in self.aurocs.items()}}
        metrics["threshold"] = self.threshold
        if self.pixel_auroc is not None:
            metrics |= {"pixel_auroc": self.pixel_auroc, "pro": self.pro}
        return metrics


def evaluate(
    detector: Detector,
    heldout: Scores,
    test: Scores,
    labels: np.ndarray,
    mask_paths: Sequence[str | None] | None = None,
) -> Evaluation:
    """Evaluate a calibrated detector; ``labels`` and ``mask_paths`` align with ``test``'s rows.

    ``test`` gets its chosen scores and decisions filled in. Pixel metrics need the test
    maps (score with ``maps=True``); they are taken at the ground truth's resolution (see
    :func:`pixel_metrics`).
    """
    calibration = detector.calibration_
    if calibration is None:
        raise ValueError("evaluate needs a calibrated detector: call calibrate() first")
    labels = np.asarray(labels)
    detector.decide(test)
    detector.decide(heldout)
    aurocs = {"image": auroc(labels, test.image_scores)}
    if test.patch_scores is not None:
        aurocs["patch"] = auroc(labels, test.patch_scores)
        fused = combine("fused", test.image_scores, test.patch_scores, calibration.standardizer)
        aurocs["fused"] = auroc(labels, fused)
    pixel, pro, points = None, None, None
    if test.maps is not None and mask_paths is not None and any(mask_paths):
        pixel, pro, points = pixel_metrics(test.maps, mask_paths)
    return Evaluation(
        kind=detector.config.score,
        labels=labels,
        test=test,
        heldout=heldout,
        aurocs=aurocs,
        auroc_levels=level_aurocs(labels, test.level_scores),
        threshold=calibration.threshold,
        thresholds=threshold_report(
            detector.model_,
            detector.config.image_levels,
            heldout,
            test,
            labels,
        ),
        pixel_auroc=pixel,
        pro=pro,
        pro_points=points,
    )


def pixel_metrics(
    maps: np.ndarray, mask_paths: Sequence[str | None], max_side: int = PIXEL_MAX_SIDE
) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    """Pixel AUROC, PRO up to FPR 0.3 and the PRO curve (at ``PRO_POINTS`` evenly spaced
    FPRs) of square anomaly maps against ground-truth masks.

    As the MVTec AD evaluation: at the masks' own resolution. The maps cover the whole image
    (resized to a square without crop), so each is resized bilinearly to the masks' height
    and width, which are those of the first mask, reduced to at most ``max_side`` pixels on
    the longer side (memory: about 40 bytes a pixel). Masks of another size are resized
    with nearest neighbour; None stands for an all-normal image.
    """
    first = next(path for path in mask_paths if path is not None)
    with Image.open(first) as image:
        width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    height, width = max(1, round(height * scale)), max(1, round(width * scale))
    masks = load_masks(mask_paths, (height, width))
    resized = np.empty(masks.shape, dtype=np.float32)
    for start in range(0, len(maps), 16):  # bounded float64 temporaries
        resized[start : start + 16] = upsample_bilinear(maps[start : start + 16], (height, width))
    fpr, tpr, pro = pixel_curves(masks, resized, regions=True)
    grid = np.linspace(0.0, 1.0, PRO_POINTS)
    return roc_area(fpr, tpr), pro_area(fpr, pro), (grid, np.interp(grid, fpr, pro))


# --------------------------------------------------------------------------- protocols
@dataclass
class CategoryEvaluation:
    """One category's detector, its evaluation and the test images it scored."""

    category: str
    detector: Detector
    evaluation: Evaluation
    records: list[ImageRecord]  # the scored test images, aligned with the evaluation
    n_train: int
    errors: list[ImageError] = field(default_factory=list)


def evaluate_category(
    root: str | Path,
    category: str,
    config: DetectorConfig,
    loader: LoaderOptions | None = None,
    target_fpr: float = 0.01,
    progress: bool = False,
) -> CategoryEvaluation:
    """Fit on every train/good image (calibrated out of fold), evaluate on test/."""
    train, test = split_records(mvtec_manifest(root, category))
    detector = Detector(config, loader).fit([r.path for r in train], target_fpr, progress)
    scores = detector.score([r.path for r in test], maps=config.patch, progress=progress)
    scored = [test[i] for i in scores.index]
    evaluation = evaluate_records(detector, scores, scored)
    return CategoryEvaluation(
        category,
        detector,
        evaluation,
        scored,
        detector.model_.n_samples_,
        detector.errors_ + scores.errors,
    )


def evaluate_records(
    detector: Detector, scores: Scores, records: Sequence[ImageRecord]
) -> Evaluation:
    """:func:`evaluate` a detector fitted by :meth:`Detector.fit` (against its out-of-fold
    scores) on the labelled ``records`` that ``scores`` scored, row for row."""
    return evaluate(
        detector,
        detector.oof_scores_,
        scores,
        [r.label for r in records],
        [r.mask for r in records],
    )


def summary(results: Iterable[CategoryEvaluation]) -> dict[str, Any]:
    """JSON-ready summary: per-category metrics and the mean +- SEM of the chosen AUROC."""
    results = list(results)
    mean, sem = mean_sem([r.evaluation.auroc for r in results])
    return {
        "categories": {
            r.category: {
                **r.evaluation.summary_metrics(),
                "auroc_levels": r.evaluation.auroc_levels,
                "n_train": r.n_train,
                "n_test": len(r.records),
                "n_errors": len(r.errors),
            }
            for r in results
        },
        "mean_auroc": mean,
        "sem_auroc": sem,
    }


def evaluate_store(
    detector: Detector, store: FeatureStore, heldout: Scores, test_rows: np.ndarray
) -> Evaluation:
    """Evaluate a calibrated detector on a store's test rows, from stored features;
    ``heldout`` are the normals it was calibrated on (its out-of-fold scores)."""
    test = score_store_rows(detector, store, test_rows, maps=detector.patch_model_ is not None)
    manifest = store.manifest.iloc[test.index]
    masks = [m if isinstance(m, str) else None for m in manifest["mask"]]
    return evaluate(detector, heldout, test, manifest["label"].to_numpy(), masks)


def store_auroc(detector: Detector, store: FeatureStore, rows: np.ndarray) -> float:
    """Test AUROC of a calibrated detector's chosen score on a store's rows: from the stored
    features when they are the detector's own (same backbone and weights, levels and patch
    layout), else by scoring the rows' image files."""
    config = detector.config
    own = (
        store.config.get("backbone") == config.backbone
        and store.config.get("weights_fingerprint") == detector.weights_fingerprint_
        and store.config.get("pretrained", True) == config.pretrained
        and set(config.image_levels) <= set(store.levels)
        and (
            detector.patch_layout_ is None or detector.patch_layout_.to_dict() == store.patch_layout
        )
    )
    manifest = store.manifest
    if own:
        scores = score_store_rows(detector, store, rows)
        return auroc(manifest["label"].to_numpy()[scores.index], scores.scores)
    rows = np.asarray(rows)
    scores = detector.score(manifest["path"].iloc[rows].tolist())
    return auroc(manifest["label"].to_numpy()[rows][scores.index], scores.scores)
