"""One file of named arrays plus a JSON header (safetensors): no pickle, atomic writes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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
    try:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            str(tmp),
            metadata={key: json.dumps(header)},
        )
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


@contextlib.contextmanager
def model_file_errors(path: str | Path, what: str) -> Iterator[None]:
    """Turn what a damaged or hand-edited file makes loading raise into a ModelFileError."""
    try:
        yield
    except ModelFileError:
        raise
    except KeyError as exc:
        raise ModelFileError(f"{path}: {what} lacks {exc.args[0]!r}") from None
    except (ValueError, TypeError, IndexError, np.linalg.LinAlgError) as exc:
        raise ModelFileError(f"{path}: {what} is inconsistent: {exc}") from None


def read_arrays(
    path: str | Path, key: str, max_version: int, what: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a file written by :func:`write_arrays`, with clear errors.

    ``what`` names the kind of file in messages; the header's ``format_version`` may not
    exceed ``max_version``. Every problem raises a :class:`ModelFileError` naming the file:
    not there, not safetensors (empty, truncated, another format), no or bad JSON header,
    no format version, non-finite statistics.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header_text = (f.metadata() or {}).get(key)
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelFileError(f"{path}: not a readable {what} file: {exc}") from None
    if header_text is None:
        raise ModelFileError(f"{path}: not a {what} file (no {key} metadata)")
    try:
        header = json.loads(header_text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the {what}'s metadata is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("format_version"), int):
        raise ModelFileError(f"{path}: the {what}'s metadata has no format_version")
    if header["format_version"] > max_version:
        raise ModelFileError(
            f"{path}: {what} format {header['format_version']} is newer than "
            f"this gaussian-ad understands ({max_version})"
        )
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ModelFileError(f"{path}: array {name} holds non-finite values")
    return header, arrays
