"""Per-category evaluation on MVTec-layout data: fit on train/good, score test/."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gaussian_ad.detector import Detector, Scores
from gaussian_ad.images import ImageError, ImageRecord, mvtec_manifest
from gaussian_ad.metrics import auroc, level_aurocs, mean_sem


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
