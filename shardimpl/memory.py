"""Memory meters and per-rank budgets: the instrument behind every memory claim.

`PeakMeter` measures, for this rank, the peak of live bytes inside a block:

* CUDA: the caching allocator's ``max_memory_allocated`` after a peak reset,
  minus what was allocated at the start (exact for torch tensors on the GPU).
* CPU: torch has no CPU allocator statistics, so a `TorchDispatchMode` sees
  every aten op; each new storage an op returns (tensor subclasses such as
  DTensor are unwrapped to their local tensors) is added to the live count,
  and a weak-reference callback subtracts it when the storage is freed.
  Storages allocated and freed inside the block are counted. It misses bytes
  allocated outside torch ops: numpy arrays, ``torch.from_numpy`` (shares
  numpy's memory), gloo's internal buffers, Python objects, and storages
  created before the block (they count neither up nor down).

``host_peak_rss_bytes`` is the process's RSS high-water mark above its value
at the start (Linux ``/proc/self/clear_refs`` + ``VmHWM``; elsewhere a 5 ms
sampler). glibc keeps freed blocks resident unless ``MALLOC_MMAP_THRESHOLD_``
is lowered (the launcher sets 131072), so RSS overstates live bytes otherwise.

`budget` gives a rank a real allocation limit: exceeding it raises the
allocator's own error, which `is_oom` recognises.
"""

from __future__ import annotations

import contextlib
import resource
import threading
import weakref
from dataclasses import asdict, dataclass

import psutil
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = ["PeakMeter", "MemoryResult", "budget", "is_oom", "warm_thread_pools", "prefer_mmap", "OOM_MARKERS"]


@dataclass(frozen=True)
class MemoryResult:
    device_peak_bytes: int
    host_peak_rss_bytes: int
    live_bytes_end: int
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


class _LiveStorageCounter(TorchDispatchMode):
    """Counts live CPU bytes of storages returned by aten ops inside the mode."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        self._lock = threading.Lock()

    def _release(self, key: int) -> None:
        with self._lock:
            nbytes = self._seen.pop(key, 0)
            self.live -= nbytes

    def _storages(self, t):
        """The plain storages behind ``t`` (tensor subclasses unwrapped)."""
        if not isinstance(t, torch.Tensor):
            return
        if is_traceable_wrapper_subclass(t):
            attrs, _ = t.__tensor_flatten__()
            for attr in attrs:
                yield from self._storages(getattr(t, attr))
            return
        if t.device.type != self.device_type:
            return
        try:
            yield t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return

    def _track(self, storage, inputs: set) -> None:
        key = id(storage)
        if key in inputs:  # a view or an in-place result: no new allocation
            return
        nbytes = storage.nbytes()
        with self._lock:
            if key in self._seen:
                return
            self._seen[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(s) for t in tree_leaves((args, kwargs)) for s in self._storages(t)}
        for t in tree_leaves(out):
            for storage in self._storages(t):
                self._track(storage, inputs)
        return out


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(0.005):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss())


class PeakMeter:
    """``with PeakMeter() as m: ...`` then ``m.result()``: this rank's peak memory in the block.

    device: "cpu", "cuda", a torch.device, or None (CUDA if this process has a
    current CUDA device in use, else CPU). See the module docstring for how each
    figure is measured and what the CPU figure misses. Meters nest.
    """

    def __init__(self, device=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
        self.device = torch.device(device)
        self._result: MemoryResult | None = None

    def __enter__(self) -> "PeakMeter":
        self._rss_start = _rss()
        self._hwm_ok = _reset_hwm() and _read_hwm() is not None
        self._sampler = None if self._hwm_ok else _RssSampler()
        if self._sampler:
            self._sampler.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._counter = _LiveStorageCounter(self.device.type)
            self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_start
            live = torch.cuda.memory_allocated(self.device) - self._cuda_start
        else:
            self._counter.__exit__(*exc)
            peak, live = self._counter.peak, self._counter.live
        rss_peak = _read_hwm() if self._hwm_ok else self._sampler.stop()
        self._result = MemoryResult(
            device_peak_bytes=int(max(peak, 0)),
            host_peak_rss_bytes=int(max((rss_peak or 0) - self._rss_start, 0)),
            live_bytes_end=int(live),
            device=str(self.device),
        )

    def result(self) -> MemoryResult:
        if self._result is None:
            raise RuntimeError("PeakMeter.result() is available after the `with` block ends.")
        return self._result

    @property
    def live_bytes(self) -> int:
        """Live bytes counted so far inside the block (CPU meter only)."""
        return self._counter.live


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
    ``nbytes``) / total and restored to 1.0; torch raises `torch.OutOfMemoryError`.
    """
    nbytes = int(nbytes)
    if nbytes <= 0:
        raise ValueError(f"budget needs a positive number of bytes. Received: nbytes={nbytes}.")
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(index) + nbytes) / total)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, index)
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


def prefer_mmap(threshold: int = 131072) -> bool:
    """Make glibc serve allocations >= ``threshold`` bytes with mmap, from now on, in this process.

    Freed large blocks then go back to the OS at once, so RSS and VmData follow
    live memory and a `budget` bites on every large allocation (a heap grown by
    earlier work would otherwise serve it without growing VmData). The same as
    starting the process with ``MALLOC_MMAP_THRESHOLD_``; returns False where
    glibc's ``mallopt`` is not available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
