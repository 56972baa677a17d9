"""Keep freed activation memory in the process heap while batches run (glibc only).

Every batch through a backbone allocates its activations afresh, tens to hundreds of MB per
tensor. glibc serves blocks that large with ``mmap`` and unmaps them when they are freed, so
the kernel zeroes new pages for every tensor of every batch. On 2 CPU cores these page faults
cost as much system time as the forward pass's own arithmetic (Lite0 at 224 px, batch 16:
6.6 ms of system time per image against 8.9 ms of user time).

Inside :func:`reuse_freed_memory`, large blocks come from the heap and freed ones stay
there for the next batch. At the last exit the previous settings come back and the free
memory is returned to the system (``malloc_trim``). Other C libraries: nothing changes.

Threads other than the main one allocate from arenas of their own, which serve blocks over
64 MB with mmap whatever the settings. So that a pass run by a worker thread (the scoring
flow's Dask threads) reuses its memory too, importing this module makes the threads started
afterwards share the main arena (``M_ARENA_MAX=1``, unless ``MALLOC_ARENA_MAX`` is set):
Lite0 at 352 px in a worker thread, 20.6 ms user + 25.1 ms system per image before, 21.3 +
0.4 after. Processes whose threads exist before the import (a ``dask worker``) get the
same from ``MALLOC_ARENA_MAX=1`` in their environment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h) and glibc's defaults for those changed here. The
# mmap threshold is left as it stands: setting either of these stops glibc from moving it
# (its dynamic threshold), so a process keeps the threshold it had reached.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_REUSE = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}  # no mmap blocks, no trimming

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (with mallopt and malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


_LIBC = _glibc()
if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
    _LIBC.mallopt(_M_ARENA_MAX, 1)


def _set(settings: dict[int, int]) -> None:
    assert _LIBC is not None
    for parameter, value in settings.items():
        if _LIBC.mallopt(parameter, value) != 1:
            logger.debug("mallopt(%d, %d) refused", parameter, value)


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Serve large allocations from the heap and keep what is freed, for the duration.

    Re-entrant and safe across threads: the settings change at the first entry and are
    restored (and the heap trimmed) at the last exit.
    """
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(_REUSE)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_DEFAULTS)
                _LIBC.malloc_trim(0)
