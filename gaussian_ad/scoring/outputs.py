"""Scoring to outputs: images -> score rows (+ map overlays), and a scoring run's shards.

One implementation for the CLI's ``score`` and the scoring flow's shards: the detector
scores the images, the flagged ones get their overlays when maps are asked for, and the
rows say where each overlay went.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gaussian_ad.data.images import ImageError, ImageSource
from gaussian_ad.data.sources import SourceItem, read_items
from gaussian_ad.detection.detector import Detector
from gaussian_ad.scoring.overlays import write_overlays
from gaussian_ad.scoring.tables import error_table, score_table, write_table

logger = logging.getLogger(__name__)

READ_TIMEOUT = float(os.environ.get("GAUSSIAN_AD_READ_TIMEOUT", 300))
"""Seconds one item's read may take before the shard gives up on it and the rest of its
items (error rows): one stuck read (a hung network mount, say) cannot hold a run."""
BYTES_IN_FLIGHT = 256 << 20
"""Encoded bytes a shard holds at once: items are read and scored in chunks of at most this
(plus one item of up to the read limit, 1 GiB), whatever the shard's size."""


def score_rows(
    detector: Detector,
    sources: Sequence[ImageSource],
    names: Sequence[str],
    maps_root: str | Path | None = None,
    maps_folder: str = ".",
    progress: bool = False,
    all_maps: bool = False,
) -> tuple[pd.DataFrame, list[ImageError], int]:
    """(score rows, unreadable images, overlays written) for ``sources`` labelled ``names``.

    With ``maps_root``, the overlay of every flagged image (with ``all_maps``: of every
    image) with its legend (verdict, score, normalised score, threshold, colour bar) goes
    under ``maps_root/maps_folder`` and the rows' ``map`` column names it relative to
    ``maps_root`` (empty for the others).
    """
    result = detector.score(sources, names=names, maps=maps_root is not None, progress=progress)
    table = score_table([names[i] for i in result.index], result, detector.config.image_levels)
    written: dict[int, str] = {}
    if maps_root is not None:
        standardizer = None if detector.calibration_ is None else detector.calibration_.standardizer
        written = write_overlays(
            result,
            sources,
            names,
            maps_root,
            maps_folder,
            standardizer,
            detector.threshold,
            every=all_maps,
        )
        table["map"] = [written.get(int(i), "") for i in result.index]
    return table, result.errors, len(written)


def _chunks_in_memory(
    items: Sequence[SourceItem],
) -> Iterator[tuple[list[str], list[bytes], list[ImageError]]]:
    """(names, contents, read errors) of consecutive items, at most ``BYTES_IN_FLIGHT`` of
    content at a time (one item over it goes alone; items over the read limit never load)."""
    names: list[str] = []
    contents: list[bytes] = []
    errors: list[ImageError] = []
    held = 0
    for item, content in _read_with_deadline(items):
        if isinstance(content, ImageError):
            errors.append(content)
            continue
        if contents and held + len(content) > BYTES_IN_FLIGHT:
            yield names, contents, errors
            names, contents, errors, held = [], [], [], 0
        names.append(item.name)
        contents.append(content)
        held += len(content)
    if contents or errors:
        yield names, contents, errors


def _read_with_deadline(
    items: Sequence[SourceItem],
) -> Iterator[tuple[SourceItem, bytes | ImageError]]:
    """:func:`read_items` on a reader thread, one item ahead; an item that takes longer than
    ``READ_TIMEOUT`` seconds ends the shard's reading: it and the items after it become error
    rows, and the stuck thread is left behind (a blocked read cannot be interrupted)."""
    results: queue.Queue = queue.Queue(maxsize=1)

    def read() -> None:
        for pair in read_items(items):
            results.put(pair)

    threading.Thread(target=read, name="shard-reader", daemon=True).start()
    for position, item in enumerate(items):
        try:
            yield results.get(timeout=READ_TIMEOUT)
        except queue.Empty:
            logger.error(
                "reading %s stalled for %.0f s; the shard goes on", item.name, READ_TIMEOUT
            )
            reason = f"not read: reading {item.name} stalled for over {READ_TIMEOUT:.0f} s"
            for left in items[position:]:
                yield left, ImageError(left.name, reason)
            return


def part_path(out: str | Path, kind: str, shard: int) -> Path:
    """Where a shard's scores or errors go: ``<out>/<kind>/part-<shard>.parquet``."""
    return Path(out) / kind / f"part-{shard:05d}.parquet"


def score_shard(
    detector: Detector,
    items: Sequence[SourceItem],
    shard: int,
    out: str | Path,
    model: tuple[str, str],
    maps: bool | str = False,
) -> dict[str, Any]:
    """Score one shard of a scoring run into ``out``; its scores part is written last,
    atomically: the commit point (a finished shard is skipped).

    ``model`` is the (registered name, version) recorded in every row. With ``maps``, the
    overlays of the flagged images (``maps="all"``: of every image) go to
    ``maps/part-<shard>/`` first.
    """
    scores_part = part_path(out, "scores", shard)
    if scores_part.exists():
        logger.info("shard %d already scored (%s), skipped", shard, scores_part)
        return {"shard": shard, "skipped": True}
    started = time.perf_counter()
    tables, errors, n_maps = [], [], 0
    for names, contents, read_errors in _chunks_in_memory(items):
        table, score_errors, written = score_rows(
            detector,
            contents,
            names,
            out if maps else None,
            f"maps/part-{shard:05d}",
            all_maps=maps == "all",
        )
        tables.append(table)
        errors += read_errors + score_errors
        n_maps += written
    table = pd.concat(tables or [score_rows(detector, [], [])[0]], ignore_index=True)
    table["model_name"], table["model_version"] = model
    table["shard"] = np.int32(shard)
    errors_table = error_table(errors)
    errors_table["shard"] = np.int32(shard)
    write_table(errors_table, part_path(out, "errors", shard))
    write_table(table, scores_part)
    return {
        "shard": shard,
        "skipped": False,
        "rows": len(table),
        "anomalies": int(table["is_anomaly"].fillna(False).sum()),
        "errors": len(errors),
        "maps": n_maps,
        "seconds": round(time.perf_counter() - started, 3),
    }
