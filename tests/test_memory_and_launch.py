"""The instrument: the CPU peak meter, per-rank budgets, and a launcher that never hangs."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import torch

import _launch_world
from shardimpl import launch
from shardimpl.memory import PeakMeter, budget, is_oom

MiB = 1 << 20


def _within(measured, expected):
    return abs(measured - expected) <= 0.01 * expected + 64 * 1024


def test_meter_reads_a_freed_64_mib_tensor_as_64_mib():
    with PeakMeter("cpu") as m:
        x = torch.empty(64 * MiB, dtype=torch.uint8)
        x.fill_(7)
        del x
    r = m.result()
    assert _within(r.device_peak_bytes, 64 * MiB), r
    assert r.live_bytes_end == 0


def test_meter_counts_outputs_not_views_or_inplace_results():
    base = torch.zeros(4 * MiB, dtype=torch.uint8)
    with PeakMeter("cpu") as m:
        view = base.view(torch.int32)[: MiB // 2]
        base.add_(1)
        base.reshape(-1)
        copy = base.clone()  # the only allocation
    assert _within(m.result().device_peak_bytes, 4 * MiB)
    del view, copy


def test_meter_nested_and_back_to_back_blocks():
    with PeakMeter("cpu") as outer:
        a = torch.empty(16 * MiB, dtype=torch.uint8)
        with PeakMeter("cpu") as inner:
            b = torch.empty(8 * MiB, dtype=torch.uint8)
            del b
        del a
        with PeakMeter("cpu") as second:
            c = torch.empty(32 * MiB, dtype=torch.uint8)
        del c
    assert _within(inner.result().device_peak_bytes, 8 * MiB)
    assert _within(second.result().device_peak_bytes, 32 * MiB)
    assert second.result().live_bytes_end == 32 * MiB  # c was still alive when the block ended
    # outer: a (16) + b (8) at once, later c (32) alone: the peak is 32.
    assert _within(outer.result().device_peak_bytes, 32 * MiB)
    assert outer.result().live_bytes_end == 0


def test_meter_with_no_allocation_reads_zero():
    x = torch.ones(1000)
    with PeakMeter("cpu") as m:
        x.mul_(2)
        _ = x.sum().item()  # a 4-byte scalar is the only output
    assert m.result().device_peak_bytes <= 64


def test_meter_sees_dtensor_local_storage():
    from torch.distributed.tensor import DTensor

    import shardimpl
    from keras.distribution import DeviceMesh, TensorLayout

    layout = TensorLayout((None, "model"), DeviceMesh((1,), ["model"], ["cpu:0"]))
    with PeakMeter("cpu") as m:
        shardimpl.distribute_variable(torch.zeros(0), TensorLayout(("model",), layout.device_mesh))  # empty: no bytes
        w = shardimpl.distribute_variable("zeros", layout, shape=(1024, 1024), dtype="float32")
    assert isinstance(w, DTensor)
    assert _within(m.result().device_peak_bytes, 4 * MiB)


# --- the host figure: every byte the process takes, torch or not ---------------------------


def _host_close(measured, expected):
    """Host readings are page-granular and include the interpreter's own small allocations."""
    return abs(measured - expected) <= 0.02 * expected + MiB


def _c_malloc_filled(nbytes):
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    ptr = libc.malloc(nbytes)
    ctypes.memset(ptr, 1, nbytes)
    libc.free(ptr)


HOST_CASES = {  # name: (make and drop, torch figure expected, host figure expected)
    "torch tensor": (lambda: torch.ones(64 * MiB, dtype=torch.uint8), 64 * MiB, 64 * MiB),
    "numpy array": (lambda: np.ones(64 * MiB, dtype=np.uint8), 0, 64 * MiB),
    "numpy, never written": (lambda: np.empty(64 * MiB, dtype=np.uint8), 0, 64 * MiB),
    "bytes (calloc'd zeros)": (lambda: bytes(64 * MiB), 0, 64 * MiB),
    "bytes, written": (lambda: b"x" * (64 * MiB), 0, 64 * MiB),
    "C malloc, written": (lambda: _c_malloc_filled(64 * MiB), 0, 64 * MiB),
}


@pytest.mark.parametrize("name", sorted(HOST_CASES))
def test_host_figure_sees_torch_numpy_python_and_c_allocations(name):
    make, torch_expected, host_expected = HOST_CASES[name]
    with PeakMeter("cpu") as m:
        x = make()
        del x
    r = m.result()
    print(name, r)
    assert _within(r.device_peak_bytes, torch_expected) or r.device_peak_bytes <= 64 * 1024, r
    assert _host_close(r.host_peak_bytes, host_expected), r
    assert r.host_peak_bytes == max(r.host_resident_peak_bytes, r.host_traced_peak_bytes)


