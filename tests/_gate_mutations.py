"""The gate's mutation kit: planted regressions of the creation path, applied inside the ranks.

Each entry of `MUTATIONS` is a context manager (picklable by reference, so
`bench.gates.memory.run_gate_variants` can send it to the ranks) that patches
`shardimpl.create.fill_local_shard` while the metered build runs and undoes
the patch on exit, so that several variants can run one after another in the
same ranks. Every one of them must make the gate fail; the clean tree must pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math

import numpy as np
import torch

from shardimpl import create
from shardimpl.layout import shard_slices

_held: list = []  # what a mutation keeps alive until the build ends


@contextlib.contextmanager
def _patched(make):
    """Replace create.fill_local_shard by ``make(original)`` inside the block."""
    original = create.fill_local_shard
    create.fill_local_shard = make(original)
    try:
        yield
    finally:
        create.fill_local_shard = original
        _held.clear()


def _nbytes(full_shape, dtype) -> int:
    return math.prod(full_shape) * torch.empty((), dtype=dtype).element_size()


def _numpy_slice(full_shape, offsets, sizes, dtype, device):
    """The shard, cut out of a full-size numpy buffer built first (what the gate must catch)."""
    full = _numpy_full(full_shape)
    piece = np.ascontiguousarray(full[shard_slices(offsets, sizes)])
    del full
    return torch.from_numpy(piece).to(device=device, dtype=dtype)


def _numpy_full(full_shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal(tuple(full_shape), dtype=np.float32) * 0.02


@contextlib.contextmanager
def torch_full_then_slice():
    """Build every variable whole with torch, keep the shard: what the gate was made for."""
    def make(original):
        def fill(spec, full_shape, offsets, sizes, *, dtype, device):
            full = original(spec, full_shape, (0,) * len(full_shape), full_shape, dtype=dtype, device=device)
            return full[shard_slices(offsets, sizes)].clone()
        return fill
    with _patched(make):
        yield


@contextlib.contextmanager
def numpy_full_then_slice():
    """Build every variable whole in a numpy buffer, copy the shard into torch: no aten op sees it."""
    def make(original):
        def fill(spec, full_shape, offsets, sizes, *, dtype, device):
            return _numpy_slice(full_shape, offsets, sizes, dtype, device)
        return fill
    with _patched(make):
        yield


@contextlib.contextmanager
def bytes_buffer_held():
    """Hold a full-size ``bytes`` object (zeros: calloc'd, never written) while each variable is made."""
    def make(original):
        def fill(spec, full_shape, offsets, sizes, *, dtype, device):
            buffer = bytes(_nbytes(full_shape, dtype))
            try:
                return original(spec, full_shape, offsets, sizes, dtype=dtype, device=device)
            finally:
                del buffer
        return fill
    with _patched(make):
        yield


@contextlib.contextmanager
def small_variable_full_copy():
    """Numpy full-then-slice for each variable smaller than the gate's budget only (the 8 MiB
    kernel, the biases): the budget cannot catch it, only a peak can."""
    from bench.gates import memory as gate

    budget = gate.BUDGET_FRACTION * gate.gate_model_bytes()

    def make(original):
        def fill(spec, full_shape, offsets, sizes, *, dtype, device):
            if _nbytes(full_shape, dtype) >= budget:
                return original(spec, full_shape, offsets, sizes, dtype=dtype, device=device)
            return _numpy_slice(full_shape, offsets, sizes, dtype, device)
        return fill
    with _patched(make):
        yield


@contextlib.contextmanager
def extra_shard_clone():
    """Keep one extra clone of every shard until the build ends (2 x P/N)."""
    def make(original):
        def fill(spec, full_shape, offsets, sizes, *, dtype, device):
            local = original(spec, full_shape, offsets, sizes, dtype=dtype, device=device)
            _held.append(local.clone())
            return local
        return fill
    with _patched(make):
        yield


@contextlib.contextmanager
def c_malloc_full():
    """A full-size buffer from C's malloc (as a C extension would make), written, then freed:
    neither torch nor Python's allocators see it; only the resident view can."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def make(original):
        def fill(spec, full_shape, offsets, sizes, *, dtype, device):
            n = _nbytes(full_shape, dtype)
            ptr = libc.malloc(n)
            if not ptr:
                raise MemoryError(f"malloc({n}) failed")
            try:
                ctypes.memset(ptr, 1, n)
                return original(spec, full_shape, offsets, sizes, dtype=dtype, device=device)
            finally:
                libc.free(ptr)
        return fill
    with _patched(make):
        yield


MUTATIONS = {
    "torch full-then-slice": torch_full_then_slice,
    "numpy full-then-slice": numpy_full_then_slice,
    "bytes buffer held": bytes_buffer_held,
    "small variable full copy": small_variable_full_copy,
    "extra shard clone": extra_shard_clone,
    "C malloc full buffer": c_malloc_full,
}
