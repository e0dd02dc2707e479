"""Sharded creation and gather on real worlds of N = 1, 2, 3, 4 CPU ranks over gloo.

One world per N answers every case (`_core_world.everything`); each test below
pins one behaviour down from that world's answers.
"""

from __future__ import annotations

import math

import pytest

import _core_world
from shardimpl import launch
from shardimpl.initializers import SCRATCH_BYTES

pytestmark = pytest.mark.distributed

WORLD_SIZES = [1, 2, 3, 4]
# A 16 MiB float32 variable: large against the 1 MiB tile and the 1 MiB allowance.
ROWS, COLS = 1024, 4096
FULL_BYTES = ROWS * COLS * 4
MiB = 1 << 20


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"N{n}")
def world(request):
    n = request.param
    rows = launch.run(_core_world.everything, n, ROWS, COLS, timeout=240)
    bad = [r for r in rows if r.status != "ok"]
    assert not bad, f"ranks failed at N={n}: " + "\n".join(f"rank {r.rank}: {r.status}\n{r.error}" for r in bad)
    return n, [r.value for r in rows]


def test_gather_roundtrip_is_exact_for_dtypes_layouts_and_initializers(world):
    n, values = world
    for rank, value in enumerate(values):
        failed = [case for case, ok in value["roundtrip"].items() if not ok]
        assert not failed, f"N={n} rank {rank}: inexact round trips: {failed[:10]}"
        assert len(value["roundtrip"]) > 200


def test_local_shards_follow_torch_chunk_with_uneven_and_empty_tail(world):
    n, values = world
    chunk = math.ceil(5 / n)
    expected = [max(0, min(chunk, 5 - r * chunk)) for r in range(n)]
    assert [v["local_shape"] for v in values] == [(e, 7) for e in expected]


def test_shards_match_torch_distribute_tensor(world):
    n, values = world
    for value in values:
        assert value["dtensor"] and all(value["dtensor"].values()), value["dtensor"]


def test_replicated_and_unseeded_values_agree_across_ranks(world):
    n, values = world
    first = values[0]["replicated"]
    for value in values[1:]:
        assert value["replicated"] == first


def test_creation_peak_is_one_shard_plus_one_tile(world):
    """Peak live bytes creating an F-byte variable: shard <= peak <= shard + one tile + 1 MiB.

    The shard is F/N for even splits; for uneven ones the largest is
    ceil(dim / N) rows or columns, which is what the bound uses.
    """
    n, values = world
    tile_bytes = SCRATCH_BYTES  # the initializer's host scratch (was one float32 tile)
    largest = {"dim0": math.ceil(ROWS / n) * COLS * 4, "dim1": ROWS * math.ceil(COLS / n) * 4}
    for rank, value in enumerate(values):
        for case, (peak, local_bytes) in value["memory"].items():
            shard_bound = largest[case.split("/")[0]]
            assert FULL_BYTES - (n - 1) * shard_bound <= local_bytes <= shard_bound, (case, local_bytes)
            assert peak >= local_bytes, (case, peak, local_bytes)
            assert peak <= shard_bound + tile_bytes + MiB, (
                f"N={n} rank {rank} {case}: peak {peak / MiB:.2f} MiB > shard "
                f"{shard_bound / MiB:.2f} MiB + tile + 1 MiB"
            )


def test_dst_gather_allocates_full_size_on_destination_only(world):
    n, values = world
    assert values[0]["dst"]["got_full"] and values[0]["dst"]["correct"]
    assert values[0]["dst"]["peak"] >= FULL_BYTES
    for value in values[1:]:
        assert not value["dst"]["got_full"]
        assert value["dst"]["peak"] < FULL_BYTES / n, value["dst"]


def test_creation_issues_no_collective_and_gather_one_broadcast_per_shard(world):
    n, values = world
    for value in values:
        create, gather, replicated, by_op = value["comm"]
        assert create == 0
        if n == 1:
            assert gather == 0, by_op  # one rank: a local copy, nothing to agree on
        else:
            # (64, 8) on dim 0: every rank owns a non-empty shard, one broadcast each,
            # after one 72-byte all-reduce where the ranks agree (shardimpl.agree).
            assert by_op == {"broadcast_": n, "allreduce_": 1}, by_op
            assert gather == n + 1
        assert replicated == 0


def test_mesh_size_different_from_world_size_is_refused(world):
    n, values = world
    for value in values:
        msg = value["errors"]
        assert msg is not None and "world size" in msg and "'w'" in msg


def test_point_to_point_reshard_is_exact_and_never_holds_the_full_tensor(world):
    n, values = world
    for value in values:
        for case, (exact, peak, full_bytes) in value["reshard"].items():
            assert exact, case
            if n > 1 and full_bytes >= 1 << 20:
                # output shard + outgoing blocks + receive buffers: about 3 shards, never the whole.
                assert peak <= 3.2 * full_bytes / n, (case, peak, full_bytes)


@pytest.mark.parametrize("world", [4], indirect=True, ids=["N4"])
def test_2x2_mesh_dims_on_different_axes_and_one_dim_on_both(world):
    n, values = world
    rows_per_rank = []
    for value in values:
        cases = value["mesh2x2"]
        rows_per_rank.append(cases.pop("both_axes/local_rows"))
        assert all(cases.values()), cases
    # 9 rows split over 2 (batch) then 2 (model): 5 -> 3 + 2, 4 -> 2 + 2.
    assert rows_per_rank == [(3, 3), (2, 3), (2, 3), (2, 3)]
