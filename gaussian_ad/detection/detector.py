"""Detector: a configuration plus fitted models — images in, scores (and maps) out.

The image-level :class:`GaussianAD` of Rippel et al. is always fitted; with
``config.patch`` a :class:`PatchGaussian` is fitted from the same backbone pass, giving
anomaly maps, and ``config.score`` chooses the score that ranks and thresholds images:
the summed image-level Mahalanobis ("image"), the map maximum ("patch") or their
standardised sum ("fused"). Per-level scores stay available in every case.

This is the one implementation of fit (:meth:`Detector.fit` from images, or
:meth:`Detector.set_models` from statistics reduced elsewhere), calibration
(:meth:`Detector.calibrate_scores`) and scoring (:meth:`Detector.score_features`); the
CLI, the Prefect tasks, the evaluation and the selection all go through them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from gaussian_ad.backbones.models import Backbone, cached_backbone
from gaussian_ad.backbones.specs import BACKBONES
from gaussian_ad.config import DetectorConfig, LoaderOptions
from gaussian_ad.data.images import ImageError, ImageSource
from gaussian_ad.detection.scores import Scores, concat_scores
from gaussian_ad.features.extract import collect, iter_batches, pick_levels, source_label
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.stats.arrayfile import ModelFileError, model_file_errors
from gaussian_ad.stats.calibration import Calibration
from gaussian_ad.stats.estimator import NotFittedError
from gaussian_ad.stats.fusion import LevelStandardizer, level_image_scores
from gaussian_ad.stats.gaussian import GaussianAD
from gaussian_ad.stats.moments import BatchMoments
from gaussian_ad.stats.patch_gaussian import PatchGaussian
from gaussian_ad.stats.pooling import PoolChoice, peaks_on_border
from gaussian_ad.store.plan import fold_ids

if TYPE_CHECKING:  # the store modules import Dask, distributed and Zarr: only where used
    from gaussian_ad.store.feature_store import FeatureStore

logger = logging.getLogger(__name__)

PATCH_SUFFIX = ".patch.safetensors"
STORE_CHUNK = 32  # rows of patch features scored at a time
MAX_OWN_FLAGGED = 0.5
"""The largest share of its own training images a fitted model may flag (see
:meth:`Detector.calibrate_out_of_fold`). A sound one flags few: about the target rate or
less (a reduced model's in-sample scores need not sit below the out-of-fold ones, and a
fold of 5 images at a 10% target may show 1); one that flags most contradicts its fit."""


class Detector:
    """Images in, scores out: a :class:`DetectorConfig` plus the models fitted for it.

    Parameters
    ----------
    config : what defines the detector (backbone, levels, reduction, score, patch layout).
    loader : how it runs (device, batch size, decoding threads, weights file).

    Attributes
    ----------
    model_ : GaussianAD, the image-level model.
    patch_model_, patch_layout_ : the patch-level model and its layout (None without).
    calibration_ : the threshold and the fused score's standardiser (None until calibrated).
    pool_choice_ : with ``patch_pool_radius="auto"``, the pooling chosen at fit and its
        evidence (:class:`~gaussian_ad.stats.pooling.PoolChoice`); else None.
    errors_ : the training images that could not be read.
    """

    def __init__(
        self, config: DetectorConfig | None = None, loader: LoaderOptions | None = None
    ) -> None:
        self.config = config or DetectorConfig()
        self.loader = loader or LoaderOptions()

    # ----------------------------------------------------------------- backbone
    @property
    def backbone_levels(self) -> tuple[int, ...]:
        """The levels the backbone computes: the image-level ones plus the patch levels."""
        levels = set(self.config.image_levels)
        if self.config.patch:
            layout = getattr(self, "patch_layout_", None)
            levels |= set(layout.levels if layout else self._default_patch_levels())
        return tuple(sorted(levels))

    def _default_patch_levels(self) -> tuple[int, ...]:
        from gaussian_ad.backbones.specs import BACKBONES
        from gaussian_ad.features.layout import default_patch_levels

        return default_patch_levels(BACKBONES[self.config.backbone])

    def backbone_module(self) -> Backbone:
        """The frozen backbone (one per process for each configuration); a fitted detector
        refuses weights other than those it was fitted with."""
        backbone = cached_backbone(
            self.config.backbone,
            self.backbone_levels,
            self.loader.weights,
            self.config.pretrained,
            self.loader.device,
            self.config.input_size,
        )
        expected = getattr(self, "weights_fingerprint_", None)
        actual = backbone.weights_fingerprint
        if expected is not None and actual is not None and expected != actual:
            raise ValueError(
                f"this {self.config.backbone} model was fitted with weights {expected}, but the "
                f"weights resolved now ({self.loader.weights or 'the default ones'}) are "
                f"{actual}: pass the weights file it was fitted with"
            )
        return backbone

    def image_levels_of(self, pooled: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The image-level model's levels out of the backbone's pooled features."""
        return pick_levels(pooled, self.backbone_levels, self.config.image_levels)

    # ----------------------------------------------------------------- fitting
    def fit(
        self, sources: Sequence[ImageSource], target_fpr: float = 0.01, progress: bool = False
    ) -> Self:
        """Fit on every normal image and calibrate on their out-of-fold scores.

        One backbone pass fits both models; unreadable images are skipped and kept in
        ``errors_``. Each image is then scored by the models fitted without its fold
        (:func:`~gaussian_ad.store.plan.fold_ids`), and those scores set ``calibration_``
        (threshold at ``target_fpr``, fused score's standardiser) and ``oof_scores_``. The
        patch features of the training images are kept for this (P * d * 4 bytes each:
        313 kB at 28 x 28 x 100); for large sets use the feature store (:meth:`fit_store`).
        """
        backbone = self.backbone_module()
        layout = PatchLayout.for_config(backbone, self.config) if self.config.patch else None
        passed = training_pass(backbone, sources, self.loader, layout, progress)
        keys = [source_label(sources[i], i) for i in passed.index]
        return self.fit_pass(passed, keys, layout, backbone.weights_fingerprint, target_fpr)

    def fit_pass(
        self,
        passed: TrainingPass,
        keys: Sequence[str],
        layout: PatchLayout | None,
        weights_fingerprint: str | None,
        target_fpr: float = 0.01,
    ) -> Self:
        """:meth:`fit` from a :func:`training_pass` already made (``keys`` name its rows, for
        the folds), so several configurations can share one backbone pass. The pass must
        hold this configuration's levels (and, with a patch model, ``layout``'s patches)."""
        if self.config.patch != (passed.patches is not None):
            raise ValueError(f"patch={self.config.patch}, but the pass has no patch features")
        levels = pick_levels(passed.pooled, passed.levels, self.config.image_levels)
        folds = fold_ids(keys, seed=self.config.seed)  # the folds a store of them would get
        patches, patch_total = passed.patches, passed.patch_sums
        self.pool_choice_, free = None, FreeFolds()
        if patch_total is not None and layout is not None:
            self.pool_choice_, free = self._choose_pooling(
                lambda k: (
                    patch_total - BatchMoments.from_array(patches[folds == k], patch_total.shift)
                ),
                lambda k: np.flatnonzero(folds == k),
                patches.__getitem__,
                folds,
                layout.grid,
            )
        self.set_models(
            self._image_model().fit(levels),
            None if patch_total is None else self._patch_model().fit_moments(patch_total),
            layout,
            passed.errors,
        )
        self.weights_fingerprint_ = weights_fingerprint

        def fold_models(k: int) -> tuple[GaussianAD, PatchGaussian | None]:
            kept = folds != k
            image = self._image_model().fit([x[kept] for x in levels])
            reused = free.model(self, k)
            if patch_total is None or reused is not None:
                return image, reused
            held = BatchMoments.from_array(patches[~kept], patch_total.shift)
            return image, self._patch_model().fit_moments(patch_total - held)

        def fold_scores(held_out: Detector, k: int) -> Scores:
            rows = np.flatnonzero(folds == k)
            known = free.patch_scores_of(held_out, k)
            fold_patches = None if patches is None or known is not None else patches[rows]
            return held_out.score_features(
                [x[rows] for x in levels],
                fold_patches,
                index=passed.index[rows],
                patch_scores=known,
            )

        return self.calibrate_out_of_fold(fold_models, fold_scores, folds, target_fpr)

    def fit_store(
        self, store: FeatureStore, rows: np.ndarray | None = None, target_fpr: float = 0.01
    ) -> Self:
        """:meth:`fit` out-of-core: from a feature store's ``rows`` (default: all), reduced
        on Dask, calibrated on out-of-fold scores read back from the store.

        A fitted detector merges the rows' statistics into its models instead (exact
        incremental retraining; needs reduction=None and the same patch layout); its
        calibration then comes from the new rows, scored out of fold.
        """
        from gaussian_ad.store.outofcore import fit_store, patch_moments, store_moments

        rows = np.arange(store.n_rows) if rows is None else np.asarray(rows)
        rows = rows[store.valid()[rows]]
        if list(store.levels) != list(self.config.image_levels):
            raise ValueError(
                f"{store.url}: holds levels {list(store.levels)}, the detector uses "
                f"{list(self.config.image_levels)}"
            )
        side = store.config.get("image_size")  # None in stores written before it was kept
        if side is not None and side != self.config.image_size:
            raise ValueError(
                f"{store.url}: extracted at {side} px, the detector uses "
                f"{self.config.image_size} px (set input_size={side})"
            )
        if self.config.patch and store.patch_layout is None:
            raise ValueError(f"{store.url}: holds no patch features (the detector has patch=True)")
        layout = PatchLayout.from_dict(store.patch_layout) if self.config.patch else None
        reduction = self.config.reduction
        image_base, patch_base = None, None
        if hasattr(self, "model_"):
            if layout != self.patch_layout_:
                raise ValueError(f"{store.url}: another patch layout than the detector's")
            if reduction is not None:
                raise ValueError(
                    f"incremental fitting needs reduction=None, this model uses {reduction!r}"
                )
            image_base = self.model_.raw_moments_
            patch_base = None if self.patch_model_ is None else self.patch_model_.moments_
        folds = fold_ids(store.manifest["path"].to_numpy()[rows], seed=self.config.seed)
        masks = [_row_mask(store.n_rows, rows[folds == k]) for k in range(folds.max() + 1)]
        image_parts = [store_moments(store, mask) for mask in masks]
        image_total = [sum(parts) for parts in zip(*image_parts, strict=True)]
        if image_base is not None:
            image_total = [a + b for a, b in zip(image_base, image_total, strict=True)]
        choosing = patch_base is None and self.config.patch_pool_radius == "auto"
        # A position-free model keeps pooled sums, and they are all the choice needs
        pooled = PatchGaussian(pool_radius=None) if choosing else self._patch_model()
        patch_parts = []
        if layout is not None:
            patch_parts = [pooled.kept_moments(patch_moments(store, mask)) for mask in masks]
        patch_total = None
        if layout is not None:
            patch_total = sum(patch_parts) if patch_base is None else patch_base + sum(patch_parts)
        free = FreeFolds()
        if patch_base is None:
            self.pool_choice_ = None
        if choosing and layout is not None:
            self.pool_choice_, free = self._choose_pooling(
                lambda k: patch_total - patch_parts[k],
                lambda k: rows[folds == k],
                store.read_patches,
                folds,
                layout.grid,
            )
            if self.pool_choice_.radius == 0:  # per position: its sums, a second pass
                patch_parts = [patch_moments(store, mask) for mask in masks]
                patch_total = sum(patch_parts)

        def image_model(k: int | None) -> GaussianAD:
            """The image-level model without fold ``k`` (None: with every fold)."""
            if reduction is None:
                moments = (
                    image_total
                    if k is None
                    else [t - p for t, p in zip(image_total, image_parts[k], strict=True)]
                )
                return self._image_model().fit_moments(moments)
            kept = _row_mask(store.n_rows, rows if k is None else rows[folds != k])
            return fit_store(store, reduction, self.config.variance_threshold, selected=kept)

        grid = None if layout is None else layout.grid

        def patch_model(moments: BatchMoments | None) -> PatchGaussian | None:
            return None if moments is None else self._patch_model().fit_moments(moments, grid)

        def fold_models(k: int) -> tuple[GaussianAD, PatchGaussian | None]:
            reused = free.model(self, k)
            if reused is not None:
                return image_model(k), reused
            held_out = None if patch_total is None else patch_total - patch_parts[k]
            return image_model(k), patch_model(held_out)

        def fold_scores(held_out: Detector, k: int) -> Scores:
            known = free.patch_scores_of(held_out, k)
            return score_store_rows(held_out, store, rows[folds == k], patch_scores=known)

        self.set_models(image_model(None), patch_model(patch_total), layout, store.errors())
        self.weights_fingerprint_ = store.config.get("weights_fingerprint")
        logger.info("fitted on %d rows of %s", self.model_.n_samples_, store.url)
        return self.calibrate_out_of_fold(fold_models, fold_scores, folds, target_fpr)

    def calibrate_out_of_fold(
        self,
        fold_models: Callable[[int], tuple[GaussianAD, PatchGaussian | None]],
        fold_scores: Callable[[Detector, int], Scores],
        folds: np.ndarray,
        target_fpr: float,
    ) -> Self:
        """Score every fold with the models fitted without it, calibrate on those scores.

        ``oof_scores_`` keeps them, in the order of the training rows' ``index``. Each fold's
        model needs 2 images of the other folds (:func:`check_fold_sizes`). The first fold is
        scored by the whole model too: one that flags its own training images is refused.
        """
        check_fold_sizes(folds)
        parts = []
        for k in range(int(folds.max()) + 1):
            image, patch = fold_models(k)
            held_out = Detector(self.config, self.loader).set_models(
                image, patch, self.patch_layout_
            )
            parts.append(fold_scores(held_out, k))
        scores = concat_scores(parts, [])
        self.oof_scores_ = scores.take(np.argsort(scores.index, kind="stable"))
        self.calibrate_scores(self.oof_scores_, target_fpr)
        self._check_own_images(fold_scores(self, 0))
        return self

    def _check_own_images(self, own: Scores) -> None:
        """Refuse a model that flags more than :data:`MAX_OWN_FLAGGED` of images it was fitted
        on (``own``: one fold, scored by the whole model). Their out-of-fold scores set the
        threshold; flagging most of them contradicts the fit (scores that break down
        numerically, training images too alike to spread), and such a model is never
        written."""
        flagged = int(np.count_nonzero(own.is_anomaly))
        if flagged > MAX_OWN_FLAGGED * len(own.scores):
            worst = float(np.max(own.scores))
            raise ValueError(
                f"the fitted model flags {flagged} of {len(own.scores)} of its own training "
                f"images (highest score {worst:.4g}, threshold {self.threshold:.4g}); not "
                "kept: are the training images nearly identical?"
            )

    def _choose_pooling(
        self,
        held_out_sums: Callable[[int], BatchMoments],
        fold_rows: Callable[[int], np.ndarray],
        read_patches: Callable[[np.ndarray], np.ndarray],
        folds: np.ndarray,
        grid: int,
    ) -> tuple[PoolChoice | None, FreeFolds]:
        """With ``patch_pool_radius="auto"``, choose the pooling from where the normals'
        out-of-fold position-free score grids peak (:mod:`gaussian_ad.stats.pooling`);
        else None. ``held_out_sums(k)`` are the sums without fold ``k`` (per position or
        pooled), whose patches ``read_patches(fold_rows(k))`` gives, ``STORE_CHUNK`` rows at
        a time; ``folds`` holds each training row's fold. The position-free fold models and
        their folds' patch scores come back too, for the calibration to reuse when that
        model is chosen."""
        if self.config.patch_pool_radius != "auto":
            return None, FreeFolds()
        check_fold_sizes(folds)
        on_border, free = [], FreeFolds()
        for k in range(int(folds.max()) + 1):
            model = PatchGaussian(pool_radius=None).fit_moments(held_out_sums(k), grid)
            rows, scores = fold_rows(k), []
            for start in range(0, len(rows), STORE_CHUNK):
                grids = model.score_maps(read_patches(rows[start : start + STORE_CHUNK]))
                on_border.append(peaks_on_border(grids))
                scores.append(model.maps_of(grids, self.config.image_size)[0])
            free.models.append(model)
            free.patch_scores.append(np.concatenate(scores) if scores else np.empty(0))
        choice = PoolChoice.from_peaks(np.concatenate(on_border), grid)
        logger.info(
            "patch model: %s (the position-free maps of %.0f%% of %d out-of-fold normals "
            "peak on the border ring)",
            choice.label,
            100 * choice.border_peak_share,
            choice.n_images,
        )
        return choice, free

    @property
    def pool_radius(self) -> int | None:
        """The patch model's pooling: the configuration's, or the one chosen at fit."""
        radius = self.config.patch_pool_radius
        if radius != "auto":
            return radius
        choice = getattr(self, "pool_choice_", None)
        if choice is None:
            raise NotFittedError("patch_pool_radius='auto' is chosen at fit: call fit() first")
        return choice.radius

    def _patch_model(self) -> PatchGaussian:
        return PatchGaussian(pool_radius=self.pool_radius)

    def describe(self) -> str:
        """The configuration's one line (:meth:`DetectorConfig.describe`), with the pooling
        chosen at fit in place of "auto", and its evidence."""
        choice = getattr(self, "pool_choice_", None)
        if choice is None:
            return self.config.describe()
        share = choice.border_peak_share
        evidence = "" if np.isnan(share) else f": {share:.0%} of the good images peak on the border"
        described = self.config.replace(patch_pool_radius=choice.radius).describe()
        return f"{described} (auto{evidence})"

    def _image_model(self) -> GaussianAD:
        return GaussianAD(
            reduction=self.config.reduction, variance_threshold=self.config.variance_threshold
        )

    def set_models(
        self,
        model: GaussianAD,
        patch_model: PatchGaussian | None = None,
        layout: PatchLayout | None = None,
        errors: Sequence[ImageError] = (),
    ) -> Self:
        """Take fitted models (e.g. reduced out-of-core); clears any calibration."""
        if self.config.patch != (patch_model is not None) or (patch_model is None) != (
            layout is None
        ):
            raise ValueError(
                f"patch={self.config.patch} needs "
                + ("a patch model and its layout" if self.config.patch else "no patch model")
            )
        configured = self.config.patch_pool_radius
        allowed = (0, None) if configured == "auto" else (configured,)
        if patch_model is not None and patch_model.pool_radius not in allowed:
            raise ValueError(
                f"the patch model pools radius {patch_model.pool_radius}, the configuration "
                f"{configured!r}"
            )
        if len(model.n_features_in_) != len(self.config.image_levels):
            raise ValueError(
                f"the image-level model has {len(model.n_features_in_)} levels, the "
                f"configuration {len(self.config.image_levels)}"
            )
        self.model_ = model
        self.patch_model_ = patch_model
        self.patch_layout_ = layout
        self.calibration_: Calibration | None = None
        self.errors_ = list(errors)
        self.weights_fingerprint_: str | None = getattr(self, "weights_fingerprint_", None)
        return self

    def calibrate(
        self, heldout: Sequence[ImageSource], target_fpr: float = 0.01, progress: bool = False
    ) -> Self:
        """Calibrate on held-out normal images (see :meth:`calibrate_scores`)."""
        return self.calibrate_scores(self.score(heldout, progress=progress), target_fpr)

    def calibrate_scores(self, heldout: Scores, target_fpr: float = 0.01) -> Self:
        """Set ``calibration_`` (threshold of the chosen score, fused score's standardiser)
        from held-out normal images' scores."""
        levels = None
        if self.config.standardize_levels:
            levels = LevelStandardizer.fit(heldout.level_scores)
        self.calibration_ = Calibration.fit(
            self.config.score,
            level_image_scores(heldout.level_scores, levels),  # not an earlier decision's
            heldout.patch_scores,
            target_fpr,
            levels,
        )
        logger.info(
            "calibrated the %s score: threshold %.4g at FPR %g on %d held-out normals",
            self.config.score,
            self.calibration_.threshold,
            target_fpr,
            self.calibration_.n_normals,
        )
        return self

    @property
    def threshold(self) -> float | None:
        """The decision threshold of the chosen score (None before calibration)."""
        calibration = getattr(self, "calibration_", None)
        return None if calibration is None else calibration.threshold

    # ----------------------------------------------------------------- scoring
    def check_fitted(self) -> None:
        """Raise NotFittedError before :meth:`fit`, :meth:`set_models` or :meth:`load`."""
        if not hasattr(self, "model_"):
            raise NotFittedError("this Detector is not fitted yet: call fit() or load()")

    def score(
        self,
        sources: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        maps: bool = False,
        progress: bool = False,
    ) -> Scores:
        """Score images; unreadable ones become error records, the rest go on.

        With a patch model, ``maps=True`` also returns the anomaly maps (at the
        backbone's input size; about 200 kB an image at 224 px).
        """
        self.check_fitted()
        if maps and self.patch_model_ is None:
            raise ValueError("anomaly maps need the patch-level model (patch=True)")
        parts, errors = [], []
        for batch in iter_batches(
            self.backbone_module(),
            sources,
            self.loader,
            layout=self.patch_layout_,
            names=names,
            progress=progress,
        ):
            errors.extend(batch.errors)
            levels = self.image_levels_of(batch.pooled)
            parts.append(self.score_features(levels, batch.patches, maps, batch.index))
        return concat_scores(parts or [self.empty_scores(maps)], errors)

    def empty_scores(self, maps: bool = False) -> Scores:
        """The scores of no image, with every field a scored image would have."""
        levels = [np.empty((0, d), np.float32) for d in self.model_.n_features_in_]
        patches = None
        if self.patch_layout_ is not None:
            patches = np.empty(self.patch_layout_.feature_shape(0), np.float32)
        return self.score_features(levels, patches, maps)

    def score_features(
        self,
        levels: Sequence[np.ndarray],
        patches: np.ndarray | None = None,
        maps: bool = False,
        index: np.ndarray | None = None,
        patch_scores: np.ndarray | None = None,
    ) -> Scores:
        """Score extracted features: the image-level levels and, for a patch model, the
        (n, P, d) patch features (or their already computed ``patch_scores``); ``index``
        labels the rows (default 0..n-1)."""
        self.check_fitted()
        n = len(levels[0])
        n_levels = len(self.config.image_levels)
        level_scores = self.model_.level_scores(levels) if n else np.zeros((0, n_levels))
        anomaly_maps = None
        if self.patch_model_ is not None and patches is not None:
            size = self.config.image_size
            if n:
                patch_scores, anomaly_maps = self.patch_model_.anomaly_maps(patches, size)
            else:
                patch_scores, anomaly_maps = np.empty(0), np.empty((0, size, size), np.float32)
        scores = Scores(
            index=np.arange(n) if index is None else np.asarray(index),
            level_scores=level_scores,
            patch_scores=patch_scores,
            maps=anomaly_maps if maps else None,
        )
        return self.decide(scores)

    def decide(self, scores: Scores) -> Scores:
        """Fill in the chosen score and, with a threshold, the decisions and the normalised
        score (the fraction of the calibration normals below; see ``Scores.normalized``)."""
        kind, calibration = self.config.score, getattr(self, "calibration_", None)
        # This detector's image score, never one left by another detector's decision
        scores.image = (
            None if calibration is None else calibration.image_scores(scores.level_scores)
        )
        if calibration is not None:
            scores.scores = calibration.scores(scores.image_scores, scores.patch_scores)
            scores.is_anomaly = scores.scores > calibration.threshold
            if calibration.has_normalized:
                scores.normalized = calibration.normalized(scores.scores)
        elif kind == "image" and not self.config.standardize_levels:
            scores.scores = scores.image_scores
        elif kind == "patch" and scores.patch_scores is not None:
            scores.scores = np.asarray(scores.patch_scores, np.float64)
        return scores

    # ------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """The statistics plus the configuration, as safetensors files (no pickle).

        ``path`` holds the image-level model, the configuration and the calibration; a
        patch model goes next to it, in ``<stem>.patch.safetensors``. The backbone weights
        are referenced, not copied.
        """
        self.check_fitted()
        path = Path(path)
        metadata: dict[str, Any] = {
            "detector_config": self.config.to_dict(),
            "weights": self.loader.weights,
            "weights_fingerprint": self.weights_fingerprint_,
            "calibration": None if self.calibration_ is None else self.calibration_.to_dict(),
        }
        if getattr(self, "pool_choice_", None) is not None:
            metadata["pool_choice"] = self.pool_choice_.to_dict()
        if self.patch_model_ is not None and self.patch_layout_ is not None:
            metadata["patch_file"] = patch_path(path).name
            metadata["patch_layout"] = self.patch_layout_.to_dict()
            self.patch_model_.save(patch_path(path))
        return self.model_.save(path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, loader: LoaderOptions | None = None) -> Detector:
        """Load a saved detector; ``loader`` says how it runs (default: the saved weights).

        Every problem with the files raises a ModelFileError that names the file: damaged
        or foreign files, a bad configuration, a patch file that is missing (it must lie
        next to ``path``; other folders are never read).
        """
        path = Path(path)
        model = GaussianAD.load(path)
        metadata = model.metadata_
        with model_file_errors(path, "detector"):
            config = DetectorConfig.from_dict(saved_config(metadata["detector_config"]))
            loader = loader or LoaderOptions()
            if loader.weights is None and metadata.get("weights"):
                loader = dataclasses.replace(loader, weights=metadata["weights"])
            detector = cls(config, loader)
            patch_model, layout = None, None
            if metadata.get("patch_file") is not None:
                patch_file = path.parent / Path(metadata["patch_file"]).name
                if not patch_file.is_file():
                    raise ModelFileError(
                        f"{path}: its patch-level model {patch_file.name} is missing"
                    )
                patch_model = PatchGaussian.load(patch_file)
                layout = PatchLayout.from_dict(metadata["patch_layout"])
            detector.set_models(model, patch_model, layout)
            choice = metadata.get("pool_choice")
            detector.pool_choice_ = None if choice is None else PoolChoice.from_dict(choice)
            detector.weights_fingerprint_ = metadata.get("weights_fingerprint")
            if metadata.get("calibration") is not None:
                detector.calibration_ = Calibration.from_dict(metadata["calibration"])
        return detector


def check_fold_sizes(folds: np.ndarray) -> None:
    """Refuse folds that leave a fold model fewer than 2 images (fewer than 3 training
    images), counted as given: a fold model's count would say 1 of 2."""
    if len(folds) - np.bincount(folds).max() < 2:
        raise ValueError(
            f"need at least 3 readable training images to calibrate out of fold (each "
            f"image is scored by a model fitted on the others), got {len(folds)}"
        )


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration as it was meant when saved: files older than an option carry
    its old behaviour (the paper's sum of levels, the image score; None input size = the
    native side; no patch model, per position)."""
    old = {"standardize_levels": False, "score": "image", "patch": False, "patch_pool_radius": 0}
    saved = {**old, **saved}
    spec = BACKBONES.get(saved.get("backbone", DetectorConfig.backbone))
    if saved.get("input_size") is None and spec is not None and spec.default_input_size:
        saved["input_size"] = spec.image_size
    return saved


def patch_path(path: str | Path) -> Path:
    """Where the patch-level model of a detector saved at ``path`` goes."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + PATCH_SUFFIX)


