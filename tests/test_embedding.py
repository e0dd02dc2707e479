"""Embedding lookups on sharded tables, and the torch DTensor defect that made shardimpl do its own."""

from __future__ import annotations

import pytest

import _embedding_world
from _rows import ok_values as _ok
from shardimpl import launch

pytestmark = pytest.mark.distributed


def test_torch_defect_vocab_split_lookup_fails_when_its_output_feeds_two_ops():
    """Pins torch 2.13's defect. When this fails, torch fixed it: the Embedding.call row of
    shardimpl.keras.patches (and shardimpl.embedding) may go."""
    assert _ok(launch.run(_embedding_world.torch_defect, 2, timeout=120)) == ["AssertionError"] * 2


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_lookup_and_table_gradient_match_plain_torch_for_every_table_layout(mesh_shape):
    n = 1
    for s in mesh_shape:
        n *= s
    for rank_result in _ok(launch.run(_embedding_world.lookup_matches_torch, n, mesh_shape, timeout=180)):
        assert len(rank_result) >= 3
        for case, r in rank_result.items():
            assert r["forward"] < 1e-6 and r["grad"] < 1e-5, (case, r)
        vocab = rank_result["vocab"]
        assert vocab["grad_local_numel"] == vocab["table_local_numel"]  # no full-size gradient
