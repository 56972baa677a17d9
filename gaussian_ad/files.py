"""Atomic file writes: a temporary file beside the target, renamed into place on success and
removed on failure, so that a failed write never leaves anything that looks like a result."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to (``.<name>.<pid>.tmp``, in
    the same folder, which is created); it replaces ``path`` when the block ends, and is
    removed if the block raises.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from gaussian_ad.files import atomic_path
    >>> folder = tempfile.TemporaryDirectory()
    >>> target = Path(folder.name) / "out" / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('done', ['a.txt'])
    >>> folder.cleanup()
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