@dataclass
class FreeFolds:
    """The position-free fold models fitted for the pooling choice, and each fold's patch
    scores under its model: the calibration reuses both when that model is chosen."""

    models: list[PatchGaussian] = dataclasses.field(default_factory=list)
    patch_scores: list[np.ndarray] = dataclasses.field(default_factory=list)

    def model(self, detector: Detector, k: int) -> PatchGaussian | None:
        """Fold ``k``'s position-free model when ``detector`` chose it, else None."""
        return self.models[k] if self.models and detector.pool_radius is None else None

    def patch_scores_of(self, held_out: Detector, k: int) -> np.ndarray | None:
        """Fold ``k``'s patch scores, when ``held_out`` scores with this fold's model."""
        known = self.models and held_out.patch_model_ is self.models[k]
        return self.patch_scores[k] if known else None


@dataclass
class TrainingPass:
    """What one backbone pass over training images gives: pooled features of every
    backbone level, patch features and their sums (all kept: PCA needs the pooled features
    twice, cross-fitting scores the patch features out of fold)."""

    pooled: list[np.ndarray]
    levels: tuple[int, ...]  # the backbone levels of ``pooled``
    index: np.ndarray
    patches: np.ndarray | None
    patch_sums: BatchMoments | None
    errors: list[ImageError]


