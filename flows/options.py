"""The training flow's one typed parameter: validated by pydantic, shown by Prefect as a form."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.augment import AugmentConfig
from gaussian_ad.evaluation.selection import DEFAULT_N_PER_KIND, Candidate


class TrainOptions(BaseModel):
    """Everything a training run takes besides the data and the category.

    ``detector`` defines the model, ``loader`` how it runs. ``augment_passes`` random
    augmented passes over the training images fit the model, with the transforms of
    ``augment`` (None: the category's defaults, :meth:`AugmentConfig.for_category`).
    ``select`` first chooses levels,
    reduction and score on synthetic defects made from the held-out fold (``select_grid``:
    the candidates; default the library's grid). ``incremental_from`` (a model URI) and
    ``new_images`` (a folder of new normal images) merge the new images' statistics into
    that model instead, with its configuration.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    detector: DetectorConfig = DetectorConfig()
    loader: LoaderOptions = LoaderOptions()
    augment_passes: int = Field(0, ge=0)
    augment: AugmentConfig | None = None
    shard_size: int = Field(64, ge=1)
    target_fpr: float = Field(0.01, gt=0.0, lt=1.0)
    promotion_tolerance: float = Field(0.0, ge=0.0)
    select: bool = False
    select_per_kind: int = Field(DEFAULT_N_PER_KIND, ge=1)
    select_grid: tuple[Candidate, ...] | None = None
    incremental_from: str | None = None
    new_images: str | None = None
    home: str | None = None
    experiment: str = "gaussian-ad"

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.select and self.incremental_from:
            raise ValueError("select: chooses a configuration for a full fit, not incremental_from")
        if bool(self.incremental_from) != bool(self.new_images):
            raise ValueError("incremental_from and new_images: give both or neither")
        return self
