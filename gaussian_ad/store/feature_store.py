"""Zarr v3 feature store: one (N, d_l) array per level, rows chunked by shard.

Layout under the store's URL (a local path or any fsspec URL Zarr accepts)::

    zarr.json                 group attributes: levels, dims, shard size, rows, config
    features/<level>          (N, d_l) float32 (or float16), chunks (shard_size, d_l)
    patches                   (N, P, d) patch features (stores made with a patch layout),
                              chunks (shard_size, P, d): P = grid^2 positions, d channels
    valid                     (N,) bool: the row's image decoded
    manifest.parquet          the planned rows: path, category, split, label, defect,
                              mask, augment_pass, shard
    shards/<id>.json          completion marker of a shard (content hashes, errors, info)

A shard's rows are exactly one chunk of every array, so shards are written
independently and concurrently. A shard counts as complete only once its marker
exists, and the marker is written after the data: a half-written shard is never
read as complete, and rewriting a shard overwrites the same chunk (one copy).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import pandas as pd
import zarr
from fsspec.core import url_to_fs

from gaussian_ad.data.images import ImageError, ImageRecord

MANIFEST = "manifest.parquet"
DTYPES = ("float32", "float16")


class FeatureStore:
    """A chunked feature store with per-shard completion markers."""

    def __init__(self, url: str, group: zarr.Group, manifest: pd.DataFrame | None = None):
        self.url = str(url)
        self.group = group
        self._manifest = manifest
        self.fs, self.root = url_to_fs(self.url)
        attrs = group.attrs.asdict()
        self.levels: list[int] = list(attrs["levels"])
        self.dims: list[int] = list(attrs["dims"])
        self.shard_size: int = int(attrs["shard_size"])
        self.n_rows: int = int(attrs["n_rows"])
        self.config: dict[str, Any] = dict(attrs.get("config", {}))
        self.patch_layout: dict[str, Any] | None = attrs.get("patch_layout")

    @property
    def manifest(self) -> pd.DataFrame:
        """The planned rows, read on first use (about 150 bytes a row; a fit never needs it)."""
        if self._manifest is None:
            with self.fs.open(f"{self.root}/{MANIFEST}", "rb") as f:
                self._manifest = pd.read_parquet(f)
        return self._manifest

    # ------------------------------------------------------------ creating
    @classmethod
    def create(
        cls,
        url: str,
        records: Sequence[ImageRecord],
        levels: Sequence[int],
        dims: Sequence[int],
        *,
        shard_size: int = 256,
        augment_passes: Sequence[int] | None = None,
        dtype: str = "float32",
        config: dict[str, Any] | None = None,
        patch_layout: dict[str, Any] | None = None,
    ) -> FeatureStore:
        """Create an empty store for ``records`` (one row each), or open a matching one.

        ``augment_passes`` gives each row's augmentation pass (-1 = none). A
        ``patch_layout`` (:meth:`PatchLayout.to_dict`) adds the ``patches`` array. Reopening
        an existing store with the same rows returns it unchanged, so an interrupted
        extraction resumes; different rows are an error rather than a silent mix.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        columns = [f.name for f in fields(ImageRecord)]
        manifest = pd.DataFrame([asdict(r) for r in records], columns=columns)
        manifest["augment_pass"] = (
            list(augment_passes) if augment_passes is not None else [-1] * len(manifest)
        )
        manifest["shard"] = np.arange(len(manifest)) // shard_size
        if cls.exists(url):
            store = cls.open(url)
            if not store.manifest[["path", "augment_pass"]].equals(
                manifest[["path", "augment_pass"]]
            ) or (store.levels, store.patch_layout) != (list(levels), patch_layout):
                raise ValueError(
                    f"{url}: a feature store with other rows, levels or patch layout exists there; "
                    "choose another --store or delete it"
                )
            return store
        n = len(manifest)
        group = zarr.open_group(url, mode="w")
        group.attrs.update(
            {
                "levels": list(levels),
                "dims": list(dims),
                "shard_size": shard_size,
                "n_rows": n,
                "config": config or {},
                "patch_layout": patch_layout,
            }
        )
        features = group.require_group("features")
        for level, dim in zip(levels, dims, strict=True):
            features.create_array(
                str(level),
                shape=(n, dim),
                chunks=(shard_size, dim),
                dtype=dtype,
                fill_value=np.nan,
            )
        if patch_layout is not None:
            shape = (patch_layout["grid"] ** 2, len(patch_layout["channels"]))
            group.create_array(
                "patches",
                shape=(n, *shape),
                chunks=(shard_size, *shape),
                dtype=dtype,
                fill_value=np.nan,
            )
        group.create_array("valid", shape=(n,), chunks=(shard_size,), dtype=bool, fill_value=False)
        fs, root = url_to_fs(str(url))
        buffer = io.BytesIO()
        manifest.to_parquet(buffer, index=False)
        fs.pipe_file(f"{root}/{MANIFEST}", buffer.getvalue())
        return cls(url, group, manifest)

    @staticmethod
    def exists(url: str) -> bool:
        """Whether a feature store (its manifest) exists at ``url``."""
        fs, root = url_to_fs(str(url))
        return fs.exists(f"{root}/{MANIFEST}")

    @classmethod
    def open(cls, url: str) -> FeatureStore:
        """Open an existing store."""
        if not cls.exists(url):
            raise FileNotFoundError(f"{url}: no feature store there (no {MANIFEST})")
        return cls(url, zarr.open_group(url, mode="r+"))

    # ------------------------------------------------------------- shards
    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_size)

    def shard_rows(self, shard: int) -> slice:
        """The rows of ``shard``."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.n_shards - 1}")
        return slice(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_rows))

    def shard_manifest(self, shard: int) -> pd.DataFrame:
        """The manifest rows of ``shard``."""
        return self.manifest.iloc[self.shard_rows(shard)]

    def _marker(self, shard: int) -> str:
        return f"{self.root}/shards/{shard:06d}.json"

    def complete_shards(self) -> list[int]:
        """Shards whose marker exists (their data was fully written)."""
        found = self.fs.glob(f"{self.root}/shards/*.json")
        return sorted(int(p.rsplit("/", 1)[-1].split(".")[0]) for p in found)

    def pending_shards(self) -> list[int]:
        """Shards still to extract."""
        done = set(self.complete_shards())
        return [s for s in range(self.n_shards) if s not in done]

    def write_shard(
        self,
        shard: int,
        levels: Sequence[np.ndarray],
        valid: np.ndarray,
        hashes: Sequence[str | None],
        errors: Sequence[ImageError] = (),
        info: dict[str, Any] | None = None,
        patches: np.ndarray | None = None,
    ) -> None:
        """Write a shard's features (and patch features), then its marker (the commit point)."""
        rows = self.shard_rows(shard)
        n = rows.stop - rows.start
        if len(valid) != n or any(len(x) != n for x in levels) or len(hashes) != n:
            raise ValueError(f"shard {shard} has {n} rows; got arrays of other lengths")
        if (patches is None) != (self.patch_layout is None):
            raise ValueError(
                f"shard {shard}: patch features must be given exactly when the store has a layout"
            )
        features = self.group["features"]
        for level, x in zip(self.levels, levels, strict=True):
            features[str(level)][rows] = x
        if patches is not None:
            self.group["patches"][rows] = patches
        self.group["valid"][rows] = np.asarray(valid, dtype=bool)
        marker = {
            "shard": shard,
            "rows": [rows.start, rows.stop],
            "hashes": list(hashes),
            "errors": [asdict(e) for e in errors],
            "info": info or {},
        }
        self.fs.makedirs(f"{self.root}/shards", exist_ok=True)
        tmp = self._marker(shard) + ".tmp"
        self.fs.pipe_file(tmp, json.dumps(marker).encode())
        self.fs.mv(tmp, self._marker(shard))

    def shard_marker(self, shard: int) -> dict[str, Any]:
        """The marker of a complete shard."""
        return json.loads(self.fs.cat_file(self._marker(shard)))

    # ------------------------------------------------------------ reading
    def array(self, level: int) -> zarr.Array:
        """The (N, d) Zarr array of ``level``."""
        return self.group["features"][str(level)]

    def valid(self) -> np.ndarray:
        """(N,) bool: rows of complete shards whose image decoded."""
        mask = np.zeros(self.n_rows, dtype=bool)
        for shard in self.complete_shards():
            rows = self.shard_rows(shard)
            mask[rows] = self.group["valid"][rows]
        return mask

    def errors(self) -> list[ImageError]:
        """Decode errors recorded by the complete shards."""
        return [
            ImageError(**e)
            for shard in self.complete_shards()
            for e in self.shard_marker(shard)["errors"]
        ]

    def full_manifest(self) -> pd.DataFrame:
        """The manifest with each complete shard's content hashes filled in."""
        table = self.manifest.copy()
        table["content_hash"] = None
        for shard in self.complete_shards():
            rows = self.shard_rows(shard)
            table.iloc[rows, table.columns.get_loc("content_hash")] = self.shard_marker(shard)[
                "hashes"
            ]
        return table

    def read_rows(self, level: int, rows: np.ndarray) -> np.ndarray:
        """The features of the given row indices of a level, in that order."""
        return _take_rows(self.array(level), rows)

    def read_patches(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), P, d) patch features of the given rows, in that order."""
        if self.patch_layout is None:
            raise ValueError(f"{self.url}: the store has no patch features (no patch layout)")
        return _take_rows(self.group["patches"], rows)

    def read_level(self, level: int) -> np.ndarray:
        """All valid rows of a level in memory (small stores only)."""
        return np.asarray(self.array(level)[:])[self.valid()]


def _take_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows of a Zarr array in the given order (read in ascending order, one selection)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    order = np.argsort(rows)
    values = array.get_orthogonal_selection((rows[order], *(slice(None),) * (array.ndim - 1)))
    out = np.empty_like(values)
    out[order] = values
    return out
