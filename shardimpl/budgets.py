"""Per-rank memory budgets: a real allocation limit, and recognising the error it raises.

`budget` gives a rank a limit that the allocator itself enforces (CPU:
``RLIMIT_DATA``; CUDA: the per-process memory fraction); exceeding it raises
the allocator's own error, which `is_oom` recognises. `warm_thread_pools` and
`prefer_mmap` make such a limit safe and sharp in a long-lived rank.
"""

from __future__ import annotations

import contextlib
import resource

import torch

__all__ = ["budget", "is_oom", "OOM_MARKERS", "warm_thread_pools", "prefer_mmap"]


def _vm_data() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmData not found in /proc/self/status")


_pools_warm = False


def warm_thread_pools() -> None:
    """Start torch's OpenMP/intra-op threads now (once per process).

    Their stacks are data mappings, and libgomp aborts the whole process (no
    exception) if it cannot create them under a tight RLIMIT_DATA. Call it
    before a `PeakMeter` block that enters a `budget`, so the warm-up's own
    small tensors (about 1 MiB) stay out of the measurement.
    """
    global _pools_warm
    if not _pools_warm:
        x = torch.ones(1 << 17)
        (x * 2).sum().item()
        torch.mm(torch.ones(128, 128), torch.ones(128, 128))
        _pools_warm = True


@contextlib.contextmanager
def budget(nbytes: int, *, device=None):
    """Give this rank a real allocation limit of ``nbytes`` more than it uses now.

    CPU: ``RLIMIT_DATA`` is set to the current VmData + ``nbytes`` (Linux) and
    restored on exit; torch then raises "DefaultCPUAllocator: can't allocate
    memory". CUDA: the per-process memory fraction is set to (allocated +
    ``nbytes``) / total, never above the fraction already in force (budgets
    nest), and restored to that previous fraction on exit; torch raises
    `torch.OutOfMemoryError`. A CUDA device on a torch without CUDA is a
    ValueError.
    """
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise ValueError(f"budget needs a positive number of bytes. Received: nbytes={nbytes}.")
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"budget(device={str(device)!r}) needs a usable CUDA device; this torch has none "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Use device='cpu' "
                "(an RLIMIT_DATA limit) or run on a GPU node."
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        previous = torch.cuda.get_per_process_memory_fraction(index)
        fraction = float(min(previous, (torch.cuda.memory_allocated(index) + nbytes) / total))
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(previous, index)
        return
    warm_thread_pools()
    old = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _vm_data() + nbytes
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, old)


OOM_MARKERS = (
    "can't allocate memory",
    "out of memory",
    "cannot allocate memory",
    "outofmemoryerror",
)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA and CPU out-of-memory errors (torch, numpy, Python), also when wrapped."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return True
        text = f"{type(exc).__name__}: {exc}".lower()
        if any(m in text for m in OOM_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def keep_freed_heap(trim_threshold: int) -> bool:
    """Let glibc keep up to ``trim_threshold`` bytes freed at the top of its heap (``M_TRIM_THRESHOLD``).

    An explicit mmap threshold (`prefer_mmap`) freezes glibc's dynamic thresholds, leaving the
    trim threshold at 128 KiB: a block freed at the heap's top goes back to the OS at once, and
    the next step's block of the same size page-faults in fresh (measured: 2,000 to 4,000 faults
    and 1-3 ms per 64 MiB mlp step at N = 2, varying by rank and run). An ordinary process's glibc
    raises it to twice the mmap threshold. Returns False where ``mallopt`` is not available.
    """
    return _mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD


def prefer_mmap(threshold: int = 131072) -> bool:
    """Make glibc serve allocations >= ``threshold`` bytes with mmap, from now on, in this process.

    Freed large blocks then go back to the OS at once, so RSS and VmData follow
    live memory and a `budget` bites on every large allocation (a heap grown by
    earlier work would otherwise serve it without growing VmData). The same as
    starting the process with ``MALLOC_MMAP_THRESHOLD_``; returns False where
    glibc's ``mallopt`` is not available.
    """
    return _mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where it is not available."""
    from shardimpl.glibc import libc

    try:
        return bool(libc().mallopt(param, int(value)))
    except AttributeError:  # no C library, or not glibc
        return False
