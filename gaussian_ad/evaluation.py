"""Per-category evaluation on MVTec-layout data: fit on train/good, score test/."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from gaussian_ad.backbones import Backbone
from gaussian_ad.detector import Detector, Scores
from gaussian_ad.fusion import Standardizer, fuse
from gaussian_ad.gaussian import GaussianAD
from gaussian_ad.images import ImageError, ImageRecord, mvtec_manifest
from gaussian_ad.metrics import auroc, level_aurocs, mean_sem, pixel_auroc, pro_auc
from gaussian_ad.patch import PatchGaussian, fit_patch, load_masks, score_patch
from gaussian_ad.thresholds import empirical_threshold, observed_rate, sigma_to_fpr


@dataclass
class CategoryEvaluation:
    """Test-split results of one category."""

    category: str
    auroc: float
    auroc_levels: list[float]
    n_train: int
    records: list[ImageRecord]  # the scored test images, aligned with ``scores``
    scores: Scores
    errors: list[ImageError] = field(default_factory=list)

    @property
    def n_test(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records])


def split_records(records: Iterable[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train/good, test) records of a manifest."""
    records = list(records)
    return [r for r in records if r.split == "train"], [r for r in records if r.split == "test"]


def evaluate_category(
    root: str | Path, category: str, detector: Detector, progress: bool = False
) -> CategoryEvaluation:
    """Fit ``detector`` on train/good of ``category`` and compute test AUROCs."""
    train, test = split_records(mvtec_manifest(root, category))
    detector.fit([r.path for r in train], progress=progress)
    scores = detector.score([r.path for r in test], progress=progress)
    scored = [test[i] for i in scores.index]
    labels = np.array([r.label for r in scored])
    return CategoryEvaluation(
        category=category,
        auroc=auroc(labels, scores.scores),
        auroc_levels=level_aurocs(labels, scores.level_scores),
        n_train=detector.fitted_model().n_samples_,
        records=scored,
        scores=scores,
        errors=detector.errors_ + scores.errors,
    )


def summary(results: Iterable[CategoryEvaluation]) -> dict[str, Any]:
    """JSON-ready summary: per-category AUROCs and their mean +- SEM."""
    results = list(results)
    mean, sem = mean_sem([r.auroc for r in results])
    return {
        "categories": {
            r.category: {
                "auroc": r.auroc,
                "auroc_levels": r.auroc_levels,
                "n_train": r.n_train,
                "n_test": r.n_test,
                "n_errors": len(r.errors),
            }
            for r in results
        },
        "mean_auroc": mean,
        "sem_auroc": sem,
    }


SIGMAS = (1, 2, 3, 4, 5)
TARGET_FPRS = (0.01, 0.001)


