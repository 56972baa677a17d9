"""Task: choose a category's configuration on synthetic defects (see evaluation.selection)."""

from __future__ import annotations

from typing import Any

from gaussian_ad_tasks.retries import worth_retrying
from prefect import task

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.evaluation.selection import DEFAULT_GRID, Candidate, select_on_normals


@task(
    name="select-configuration", retries=1, retry_condition_fn=worth_retrying, retry_delay_seconds=5
)
def select_task(
    train_paths: list[str],
    base: DetectorConfig,
    loader: LoaderOptions,
    n_per_kind: int,
    grid: tuple[Candidate, ...] | None = None,
) -> dict[str, Any]:
    """Rank the candidates (default: DEFAULT_GRID) by validation AUROC; the selection as a dict."""
    return select_on_normals(train_paths, base, grid or DEFAULT_GRID, loader, n_per_kind).to_dict()
