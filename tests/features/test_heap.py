"""The heap settings that keep freed activations for the next batch (glibc only)."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from gaussian_ad.features import heap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks of their own mmap (mallinfo2's hblkhd)."""
    mallinfo2 = heap._LIBC.mallinfo2
    mallinfo2.restype = _Mallinfo2
    return mallinfo2().hblkhd


pytestmark = pytest.mark.skipif(
    heap._LIBC is None or not hasattr(heap._LIBC, "mallinfo2"), reason="needs glibc >= 2.33"
)

SIZE = 64 << 20  # far above glibc's largest mmap threshold (32 MiB)


def _mapped_while_holding(nbytes: int) -> int:
    before = _mapped_bytes()
    block = np.ones(nbytes, np.uint8)
    grown = _mapped_bytes() - before
    del block
    return grown


def test_large_blocks_come_from_the_heap_only_inside() -> None:
    assert _mapped_while_holding(SIZE) >= SIZE  # glibc's default: a mapping of its own
    with heap.reuse_freed_memory():
        assert _mapped_while_holding(SIZE) == 0
    assert _mapped_while_holding(SIZE) >= SIZE  # restored at the exit


def test_nested_and_concurrent_uses_restore_at_the_last_exit() -> None:
    inner_done, outer_may_exit = threading.Event(), threading.Event()

    def other_thread() -> None:
        with heap.reuse_freed_memory():
            inner_done.set()
            outer_may_exit.wait(10)

    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            pass
        assert _mapped_while_holding(SIZE) == 0  # the inner exit restored nothing
        thread = threading.Thread(target=other_thread)
        thread.start()
        inner_done.wait(10)
    assert _mapped_while_holding(SIZE) == 0  # the other thread is still inside
    outer_may_exit.set()
    thread.join()
    assert _mapped_while_holding(SIZE) >= SIZE
