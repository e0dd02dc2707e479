"""FSDP x TP on a (2, 2) ("batch", "model") mesh at N = 4, against stock Keras in one process.

The families' 2-D LayoutMaps shard every large weight over both axes; layers read
weights split along "batch" gathered along it only while they run (`shardimpl.fsdp`).
"""

from __future__ import annotations

import numpy as np
import pytest

import _fsdp_world
from _rows import ok_values as _ok, max_rel_diff as _rel
from shardimpl import launch

pytestmark = pytest.mark.distributed
LOSS_TOL = 1e-5


@pytest.fixture(scope="module", params=["mlp", "transformer"])
def trained(request):
    family = request.param
    values = _ok(launch.run(_fsdp_world.fsdp_run, 4, family, timeout=400))
    ref = _ok(launch.run(_fsdp_world.reference_run, 1, family, values[0]["initial"], timeout=400))[0]
    return family, values, ref


def test_fit_losses_match_stock_keras_within_1e_5(trained):
    family, values, ref = trained
    assert ref["loss"][1] < ref["loss"][0]  # it trains
    for v in values:
        assert v["data_axis"] == "batch"
        assert _rel(v["loss"], ref["loss"]) <= LOSS_TOL, (v["loss"], ref["loss"])
        assert _rel(v["evaluate"], ref["evaluate"]) <= LOSS_TOL, (v["evaluate"], ref["evaluate"])
        np.testing.assert_allclose(v["predict"], ref["predict"], rtol=1e-4, atol=1e-5)


def test_weights_after_fit_match_stock_keras_and_agree_across_ranks(trained):
    family, values, ref = trained
    for v in values:
        for got, want, same in zip(v["weights"], ref["weights"], values[0]["weights"]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(got, same)


def test_custom_loop_gradients_match_and_keep_each_variables_layout(trained):
    family, values, ref = trained
    for v in values:
        assert v["grad_layouts_kept"]  # reduce-scattered (or sliced) back: never left whole
        assert abs(v["loop_loss"] - ref["loop_loss"]) <= LOSS_TOL * abs(ref["loop_loss"])
        for path, g in ref["grads"].items():
            np.testing.assert_allclose(v["grads"][path], g, rtol=1e-4, atol=1e-6, err_msg=path)


def test_every_large_weight_is_split_over_all_four_ranks_and_some_are_gathered(trained):
    family, values, ref = trained
    v = values[0]
    big = {p: (pl, local, full) for p, (pl, local, full) in v["placements"].items() if full >= 1024}
    assert big
    for path, (placements, local, full) in big.items():
        assert "Shard" in placements and placements.count("Shard") == 2, (path, placements)
        assert local <= -(-full // 4) * 1.05, (path, local, full)
    assert v["gathered"], "the 2-D map should leave some kernels to FSDP at this size"
    assert v["optimizer_local"] <= 1.05 * v["optimizer_full"] / 4
    forward, backward, tokens = v["gathers"]
    assert forward >= len(v["gathered"]) and tokens >= 1 and backward == tokens


def test_the_forward_keeps_no_gathered_weight_for_the_backward(trained):
    family, values, ref = trained
    for v in values:
        # The graph of a finished forward holds re-gather tokens, not gathered blocks.
        assert v["gathered_alive_after_forward"] == 0


def test_core_gather_relayout_and_tokens_on_a_2x2_mesh():
    values = _ok(launch.run(_fsdp_world.core_checks, 4, timeout=240))
    for v in values:
        assert v["gathered_ok"] == {"dim0": True, "dim1": True, "dim2": True}
        assert v["grad_layout"] == "(Shard(dim=0), Shard(dim=1))" and v["grad_values"] == [3.0]
        assert v["grad_replicated_layout"] == "(Shard(dim=0), Shard(dim=1))"
        assert v["grad_replicated_values"] == [1.0]
        assert v["relayout_partial"] and v["relayout_shard_move"]
        assert v["tokens"][0] >= 1 and v["tokens"][1] == v["tokens"][0]
        assert v["token_grads_ok"]
