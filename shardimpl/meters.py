"""Memory meters: the instrument behind every memory claim.

``with PeakMeter() as m: ...`` gives, for this process, two figures for the
block (both the peak above the value at entry):

**The torch-allocator figure** ``device_peak_bytes``: the peak of live bytes
that torch's allocator handed out.

* CUDA: the caching allocator's ``max_memory_allocated`` (exact for torch
  tensors on the GPU).
* CPU: torch has no CPU allocator statistics, so a `TorchDispatchMode` sees
  every aten op; each new storage an op returns (DTensor and other subclasses
  unwrapped to their local tensors) is added to the live count, and a weak
  reference callback subtracts it when the storage is freed. Exact (to the
  byte) for what it sees; it misses everything allocated outside aten ops:
  numpy arrays, ``torch.from_numpy``, Python objects, gloo's buffers, C
  extensions, and storages created before the block.

**The host figure** ``host_peak_bytes``: how much more memory the whole
process took, whoever allocated it. It is the larger of two views, each a
lower bound on the process's true extra memory, so their maximum is too:

* *resident* (``host_resident_peak_bytes``): the kernel's resident-set
  high-water mark (``VmHWM`` in ``/proc/self/status``, reset by writing 5 to
  ``/proc/self/clear_refs``) above the resident size at entry. The kernel
  maintains it on every unmap, so a peak between two readings is never lost;
  it counts every thread and every allocator (torch, numpy, Python, C
  extensions, heap and mmap alike). It counts bytes when first *touched*, in
  4 KiB pages (2 MiB on transparent huge pages): memory allocated but never
  written (``np.empty``, ``bytes(n)`` and ``np.zeros`` get untouched
  ``calloc`` pages) is not resident and not counted. It also counts code and
  data pages faulted in for the first time (a lazy import, a kernel's first
  use): warm up before metering. An allocation served from memory already
  resident and free at entry does not raise it: ``host_blind_bytes`` is that
  amount (glibc ``mallinfo2().fordblks``, free bytes in malloc's arenas), and
  the meter makes glibc serve every block >= 128 KiB with its own mapping
  (`shardimpl.budgets.prefer_mmap`) so that only smaller ones can hide there.
* *traced* (``host_traced_peak_bytes``): `tracemalloc`'s peak above its value
  at entry: every block allocated through Python's allocators (objects,
  ``bytes``, ``bytearray``, ``ctypes`` buffers) and numpy's data buffers
  (numpy reports them to tracemalloc), *allocated*, touched or not, exact to
  the byte. It misses torch storages (the torch figure has them) and C code
  that calls ``malloc`` directly (the resident view has those once touched).
  tracemalloc slows Python's allocations while a meter is open (a 1 MiB
  Keras build, where Python's work dominates, took 1.5x to 3.6x as long;
  large tensors' time is not affected); ``trace_python=False`` turns this
  view off. On Python before 3.12.9 / 3.13.2, in a process where torch's C++
  threads can take the GIL (torch.distributed or CUDA initialized), stopping
  tracemalloc can crash the process (CPython gh-128679,
  `_stopping_tracemalloc_is_safe`): there a meter traces only when asked
  (``trace_python=True``), and the last one leaves tracemalloc running.

What no view sees: bytes that are allocated outside Python's allocators and
outside torch and never written (they occupy no memory, but ``RLIMIT_DATA``
budgets count them), and allocations under 128 KiB served from
``host_blind_bytes``.

On CUDA the torch figure is the device's; the host figure is the same.

Meters nest (also across threads): the high-water counters are process-wide,
so one registry owns them. Whenever a meter opens or closes, the registry reads
each counter, hands the reading to every open meter that uses it (each keeps
its maximum) and only then resets the counter for the newcomer. An outer meter
therefore sees the peaks of the blocks inside it.

Budgets (real allocation limits) live in `shardimpl.budgets`.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import tracemalloc
import weakref
from dataclasses import asdict, dataclass

import psutil
import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = ["PeakMeter", "MemoryResult"]


@dataclass(frozen=True)
class MemoryResult:
    """One block's peaks, in bytes above the values at entry (see the module docstring)."""

    device_peak_bytes: int  # torch's allocator: CPU storages from aten ops, or CUDA's caching allocator
    host_peak_bytes: int  # max(host_resident_peak_bytes, host_traced_peak_bytes)
    host_resident_peak_bytes: int  # resident-set high-water (touched pages, any allocator)
    host_traced_peak_bytes: int | None  # tracemalloc (Python objects, numpy buffers); None if off
    host_blind_bytes: int | None  # free bytes in malloc's arenas at entry (glibc only, else None)
    live_bytes_end: int  # torch-allocator bytes still live when the block ended
    device: str

    @property
    def host_peak_rss_bytes(self) -> int:
        """The former name of `host_resident_peak_bytes`."""
        return self.host_resident_peak_bytes

    def as_dict(self) -> dict:
        return asdict(self)


