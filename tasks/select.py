"""Task: choose a category's configuration on synthetic defects (see gaussian_ad.selection)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from prefect import task

from gaussian_ad.selection import DEFAULT_GRID, Candidate, select_configuration
from tasks.extract import BackboneConfig, worker_backbone


@task(name="select-configuration", retries=1, retry_delay_seconds=5)
def select_task(
    fit_paths: list[str],
    heldout_paths: list[str],
    backbone: BackboneConfig,
    n_per_kind: int,
    seed: int,
    grid: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Rank the candidates (default: DEFAULT_GRID) by validation AUROC; the selection as a dict.

    The backbone computes every level (the grid's and the patch levels), whatever the
    levels of ``backbone``.
    """
    model = worker_backbone(replace(backbone, levels=None))
    selection = select_configuration(
        fit_paths,
        heldout_paths,
        model,
        DEFAULT_GRID if grid is None else [Candidate.from_dict(c) for c in grid],
        n_per_kind=n_per_kind,
        seed=seed,
        batch_size=backbone.batch_size,
        workers=backbone.workers,
        device=backbone.device,
    )
    return selection.to_dict()
