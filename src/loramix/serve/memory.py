"""Giving freed heap memory back to the operating system when the server goes idle.

A forward pass over a prefill batch allocates and frees hundreds of MB of activations; glibc keeps much of
what is freed in its arenas (it returns only the top of the heap by itself), so a serving process's
resident size after a busy spell can sit 0.5-1 GB above what it holds (bench/scale.py's RSS probe at 1M
adapters: 2713 MiB after one 16 x 128 forward, 2079 MiB after ``malloc_trim``). The scheduler calls
:func:`release_free_memory` once each time its batch drains, never between steps of a running batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return the C allocator's free pages to the OS (glibc ``malloc_trim(0)``); False where unsupported."""
    fn = _trim()
    if fn is None:
        return False
    fn(0)
    return True