class _LiveStorageCounter(TorchDispatchMode):
    """Counts live CPU bytes of storages returned by aten ops inside the mode."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.peak_since_mark = 0
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
            self.peak_since_mark = max(self.peak_since_mark, self.live)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(s) for t in tree_leaves((args, kwargs)) for s in self._storages(t)}
        for t in tree_leaves(out):
            for storage in self._storages(t):
                self._track(storage, inputs)
        return out


# --- process-wide high-water counters -------------------------------------------------------


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the resident-set high-water mark to the current size
    except OSError:
        return False
    return _status_bytes("VmHWM:") is not None


class _Resident:
    """The resident-set high-water mark: the kernel's VmHWM, or a 2 ms sampler elsewhere."""

    key = "resident"

    def __init__(self):
        self._kernel = _clear_refs_works()
        self._sampled = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def current() -> int:
        if (rss := _status_bytes("VmRSS:")) is not None:
            return rss
        return psutil.Process().memory_info().rss

    def peak(self) -> int:
        if self._kernel:
            return max(_status_bytes("VmHWM:") or 0, self.current())
        return max(self._sampled, self.current())

    def reset(self) -> None:
        if self._kernel:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._sampled = self.current()

    def _sample(self):
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, self.current())

    def open(self) -> None:  # first meter in: start the sampler where the kernel keeps no mark
        if not self._kernel:
            self._stop.clear()
            self._sampled = self.current()
            self._thread = threading.Thread(target=self._sample, daemon=True, name="shardimpl-rss")
            self._thread.start()

    def close(self) -> None:  # last meter out
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def _stopping_tracemalloc_is_safe() -> bool:
    """Whether ``tracemalloc.stop()`` cannot crash this process now.

    Before CPython 3.12.9 / 3.13.2 (gh-128679), a thread that enters tracemalloc's
    raw-allocator hook without the GIL and then waits for it reads freed tables
    if another thread stops tracing meanwhile: a segfault. torch's C++ threads do
    exactly that when they drop the last reference to a tensor Python knows: a
    gloo worker thread destroying a finished collective's work (measured: 4 gloo
    ranks, 2,000 metered all-gathers each, every launch of four segfaulted); NCCL's
    and CUDA autograd's threads free tensors too (not measured: no GPU here).
    Without torch.distributed (other than the thread-less "fake" backend) and
    CUDA, no such thread runs.
    """
    version = sys.version_info[:3]
    if version >= (3, 13, 2) or (3, 12, 9) <= version < (3, 13, 0):
        return True
    import torch.distributed as dist

    threads_take_the_gil = dist.is_available() and dist.is_initialized() and dist.get_backend() != "fake"
    return not threads_take_the_gil and not torch.cuda.is_initialized()