def training_pass(
    backbone: Backbone,
    sources: Sequence[ImageSource],
    loader: LoaderOptions,
    layout: PatchLayout | None = None,
    progress: bool = False,
) -> TrainingPass:
    """One pass over training images; at least 2 must decode."""
    features = collect(
        iter_batches(backbone, sources, loader, layout=layout, progress=progress), backbone, layout
    )
    if len(features.index) < 2:
        raise ValueError(
            f"need at least 2 readable training images, got {len(features.index)}"
            + "".join(f"\n  {e.path}: {e.reason}" for e in features.errors)
        )
    patches = features.patches
    patch_sums = None if patches is None else BatchMoments.from_array(patches)
    return TrainingPass(
        features.pooled, backbone.levels, features.index, patches, patch_sums, features.errors
    )


def _row_mask(n_rows: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n_rows, dtype=bool)
    mask[rows] = True
    return mask


def score_store_rows(
    detector: Detector,
    store: FeatureStore,
    rows: np.ndarray,
    maps: bool = False,
    patch_scores: np.ndarray | None = None,
) -> Scores:
    """Score a feature store's rows (those that decoded) from their stored features.

    ``index`` of the result holds the store rows. Patch features are read and scored
    ``STORE_CHUNK`` rows at a time, unless the rows' ``patch_scores`` are given (then
    ``rows`` must all have decoded, and no maps are made).
    """
    rows = np.asarray(rows)
    valid = store.valid()[rows]
    if patch_scores is not None and not valid.all():
        raise ValueError("patch scores given for rows that did not decode")
    rows = rows[valid]
    with_patches = detector.patch_model_ is not None and store.patch_layout is not None
    with_patches = with_patches and patch_scores is None
    parts = []
    for start in range(0, len(rows), STORE_CHUNK):
        chunk = rows[start : start + STORE_CHUNK]
        levels = [store.read_rows(level, chunk) for level in detector.config.image_levels]
        patches = store.read_patches(chunk) if with_patches else None
        known = None if patch_scores is None else patch_scores[start : start + STORE_CHUNK]
        parts.append(
            detector.score_features(levels, patches, maps, index=chunk, patch_scores=known)
        )
    return concat_scores(parts or [detector.empty_scores(maps)], [])
