"""Cross-entropy on vocabulary-split logits: equal to torch's on the whole logits, and never
making them whole (`shardimpl.vocab_parallel`, `shardimpl.keras.losses`)."""

from __future__ import annotations

import numpy as np
import pytest

import _vocab_parallel_world
from _rows import max_rel_diff, ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_loss_and_gradient_equal_torch_on_the_whole_logits_and_keep_only_the_local_block(mesh_shape):
    n = int(np.prod(mesh_shape))
    for r in ok_values(launch.run(_vocab_parallel_world.cross_entropy_matches_torch, n, mesh_shape, timeout=180)):
        for case in ("vocab16-float32", "vocab7-float32"):  # 7 over 2 ranks: uneven blocks
            assert r[case]["loss"] < 1e-5 and r[case]["grad"] < 1e-6, (case, r[case])
        for case in ("vocab16-bfloat16", "vocab7-bfloat16"):  # bfloat16 logits, float32 math
            assert r[case]["loss"] < 1e-5 and r[case]["grad"] < 1e-2, (case, r[case])
        assert all(r[c]["grad_placements_kept"] for c in r if c.startswith("vocab"))
        assert "Replicate" in r["vocab16-float32"]["loss_placements"]
        # Kept for backward: the local block's exponentials (float32), not the whole logits.
        assert r["kept_bytes"] <= 1.1 * r["local_logits_bytes"] < r["whole_logits_bytes"], r
        assert r["not_split"] is None and "split along their last dim" in r["error"]


def test_a_vocabulary_split_lm_head_trains_as_stock_keras():
    sharded = ok_values(launch.run(_vocab_parallel_world.keras_transformer_losses, 2, True, timeout=300))
    stock = ok_values(launch.run(_vocab_parallel_world.keras_transformer_losses, 1, False, sharded[0]["initial"],
                                 timeout=300))[0]
    assert stock["losses"][-1] < stock["losses"][0]  # it trains
    assert stock["vocab_parallel_calls"] == 0
    for r in sharded:
        assert r["vocab_parallel_calls"] == 3  # one per step: the loss took the vocabulary-parallel path
        assert max_rel_diff(r["losses"], stock["losses"]) <= 1e-5, (r["losses"], stock["losses"])
        for got, want in zip(r["weights"], stock["weights"]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_argmax_over_split_logits_equals_torch_and_gathers_two_numbers_per_position(mesh_shape):
    for r in ok_values(launch.run(_vocab_parallel_world.argmax_matches_torch, int(np.prod(mesh_shape)), mesh_shape,
                                  timeout=180)):
        for case in ("vocab16-float32", "vocab7-float32", "vocab16-bfloat16", "vocab7-bfloat16"):
            assert r[case]["equal"], (case, r)  # ties across blocks and NaN included; 7 over 2: uneven
            assert r[case]["dtype"] == "torch.int32" and "Replicate" in r[case]["placements"]
        # 8 x 64 positions: (value, index) as float64 from each of the 2 vocabulary ranks; the
        # 2 x 2 mesh's batch split halves the positions. The logits themselves: 2 MiB.
        positions = 8 * 64 // (2 if len(mesh_shape) == 2 else 1)
        assert r["gathered_bytes"] == 2 * positions * 2 * 8, r
        assert "split along their last dim" in r["error"]