# Above glibc's largest dynamic mmap threshold (32 MiB on 64-bit), an allocation is always fresh
# pages, whatever the process did before. A smaller one may be served from free memory the
# process already has resident (this pytest process can hold tens of MiB of it, `host_blind_bytes`),
# which the resident view cannot see by design: the ranks and the gate rule that out with
# `prefer_mmap`; these in-process checks use sizes that do not depend on it.
ALWAYS_FRESH = 48 * MiB


def _fresh_size():
    """An allocation size no free memory of this process can serve: the resident view must see it."""
    with PeakMeter("cpu", trace_python=False) as m:
        pass
    blind = m.result().host_blind_bytes or 0
    return max(ALWAYS_FRESH, (blind // MiB + 16) * MiB)


def test_host_views_say_what_each_saw():
    size = _fresh_size()
    with PeakMeter("cpu") as m:
        x = np.empty(64 * MiB, dtype=np.uint8)  # allocated, never touched: traced only
        del x
        _c_malloc_filled(size)  # touched, outside Python's allocators: resident only
    r = m.result()
    assert _host_close(r.host_traced_peak_bytes, 64 * MiB), r
    assert _host_close(r.host_resident_peak_bytes, size), r
    assert r.host_blind_bytes is not None and r.host_blind_bytes >= 0


def test_host_figure_without_tracing_is_the_resident_view():
    size = _fresh_size()
    with PeakMeter("cpu", trace_python=False) as m:
        x = np.ones(size, dtype=np.uint8)
        del x
    r = m.result()
    assert r.host_traced_peak_bytes is None
    assert _host_close(r.host_peak_bytes, size) and r.host_peak_bytes == r.host_resident_peak_bytes


def test_nested_meters_outer_keeps_the_peak_before_the_inner_one():
    """Each meter used to reset the process's peak counter on entry: an outer meter around a
    64 MiB allocation then read 32 MiB once an inner meter had opened."""
    with PeakMeter("cpu") as outer:
        a = np.ones(64 * MiB, dtype=np.uint8)
        del a
        with PeakMeter("cpu") as inner:
            b = torch.ones(32 * MiB, dtype=torch.uint8)
            del b
        c = bytes(8 * MiB)
        del c
    o, i = outer.result(), inner.result()
    assert _host_close(o.host_peak_bytes, 64 * MiB), o
    assert _host_close(o.host_resident_peak_bytes, 64 * MiB), o
    assert _host_close(i.host_peak_bytes, 32 * MiB), i
    assert _within(o.device_peak_bytes, 32 * MiB) and _within(i.device_peak_bytes, 32 * MiB)


def test_nested_meters_inner_peak_reaches_the_outer_one():
    with PeakMeter("cpu") as outer:
        with PeakMeter("cpu") as inner:
            x = np.ones(48 * MiB, dtype=np.uint8)
            del x
        y = np.ones(8 * MiB, dtype=np.uint8)
        del y
    assert _host_close(inner.result().host_peak_bytes, 48 * MiB)
    assert _host_close(outer.result().host_peak_bytes, 48 * MiB)


def test_host_figure_sees_other_threads_and_overlapping_meters():
    import threading

    started, release = threading.Event(), threading.Event()

    def worker():
        with PeakMeter("cpu") as m:
            started.set()
            release.wait(30)
        worker.result = m.result()

    t = threading.Thread(target=worker)
    t.start()
    started.wait(30)
    with PeakMeter("cpu") as mine:  # opens after the worker's, closes before it: not nested
        x = np.ones(40 * MiB, dtype=np.uint8)  # this thread's allocation, inside both blocks
        del x
    release.set()
    t.join(30)
    assert _host_close(mine.result().host_peak_bytes, 40 * MiB)
    assert _host_close(worker.result.host_peak_bytes, 40 * MiB)


STOP_RACE_REPS = 1000  # 4 ranks: the unsafe stop crashed 2 of 5 launches at 300 blocks, 4 of 4 at 2,000


def test_meter_in_gloo_ranks_survives_collectives_finishing_as_a_block_ends():
    rows = launch.run(_launch_world.metered_collectives, 4, STOP_RACE_REPS, timeout=240)
    assert [r.status for r in rows] == ["ok"] * 4, [r.error for r in rows]
    for r in rows:
        v = r.value
        assert v["left_on"] == (not v["safe_here"]), v  # tracing stays on only where stopping could crash
        assert v["traced"] is not None and _host_close(v["traced"], 8 * MiB), v
        if v["safe_here"]:
            assert _host_close(v["default"], 8 * MiB), v
        else:  # by default a meter does not start what it could not stop
            assert v["default"] is None, v


def test_meter_stops_tracing_in_a_process_without_torch_threads():
    import tracemalloc

    assert not tracemalloc.is_tracing()
    with PeakMeter("cpu"):
        assert tracemalloc.is_tracing()
    assert not tracemalloc.is_tracing()


def test_meter_result_before_exit_is_an_error():
    m = PeakMeter("cpu")
    with pytest.raises(RuntimeError, match="after the `with` block"):
        m.result()


def test_budget_refuses_twice_its_size_and_is_recognised_as_oom():
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with pytest.raises(Exception) as info:
        with budget(64 * MiB):
            torch.empty(128 * MiB, dtype=torch.uint8).fill_(1)
    assert is_oom(info.value), info.value
    assert resource.getrlimit(resource.RLIMIT_DATA) == before


def test_budget_allows_what_fits_and_restores_the_limit():
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with budget(96 * MiB):
        assert resource.getrlimit(resource.RLIMIT_DATA)[0] != before[0]
        x = torch.empty(48 * MiB, dtype=torch.uint8)
        x.fill_(1)
        del x
    assert resource.getrlimit(resource.RLIMIT_DATA) == before


def test_is_oom_tells_oom_from_other_errors():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(MemoryError())
    wrapped = RuntimeError("layer build failed")
    wrapped.__cause__ = MemoryError()
    assert is_oom(wrapped)
    assert not is_oom(ValueError("shape mismatch"))
    with pytest.raises(ValueError, match="positive number of bytes"):
        with budget(0):
            pass


# --- the launcher -----------------------------------------------------------------------


def test_launcher_all_ranks_ok_in_rank_order():
    rows = launch.run(_launch_world.rank_and_world, 3, "t", timeout=60)
    assert [r.rank for r in rows] == [0, 1, 2]
    assert [r.status for r in rows] == ["ok"] * 3
    assert [r.value for r in rows] == [("t", 0, 3), ("t", 1, 3), ("t", 2, 3)]


def test_launcher_reports_a_raising_rank_and_stops_the_waiting_ones():
    start = time.monotonic()
    rows = launch.run(_launch_world.rank_one_raises, 3, timeout=60)
    assert time.monotonic() - start < 30
    assert rows[1].status == "error" and "rank one refuses" in rows[1].error
    assert all(r.status == "error" for r in rows)  # the others fail in the barrier or are stopped


def test_launcher_reports_oom_under_a_budget():
    rows = launch.run(_launch_world.rank_one_overallocates, 2, 256 * MiB, timeout=60, budget_bytes=128 * MiB)
    assert rows[0].status == "ok" and rows[0].value == "fine"
    assert rows[1].status == "oom", rows[1]
    assert "can't allocate memory" in rows[1].error


def test_launcher_times_out_a_sleeping_rank_and_returns_promptly():
    timeout = 4.0
    start = time.monotonic()
    rows = launch.run(_launch_world.rank_zero_sleeps, 2, 120, timeout=timeout)
    elapsed = time.monotonic() - start
    assert rows[0].status == "timeout"
    assert rows[1].status == "ok" and rows[1].value == "awake"
    assert elapsed <= timeout + 15


def test_launcher_reports_a_rank_that_dies_without_a_word():
    rows = launch.run(_launch_world.rank_dies_hard, 2, timeout=60)
    assert rows[1].status == "error" and "exit code 3" in rows[1].error
    assert rows[0].status == "error"


def test_launcher_refuses_bad_arguments():
    with pytest.raises(ValueError, match="nprocs must be >= 1"):
        launch.run(_launch_world.rank_and_world, 0, "t")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        launch.run(_launch_world.rank_and_world, 1, "t", device="tpu")


def test_world_keeps_ranks_between_calls_and_closes_after_a_failure():
    with launch.World(2, timeout=60) as world:
        first = world.run(_launch_world.rank_and_world, "a")
        second = world.run(_launch_world.rank_and_world, "b")
        pids = world.run(_launch_world.pid)
        again = world.run(_launch_world.pid)
        assert [r.value for r in first] == [("a", 0, 2), ("a", 1, 2)]
        assert [r.value for r in second] == [("b", 0, 2), ("b", 1, 2)]
        assert [r.value for r in pids] == [r.value for r in again]  # the same processes
        failed = world.run(_launch_world.rank_one_raises)
        assert failed[1].status == "error"
        with pytest.raises(RuntimeError, match="World is closed"):
            world.run(_launch_world.rank_and_world, "c")
