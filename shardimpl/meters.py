"""Memory meters: the instrument behind every memory claim.

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

Budgets (real allocation limits) live in `shardimpl.budgets`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import asdict, dataclass

import psutil
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = ["PeakMeter", "MemoryResult"]


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
