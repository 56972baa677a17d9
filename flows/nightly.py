"""Schedules: nightly retraining per category, on-demand scoring; served from one process."""

from __future__ import annotations

from typing import Any

from gaussian_ad_flows.options import TrainOptions
from gaussian_ad_flows.score import score
from gaussian_ad_flows.train import DEFAULTS, train_all
from prefect import flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from gaussian_ad.data.images import mvtec_categories

NIGHTLY_CRON = "0 2 * * *"


@flow(name="nightly-retrain", log_prints=True)
def nightly_retrain(
    data_root: str,
    categories: list[str] | None = None,
    dask_address: str | None = None,
    options: TrainOptions = DEFAULTS,
) -> list[dict[str, Any]]:
    """Retrain the categories; each new version is promoted only if it does not lose."""
    return train_all(data_root, categories, dask_address, options)


def deployments(
    data_root: str,
    categories: list[str] | None = None,
    cron: str = NIGHTLY_CRON,
    timezone: str = "UTC",
    dask_address: str | None = None,
    options: TrainOptions = DEFAULTS,
) -> list[RunnerDeployment]:
    """One nightly deployment per category plus the on-demand scoring deployment."""
    names = categories or mvtec_categories(data_root)
    nightly = [
        nightly_retrain.to_deployment(
            name=f"nightly-{name}",
            schedules=[Cron(cron, timezone=timezone)],
            parameters={
                "data_root": data_root,
                "categories": [name],
                "dask_address": dask_address,
                "options": options.model_dump(mode="json"),
            },
            tags=["gaussian-ad", "nightly", name],
        )
        for name in names
    ]
    scoring = score.to_deployment(name="score-archive", tags=["gaussian-ad", "scoring"])
    return [*nightly, scoring]


def serve_deployments(data_root: str, **kwargs: Any) -> None:
    """Serve every deployment from this process until interrupted."""
    serve(*deployments(data_root, **kwargs))