def holdout_split(n: int, n_folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: fold 0 of KFold(n_folds, shuffle, seed), as the paper splits."""
    if n < n_folds:
        raise ValueError(f"need at least {n_folds} normal training images to hold out a fold")
    fit_idx, held_idx = next(KFold(n_folds, shuffle=True, random_state=seed).split(np.arange(n)))
    return fit_idx, held_idx


@dataclass
class ThresholdReport:
    """Thresholds and how they do: predicted FPR against observed FPR / TPR."""

    threshold: float  # the summed-score threshold the model predicts with
    thresholds: dict[str, Any]  # name -> summed value or per-level list, JSON-ready
    metrics: dict[str, float]  # observed rates, MLflow-ready names


def threshold_report(
    model: GaussianAD,
    levels: Sequence[int],
    held: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    target_fpr: float = 0.01,
) -> ThresholdReport:
    """Chi-square per-level thresholds (sigma 1-5, FPR 1%/0.1%) and empirical summed ones.

    ``held`` and ``test`` are (n, L) level scores. Observed FPR is measured on held-out
    normal training images (never seen by the fit), TPR on the anomalous test images.
    The model predicts with the empirical threshold at ``target_fpr``.
    """
    anomalous = test[np.asarray(test_labels) == 1]
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
    held_sum, anomalous_sum = held.sum(axis=1), anomalous.sum(axis=1)
    for fpr in TARGET_FPRS:
        value = empirical_threshold(held_sum, fpr)
        thresholds[f"empirical_fpr{fpr:g}"] = value
        metrics[f"empirical_fpr{fpr:g}_test_normal_fpr"] = observed_rate(
            test.sum(axis=1)[np.asarray(test_labels) == 0], value
        )
        metrics[f"empirical_fpr{fpr:g}_tpr"] = observed_rate(anomalous_sum, value)
    chosen = empirical_threshold(held_sum, target_fpr)
    thresholds["chosen"] = chosen
    return ThresholdReport(chosen, thresholds, metrics)


@dataclass
class ModelEvaluation:
    """A fitted model on the test split and on held-out normal training images."""

    auroc: float
    auroc_levels: list[float]
    labels: np.ndarray
    scores: np.ndarray
    level_scores: np.ndarray
    heldout_scores: np.ndarray
    thresholds: ThresholdReport
    patch: PatchModelEvaluation | None = None
    threshold: float | None = None  # of the detector's chosen score, once calibrated

    def chosen_auroc(self, kind: str = "image") -> float:
        """Test AUROC of a score kind ("image", "patch" or "fused")."""
        if kind == "image":
            return self.auroc
        if self.patch is None:
            raise ValueError(f"no patch-level results for the {kind!r} score")
        return self.patch.auroc_patch if kind == "patch" else self.patch.auroc_fused

    def summary_metrics(self, kind: str = "image") -> dict[str, float]:
        """auroc (of ``kind``), auroc_image and, with a patch model, auroc_patch,
        auroc_fused and, where masks exist, pixel_auroc and pro."""
        metrics = {"auroc": self.chosen_auroc(kind), "auroc_image": self.auroc}
        if self.patch is not None:
            metrics |= {
                "auroc_patch": self.patch.auroc_patch,
                "auroc_fused": self.patch.auroc_fused,
            }
            if self.patch.pixel_auroc is not None:
                metrics |= {"pixel_auroc": self.patch.pixel_auroc, "pro": self.patch.pro}
        return metrics


def evaluate_model(
    model: GaussianAD,
    levels: Sequence[int],
    heldout_levels: Sequence[np.ndarray],
    test_levels: Sequence[np.ndarray],
    test_labels: np.ndarray,
    target_fpr: float = 0.01,
) -> ModelEvaluation:
    """Summed and per-level test AUROC, thresholds, and the model's calibrated threshold.

    Sets ``model.threshold_`` to the empirical threshold at ``target_fpr``.
    """
    held = model.level_scores(heldout_levels)
    level_scores = model.level_scores(test_levels)
    labels = np.asarray(test_labels)
    report = threshold_report(model, levels, held, level_scores, labels, target_fpr)
    model.threshold_ = report.threshold
    return ModelEvaluation(
        auroc=auroc(labels, level_scores.sum(axis=1)),
        auroc_levels=level_aurocs(labels, level_scores),
        labels=labels,
        scores=level_scores.sum(axis=1),
        level_scores=level_scores,
        heldout_scores=held.sum(axis=1),
        thresholds=report,
    )


@dataclass
class PatchEvaluation:
    """Image-level, patch-level and fused image AUROC, and pixel metrics where masks exist."""

    category: str
    auroc_image: float
    auroc_patch: float
    auroc_fused: float
    pixel_auroc: float | None
    pro: float | None
    n_train: int


def evaluate_category_patch(
    root: str | Path,
    category: str,
    backbone: Backbone,
    reduction: str | None = None,
    seed: int = 0,
    **stream: Any,
) -> PatchEvaluation:
    """Image-level and patch-level models from one backbone pass; fused by held-out normals.

    The fit uses 4/5 of train/good (fold 0 of KFold(5, shuffle, seed)); the other fifth
    standardises both scores for the fusion. ``backbone`` must include the patch levels.
    """
    train, test = split_records(mvtec_manifest(root, category))
    fit_idx, held_idx = holdout_split(len(train), seed=seed)
    patch_model, fitted = fit_patch(backbone, [train[i].path for i in fit_idx], **stream)
    image_model = GaussianAD(reduction).fit(fitted.levels)
    held = score_patch(backbone, patch_model, [train[i].path for i in held_idx], **stream)
    standardizer = Standardizer.fit(image_model.anomaly_scores(held.pooled), held.scores)
    scored = score_patch(backbone, patch_model, [r.path for r in test], **stream)
    records = [test[i] for i in scored.index]
    labels = np.array([r.label for r in records])
    image_scores = image_model.anomaly_scores(scored.pooled)
    pixel, pro = None, None
    if any(r.mask for r in records):
        masks = load_masks([r.mask for r in records], scored.maps.shape[-1])
        pixel, pro = pixel_auroc(masks, scored.maps), pro_auc(masks, scored.maps)
    return PatchEvaluation(
        category=category,
        auroc_image=auroc(labels, image_scores),
        auroc_patch=auroc(labels, scored.scores),
        auroc_fused=auroc(labels, fuse(image_scores, scored.scores, standardizer)),
        pixel_auroc=pixel,
        pro=pro,
        n_train=len(fit_idx),
    )


@dataclass
class PatchModelEvaluation:
    """A fitted patch model next to the image-level one: held-out and test patch scores,
    patch and fused AUROC, pixel metrics where masks exist, and the anomaly maps of the
    most anomalous test images."""

    heldout_patch: np.ndarray
    patch_scores: np.ndarray
    auroc_patch: float
    auroc_fused: float
    pixel_auroc: float | None
    pro: float | None
    maps: dict[int, np.ndarray]  # test position -> (S, S) anomaly map


def evaluate_patch_model(
    model: PatchGaussian,
    read_patches: Callable[[np.ndarray], np.ndarray],
    heldout_rows: np.ndarray,
    test_rows: np.ndarray,
    heldout_image: np.ndarray,
    test_image: np.ndarray,
    labels: np.ndarray,
    mask_paths: Sequence[str | None],
    size: int,
    rank_by: str = "fused",
    n_maps: int = 6,
    chunk: int = 32,
) -> PatchModelEvaluation:
    """Patch, fused and pixel-level results from stored patch features.

    ``read_patches(rows)`` returns (len(rows), P, d) features; they are scored ``chunk``
    rows at a time. The fused score is standardised on the held-out normals. All test
    maps are kept for the pixel metrics (n_test * size^2 * 4 bytes); the ``n_maps``
    highest by ``rank_by`` are returned.
    """

    def scores_and_maps(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [
            model.anomaly_maps(read_patches(rows[i : i + chunk]), size)
            for i in range(0, len(rows), chunk)
        ]
        if not parts:
            return np.empty(0), np.empty((0, size, size), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    heldout_patch, _ = scores_and_maps(np.asarray(heldout_rows))
    patch_scores, maps = scores_and_maps(np.asarray(test_rows))
    standardizer = Standardizer.fit(heldout_image, heldout_patch)
    fused = fuse(test_image, patch_scores, standardizer)
    pixel, pro = None, None
    if any(mask_paths):
        masks = load_masks(mask_paths, size)
        pixel, pro = pixel_auroc(masks, maps), pro_auc(masks, maps)
    ranking = {"image": np.asarray(test_image), "patch": patch_scores, "fused": fused}[rank_by]
    return PatchModelEvaluation(
        heldout_patch,
        patch_scores,
        auroc(labels, patch_scores),
        auroc(labels, fused),
        pixel,
        pro,
        {int(i): maps[i] for i in np.argsort(-ranking, kind="stable")[:n_maps]},
    )
