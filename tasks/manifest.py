"""Task: discover a category's images and build its manifest."""

from __future__ import annotations

from gaussian_ad_tasks.retries import worth_retrying
from prefect import task

from gaussian_ad.data.images import ImageRecord, manifest_fingerprint, mvtec_manifest


@task(name="build-manifest", retries=2, retry_condition_fn=worth_retrying, retry_delay_seconds=2)
def build_manifest(data_root: str, category: str) -> tuple[list[ImageRecord], str]:
    """The category's MVTec-layout manifest and its fingerprint."""
    records = mvtec_manifest(data_root, category)
    return records, manifest_fingerprint(records)
