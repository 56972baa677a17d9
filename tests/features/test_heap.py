"""The heap settings that keep freed activations for the next batch (glibc only).

Each test runs in a fresh interpreter: what a block is served from depends on the state of
the heap, which the other tests of this process leave behind.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gaussian_ad.features import heap

pytestmark = pytest.mark.skipif(
    heap._LIBC is None or not hasattr(heap._LIBC, "mallinfo2"), reason="needs glibc >= 2.33"
)

PRELUDE = '''
import ctypes, threading
import numpy as np
from gaussian_ad.features import heap

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

heap._LIBC.mallinfo2.restype = Mallinfo2
SIZE = 64 << 20  # far above glibc's largest mmap threshold (32 MiB)

def mapped_while_holding():
    """Bytes glibc put in mappings of their own (mallinfo2's hblkhd) for a new SIZE block."""
    before = heap._LIBC.mallinfo2().hblkhd
    block = np.ones(SIZE, np.uint8)
    grown = heap._LIBC.mallinfo2().hblkhd - before
    del block
    return grown
'''


def run_fresh(body: str) -> None:
    """Run PRELUDE + body in a new interpreter; its assertions decide."""
    child = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr


def test_large_blocks_come_from_the_heap_only_inside() -> None:
    run_fresh(
        """
assert mapped_while_holding() >= SIZE  # glibc's default: a mapping of its own
with heap.reuse_freed_memory():
    assert mapped_while_holding() == 0
    assert mapped_while_holding() == 0  # the freed block is reused
"""
    )


def test_nested_and_concurrent_uses_restore_at_the_last_exit() -> None:
    run_fresh(
        """
inside, may_leave = threading.Event(), threading.Event()

def other_thread():
    with heap.reuse_freed_memory():
        inside.set()
        may_leave.wait(10)

with heap.reuse_freed_memory():
    with heap.reuse_freed_memory():
        pass
    assert heap._depth == 1  # the inner exit restored nothing
    thread = threading.Thread(target=other_thread)
    thread.start()
    inside.wait(10)
assert heap._depth == 1 and mapped_while_holding() == 0  # the other thread is still inside
may_leave.set()
thread.join()
assert heap._depth == 0
"""
    )


def test_the_exit_restores_the_defaults_and_trims() -> None:
    run_fresh(
        """
calls = []
libc = heap._LIBC

class Recorder:
    def mallopt(self, parameter, value):
        calls.append((parameter, value))
        return libc.mallopt(parameter, value)

    def malloc_trim(self, pad):
        calls.append(("trim", pad))
        return libc.malloc_trim(pad)

heap._LIBC = Recorder()
with heap.reuse_freed_memory():
    assert calls == list(heap._REUSE.items())
assert calls[len(heap._REUSE):] == [*heap._DEFAULTS.items(), ("trim", 0)]
"""
    )


def test_threads_started_after_the_import_reuse_memory_too() -> None:
    run_fresh(
        """
results = []

def in_thread():
    with heap.reuse_freed_memory():
        results.append(mapped_while_holding())

thread = threading.Thread(target=in_thread)
thread.start()
thread.join()
assert results == [0], results  # without the shared arena: a mapping of its own
"""
    )
