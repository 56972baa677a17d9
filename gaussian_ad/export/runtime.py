"""Scoring with an exported ONNX detector in onnxruntime: images in, :class:`Scores` out.

The graph (:mod:`gaussian_ad.export.onnx`) holds the pre-processing after the resize, the
backbone and the scores; this module decodes and resizes images the way the torch path does
(:func:`~gaussian_ad.features.extract.decode_resized`) and runs the graph in batches.
Unreadable images become error records, as in :meth:`Detector.score`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gaussian_ad.data.images import ImageDecodeError, ImageError, ImageSource
from gaussian_ad.detection.scores import Scores, concat_scores
from gaussian_ad.features.extract import decode_resized, source_label

logger = logging.getLogger(__name__)

INPUT = "pixels"


def session(path: str | os.PathLike | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of an exported model (``threads``: intra-op threads;
    None: onnxruntime's default, one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(sess: Any, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The named outputs of an exported model on (N, S, S, 3) uint8 ``pixels``."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {INPUT: np.ascontiguousarray(pixels)}), strict=True))


class OnnxDetector:
    """An exported detector in onnxruntime, scoring images like :meth:`Detector.score`.

    Parameters
    ----------
    path : the ``.onnx`` file written by :func:`~gaussian_ad.export.onnx.export_onnx`.
    threads : onnxruntime's intra-op threads (None: its default).
    batch_size : images per run of the graph.

    Attributes
    ----------
    size : the square side images are resized to.
    threshold : the decision threshold (from the model's metadata).
    metadata : the model's ``metadata_props``.
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, batch_size: int = 32
    ) -> None:
        self.path = Path(path)
        self.session = session(self.path, threads)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.size = int(self.metadata["input_size"])
        self.threshold = float(self.metadata["threshold"])
        self.levels = [int(v) for v in self.metadata["levels"].split(",")]
        self.batch_size = batch_size

    @property
    def config(self) -> dict[str, Any]:
        """The detector's configuration, as :meth:`DetectorConfig.to_dict` wrote it."""
        return json.loads(self.metadata["detector_config"])

    def score_pixels(self, pixels: np.ndarray, index: np.ndarray | None = None) -> Scores:
        """Scores of (N, S, S, 3) uint8 images already resized to :attr:`size`."""
        out = run(self.session, pixels)
        return Scores(
            index=np.arange(len(pixels)) if index is None else np.asarray(index),
            level_scores=out["level_scores"],
            patch_scores=out.get("patch_score"),
            scores=out["score"],
            is_anomaly=out["is_anomaly"],
            normalized=out["normalized_score"],
            image=out["image_score"],
        )

    def score(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None) -> Scores:
        """Decode, resize and score ``sources`` (paths, bytes, arrays, PIL images);
        unreadable ones become error records, the rest go on (``index`` into ``sources``)."""
        parts, errors, pixels, index = [], [], [], []
        for position, source in enumerate(sources):
            name = names[position] if names is not None else source_label(source, position)
            try:
                pixels.append(decode_resized(source, self.size, name=name))
                index.append(position)
            except ImageDecodeError as error:
                errors.append(ImageError(error.path, error.reason))
            if len(pixels) == self.batch_size:
                parts.append(self.score_pixels(np.stack(pixels), np.array(index)))
                pixels, index = [], []
        if pixels:
            parts.append(self.score_pixels(np.stack(pixels), np.array(index)))
        return concat_scores(parts or [self.empty_scores()], errors)

    def empty_scores(self) -> Scores:
        """The scores of no image (the graph is not run on an empty batch)."""
        has_patch = "patch_score" in self.metadata["outputs"].split(",")
        empty = np.empty(0)
        return Scores(
            index=np.empty(0, np.int64),
            level_scores=np.empty((0, len(self.levels))),
            patch_scores=empty if has_patch else None,
            scores=empty,
            is_anomaly=np.empty(0, bool),
            normalized=empty,
            image=empty,
        )
