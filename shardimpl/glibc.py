"""The C library, loaded once: `mallopt` and `mallinfo2` for the budgets and the meters.

``ctypes.util.find_library("c")`` runs ``ldconfig -p`` in a subprocess on each
call; a meter enters often (thousands of times in a test world), so the handle
is looked up once per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["libc"]


@functools.lru_cache(maxsize=None)
def libc():
    """The process's C library as a ``ctypes.CDLL``, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
