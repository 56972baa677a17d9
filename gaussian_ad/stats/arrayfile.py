"""One file of named arrays plus a JSON header (safetensors): no pickle, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray], key: str, header: dict) -> Path:
    """Write ``arrays`` with ``header`` (JSON under metadata ``key``) via a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        str(tmp),
        metadata={key: json.dumps(header)},
    )
    tmp.replace(path)
    return path


def read_arrays(
    path: str | Path, key: str, max_version: int, what: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a file written by :func:`write_arrays`, with clear errors.

    ``what`` names the kind of file in messages; the header's ``format_version`` may not
    exceed ``max_version``.
    """
    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        header_text = (f.metadata() or {}).get(key)
    if header_text is None:
        raise ValueError(f"{path}: not a {what} file (no {key} metadata)")
    header = json.loads(header_text)
    if header["format_version"] > max_version:
        raise ValueError(
            f"{path}: {what} format {header['format_version']} is newer than "
            f"this gaussian-ad understands ({max_version})"
        )
    return header, load_file(str(path))