class _Traced:
    """tracemalloc's traced bytes: started by the first meter that wants it, stopped by the last
    where stopping is safe (`_stopping_tracemalloc_is_safe`); elsewhere it stays on for the
    rest of the process (Python's allocations stay slower), and later meters reuse it.
    """

    key = "traced"

    def __init__(self):
        self._started_here = False

    @staticmethod
    def current() -> int:
        return tracemalloc.get_traced_memory()[0]

    @staticmethod
    def peak() -> int:
        return tracemalloc.get_traced_memory()[1]

    @staticmethod
    def reset() -> None:
        tracemalloc.reset_peak()

    def open(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(1)
            self._started_here = True

    def close(self) -> None:
        if self._started_here and _stopping_tracemalloc_is_safe():
            tracemalloc.stop()
        self._started_here = False


class _Cuda:
    """One CUDA device's caching-allocator peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.key = ("cuda", device.index)

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Registry:
    """The open meters and the counters they share (one per process)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.sources: dict = {}
        self.users: dict = {}  # source key -> {meter id: [start, peak]}

    def _fold(self, key) -> None:
        """Hand the counter's reading to every open meter that uses it."""
        users = self.users.get(key)
        if users:
            reading = self.sources[key].peak()
            for marks in users.values():
                marks[1] = max(marks[1], reading)

    def enter(self, meter_id: int, sources) -> None:
        with self.lock:
            for src in sources:
                self.sources.setdefault(src.key, src)
                users = self.users.setdefault(src.key, {})
                if not users:
                    src.open()
                self._fold(src.key)  # the outer meters keep what happened up to now ...
                src.reset()  # ... before the counter restarts for the newcomer
                start = src.current()
                users[meter_id] = [start, start]

    def exit(self, meter_id: int, keys) -> dict:
        """{key: (start, peak)} for this meter; the counters stay as they are for the others."""
        out = {}
        with self.lock:
            for key in keys:
                self._fold(key)
                start, peak = self.users[key].pop(meter_id)
                out[key] = (start, peak)
                if not self.users[key]:
                    self.sources[key].close()
        return out


_REGISTRY = _Registry()
_RESIDENT = _Resident()
_TRACED = _Traced()
_CUDA: dict = {}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_free_bytes() -> int | None:
    """Free bytes held in glibc malloc's arenas (reusable without new pages), or None."""
    from shardimpl.glibc import libc

    try:
        fn = libc().mallinfo2
    except AttributeError:  # no C library, or glibc older than 2.33
        return None
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def _fake_mode_active() -> bool:
    """Under a FakeTensorMode (planning) nothing real is allocated: tracing would only slow it."""
    try:
        from torch._guards import detect_fake_mode

        return detect_fake_mode() is not None
    except Exception:
        return False


_warmed = False


def _warm_once() -> None:
    """Pay, outside any block, what a first metered block would otherwise count: the first
    `TorchDispatchMode` imports torch._dynamo (about 200 modules, 50 MiB resident)."""
    global _warmed
    if not _warmed:
        with _LiveStorageCounter("cpu"):
            (torch.ones(4) + 1).sum()
        _warmed = True


class PeakMeter:
    """``with PeakMeter() as m: ...`` then ``m.result()``: this process's peak memory in the block.

    device: "cpu", "cuda", a torch.device, or None (CUDA if this process has a
    current CUDA device in use, else CPU): where the torch-allocator figure is
    read. trace_python: also run tracemalloc inside the block (the traced host
    view; skipped under a FakeTensorMode, where nothing real is allocated).
    None (the default) traces where tracemalloc can be stopped safely again
    (`_stopping_tracemalloc_is_safe`): everywhere on Python >= 3.12.9, and on
    older Pythons only in processes without torch.distributed or CUDA. True
    there too makes the last meter leave tracemalloc running, and Python's
    allocations slower, for the rest of the process. The module docstring says
    how each figure is measured and what it misses. Meters nest, also across
    threads. Entering makes glibc serve blocks >= 128 KiB with their own
    mappings from then on (`prefer_mmap`).
    """

    def __init__(self, device=None, *, trace_python: bool | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.trace_python = None if trace_python is None else bool(trace_python)
        self._result: MemoryResult | None = None
        self._counter = None

    def _sources(self):
        trace = _stopping_tracemalloc_is_safe() if self.trace_python is None else self.trace_python
        sources = [_RESIDENT] + ([_TRACED] if trace and not _fake_mode_active() else [])
        if self.device.type == "cuda":
            sources.append(_CUDA.setdefault(self.device.index, _Cuda(self.device)))
        return sources

    def __enter__(self) -> "PeakMeter":
        from shardimpl.budgets import prefer_mmap

        prefer_mmap()
        _warm_once()
        self._blind = _malloc_free_bytes()
        self._keys = [s.key for s in self._sources()]
        _REGISTRY.enter(id(self), self._sources())
        if self.device.type != "cuda":
            self._counter = _LiveStorageCounter(self.device.type)
            self._counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._counter is not None:
            self._counter.__exit__(*exc)
        marks = _REGISTRY.exit(id(self), self._keys)
        rise = {key: max(peak - start, 0) for key, (start, peak) in marks.items()}
        if self.device.type == "cuda":
            start, _ = marks[("cuda", self.device.index)]
            device_peak = rise[("cuda", self.device.index)]
            live = _CUDA[self.device.index].current() - start
        else:
            device_peak, live = self._counter.peak, self._counter.live
        traced = rise.get("traced")
        self._result = MemoryResult(
            device_peak_bytes=int(max(device_peak, 0)),
            host_peak_bytes=int(max(rise["resident"], traced or 0)),
            host_resident_peak_bytes=int(rise["resident"]),
            host_traced_peak_bytes=None if traced is None else int(traced),
            host_blind_bytes=self._blind,
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

    def mark(self) -> None:
        """Start a sub-interval of the block: `peak_since_mark` restarts from the live bytes now
        (CPU meter only). A planner reads each phase of a step this way, in one meter."""
        with self._counter._lock:
            self._counter.peak_since_mark = self._counter.live

    @property
    def peak_since_mark(self) -> int:
        """The highest live bytes counted inside the block since the last `mark` (or the entry)."""
        return self._counter.peak_since_mark
