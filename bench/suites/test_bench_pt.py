"""pytest-benchmark suite: `pytest bench --benchmark-only`.

Times sharded creation and the gather to rank 0 per (size, N) on a World of
ranks kept alive across rounds (the timed call is the ranks' work plus a queue
round trip). Each benchmark records every rank's peak bytes in
``extra_info`` and checks the result after timing. CUDA cases skip unless
this machine has CUDA (several ranks may share one GPU over gloo).
"""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
# One intra-op thread per rank: on a shared machine an OpenMP team whose threads are
# descheduled turns a 0.2 s creation into 1.4 s (measured at N = 1, 2 threads on 2 cores),
# which no time gate can tell from a regression. The ranks read it when they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.harness import ops  # noqa: E402
from bench.gates.memory import HOST_ALLOWANCE_BYTES  # noqa: E402
from shardimpl import launch  # noqa: E402

SIZES_MIB = [16, 64]
RANKS = [1, 2, 4]
TILE_BYTES = 1 << 20
ROUNDS = 5  # the time gate compares minima: more rounds, a steadier minimum


def _cuda_ok():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.fixture(scope="module")
def worlds():
    opened = {}

    def get(ranks, device):
        key = (ranks, device)
        if key not in opened or opened[key].closed:
            opened[key] = launch.World(ranks, device=device, timeout=300).start()
        return opened[key]

    yield get
    for w in opened.values():
        w.close()


def _device_param(device):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA device"))
    return pytest.param(device, marks=marks, id=device)


DEVICES = [_device_param("cpu"), _device_param("cuda")]


def _record(benchmark, rows, size_mib, ranks):
    """extra_info: both meter figures per rank (`python -m bench compare-memory` gates them)."""
    assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"]
    benchmark.extra_info["ranks"] = ranks
    benchmark.extra_info["param_bytes"] = size_mib << 20
    benchmark.extra_info["ideal_bytes"] = (size_mib << 20) / ranks
    benchmark.extra_info["per_rank_peak_bytes"] = [r.value["peak_bytes"] for r in rows]
    benchmark.extra_info["max_peak_bytes"] = max(r.value["peak_bytes"] for r in rows)
    benchmark.extra_info["per_rank_host_peak_bytes"] = [r.value["host_peak_bytes"] for r in rows]
    benchmark.extra_info["max_host_peak_bytes"] = max(r.value["host_peak_bytes"] for r in rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_distribute_sharded(benchmark, worlds, size_mib, ranks, device):
    world = worlds(ranks, device)
    rows = benchmark.pedantic(world.run, args=(ops.distribute_once, size_mib, device),
                              rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(benchmark, rows, size_mib, ranks)
    rows_, cols = ops.variable_shape(size_mib)
    shard = rows_ * math.ceil(cols / ranks) * 4
    for r in rows:  # correctness after timing: one shard per rank, one tile of overhead
        assert r.value["local_bytes"] <= shard
        assert r.value["peak_bytes"] <= shard + TILE_BYTES + (1 << 20)
        host_shard = shard if device == "cpu" else 0  # on CUDA the shard is not on the host
        assert r.value["host_peak_bytes"] <= host_shard + HOST_ALLOWANCE_BYTES, r.value


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_gather_to_rank0(benchmark, worlds, size_mib, ranks, device):
    world = worlds(ranks, device)
    world.run(ops.distribute_once, size_mib, device)
    rows = benchmark.pedantic(world.run, args=(ops.gather_once, size_mib, device),
                              rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(benchmark, rows, size_mib, ranks)
    assert all(r.value["ok"] for r in rows)
    full = size_mib << 20
    assert rows[0].value["peak_bytes"] >= full  # rank 0 holds the whole tensor, others don't
    assert all(r.value["peak_bytes"] < full for r in rows[1:])
    assert rows[0].value["host_peak_bytes"] >= 0.98 * full  # gathered to rank 0's host memory
    assert all(r.value["host_peak_bytes"] < full for r in rows[1:])
