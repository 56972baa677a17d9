"""A scoring run's output folder: claimed by one run at a time, defined by what it started with.

Before the first shard, ``run.json`` records everything that defines the run: the source,
its listing (``manifest.parquet`` and a digest of it), the shard plan, the model version the
run is pinned to and its threshold. A rerun on the same folder continues exactly that plan
with that version (it resolves no alias again) or is refused with the reason; two runs at
once on one folder are refused by an exclusive lock that dies with its process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from gaussian_ad.data.images import ImageError
from gaussian_ad.data.sources import SourceItem
from gaussian_ad.files import atomic_path
from gaussian_ad.scoring.tables import error_table, write_table

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
MANIFEST = "manifest.parquet"
LISTING_ERRORS = Path("errors") / "listing.parquet"
LOCK_FILE = ".run.lock"
DEFAULT_SHARD_SIZE = 256


class RunConflict(ValueError):
    """The output folder belongs to another run, or to this one with other settings."""


@dataclass(frozen=True)
class PinnedModel:
    """A model resolved once: the URI every shard loads, and what it decides with."""

    uri: str  # models:/<name>/<version>, or the file/run URI as given
    name: str
    version: str
    threshold: float | None
    has_patch: bool


@dataclass(frozen=True)
class ScoringRun:
    """What defines a scoring run; written to ``run.json`` before the first shard."""

    source: str
    requested_model: str
    model: PinnedModel
    shard_size: int
    maps: bool
    n_items: int
    listing_sha256: str

    def shards(self, items: Sequence[SourceItem]) -> list[list[SourceItem]]:
        """The shard plan: consecutive runs of ``shard_size`` listed items."""
        return [list(items[i : i + self.shard_size]) for i in range(0, len(items), self.shard_size)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScoringRun:
        return cls(**{**data, "model": PinnedModel(**data["model"])})


@contextlib.contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold ``out`` for this process: a second run on it is refused while this one lives
    (an exclusive ``flock``, released by the kernel even on kill -9). Once held, the
    temporary files a killed run left are removed; the lock file goes when the run ends."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    fd = _lock(lock, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        _remove_temporaries(out)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while held: a waiting opener sees a stale inode
        os.close(fd)


def _lock(lock: Path, out: Path) -> int:
    """An open descriptor of ``lock`` holding its exclusive ``flock``, or RunConflict."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunConflict(
                f"{out}: another scoring run is using this folder ({holder}); wait for it "
                "or choose another --out"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by the run that just ended: lock the new file instead


def _remove_temporaries(out: Path) -> None:
    """Remove the ``.<name>.tmp`` files of writes that a killed run never finished."""
    for tmp in out.rglob(".*.tmp"):
        logger.info("removing %s, left by an unfinished write", tmp)
        tmp.unlink(missing_ok=True)


def open_run(
    out: Path,
    source: str,
    model: str,
    shard_size: int | None,
    maps: bool,
    resolve: Callable[[str], PinnedModel],
    list_items: Callable[[str], tuple[list[SourceItem], list[ImageError]]],
) -> tuple[ScoringRun, list[SourceItem], pd.DataFrame]:
    """(the run, its listed items, the listing's error rows), new or continued.

    A new run lists the source, resolves ``model`` once and records both. A continued run
    must ask for the same source, model, maps and shard size (None: the recorded one);
    anything else is refused with a :class:`RunConflict` that says what differs.
    """
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size: must be >= 1, got {shard_size}")
    record = out / RUN_FILE
    if record.exists():
        run = ScoringRun.from_dict(json.loads(record.read_text()))
        _check_same(run, out, source, model, shard_size, maps)
        _check_model_file(run.model, out)
        items, errors = _read_listing(out)
        if _digest(items) != run.listing_sha256 or len(items) != run.n_items:
            raise RunConflict(f"{out}: {MANIFEST} no longer matches {RUN_FILE}; start afresh")
        logger.info("continuing the scoring run in %s (%s)", out, run.model.uri)
        return run, items, errors
    if any((out / "scores").glob("part-*.parquet")):
        raise RunConflict(f"{out}: holds scores without a {RUN_FILE}; choose another out")
    # A listing without run.json is a run killed while planning: nothing was scored, plan anew.
    pinned = resolve(model)
    if maps and not pinned.has_patch:
        raise ValueError(
            f"{model} (version {pinned.version}) has no patch-level model to draw maps with; "
            "train with patch=True or score without maps"
        )
    items, rejected = list_items(source)
    errors = error_table(rejected)
    errors["shard"] = -1
    write_table(errors, out / LISTING_ERRORS)
    table = pd.DataFrame([asdict(i) for i in items], columns=["name", "location", "member"])
    table["source"] = source
    write_table(table, out / MANIFEST)
    run = ScoringRun(
        source=source,
        requested_model=model,
        model=pinned,
        shard_size=shard_size or DEFAULT_SHARD_SIZE,
        maps=maps,
        n_items=len(items),
        listing_sha256=_digest(items),
    )
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(run.to_dict(), indent=2))
    return run, items, errors


def _check_same(
    run: ScoringRun, out: Path, source: str, model: str, shard_size: int | None, maps: bool
) -> None:
    differences = []
    if source != run.source:
        differences.append(f"source {source!r} (the run scores {run.source!r})")
    if model != run.requested_model:
        differences.append(
            f"model {model!r} (the run is pinned to {run.model.uri}, asked as "
            f"{run.requested_model!r})"
        )
    if shard_size is not None and shard_size != run.shard_size:
        differences.append(f"shard size {shard_size} (the run's plan cuts {run.shard_size})")
    if maps != run.maps:
        differences.append(f"maps={maps} (the run has maps={run.maps})")
    if differences:
        raise RunConflict(
            f"{out} holds a scoring run that this one differs from: {'; '.join(differences)}. "
            "Rerun with the run's settings to continue it, or choose another out."
        )


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256: how a run pins a model file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def _check_model_file(model: PinnedModel, out: Path) -> None:
    """Refuse to continue a run whose pinned model file was replaced since it started
    (its rows would mix two models under one digest)."""
    if not model.version or model.uri.startswith(("models:/", "runs:/")):
        return
    if not Path(model.uri).is_file():
        return  # loading it says that it is missing
    now = file_digest(model.uri)
    if now != model.version:
        raise RunConflict(
            f"{out}: the run is pinned to the model file {model.uri} with digest "
            f"{model.version}, but the file now has digest {now} (replaced since the run "
            "started); restore that file, or score into another out"
        )


def _read_listing(out: Path) -> tuple[list[SourceItem], pd.DataFrame]:
    table = pd.read_parquet(out / MANIFEST)
    items = [
        SourceItem(n, loc, m if isinstance(m, str) else None)
        for n, loc, m in zip(table["name"], table["location"], table["member"], strict=True)
    ]
    return items, pd.read_parquet(out / LISTING_ERRORS)


def _digest(items: Sequence[SourceItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.name}\0{item.location}\0{item.member or ''}\n".encode())
    return digest.hexdigest()


def summarize(
    out: Path, run: ScoringRun, listing_errors: pd.DataFrame, infos: Sequence[dict]
) -> tuple[dict, pd.DataFrame]:
    """(the run's summary, all its error rows) from the parts in ``out``."""
    scores = _read_parts(out / "scores")
    errors = pd.concat([listing_errors, _read_parts(out / "errors")])
    summary = {
        "images": run.n_items + len(listing_errors),
        "scored": len(scores),
        "anomalies": int(scores["is_anomaly"].fillna(False).sum()) if len(scores) else 0,
        "errors": len(errors),
        "shards": -(-run.n_items // run.shard_size),
        "shards_run": sum(not i["skipped"] for i in infos),
        "maps_written": sum(i.get("maps", 0) for i in infos),
        "model": run.model.uri,
        "threshold": run.model.threshold,
        "out": str(out),
    }
    return summary, errors


def _read_parts(folder: Path) -> pd.DataFrame:
    """All Parquet parts of a folder, in shard order."""
    parts = sorted(folder.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts]) if parts else pd.DataFrame()
