"""A sharded layer's einsum on local blocks (`shardimpl.tp_einsum`): equal to torch on the whole
tensors for every layout row it takes, None for the rest, and one all-reduce for two
column-parallel layers that read the same input."""

from __future__ import annotations

import numpy as np
import pytest

import _tp_einsum_world
from _rows import max_rel_diff, ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 1)])
def test_local_einsum_equals_the_whole_einsum_with_the_layouts_collectives(mesh_shape):
    for r in ok_values(launch.run(_tp_einsum_world.local_einsum_matches_whole, 2, mesh_shape, timeout=120)):
        for case in ("column", "row", "data", "replicated", "whole_input_row", "partial_input"):
            assert max(r[case][k] for k in ("y", "gx", "gw")) < 1e-4, (case, r[case])
        assert r["column"]["placements"] == "S(2)" and r["row"]["placements"] == "P(sum)"
        assert r["data"]["placements"] == "S(0)" and r["replicated"]["placements"] == "R"
        # Megatron's f, once for both layers reading the input; none for the other rows
        # (full_tensor's gathers in the check are all-gathers, not counted).
        assert r["column"]["backward_all_reduces"] == 1
        assert r["row"]["backward_all_reduces"] == 0 and r["replicated"]["backward_all_reduces"] == 0
        assert r["whole_input_row"]["placements"] == "P(sum)" and r["partial_input"]["placements"] == "S(2)"
        assert r["unsupported"] is None


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_sharded_training_equals_stock_keras_with_the_hand_written_steps_collectives(family):
    size = 1 << 20
    sharded = ok_values(launch.run(_tp_einsum_world.keras_steps, 2, family, size, True, 3, timeout=240))
    stock = ok_values(launch.run(_tp_einsum_world.keras_steps, 1, family, size, False, 3, sharded[0]["initial"],
                                 timeout=240))[0]
    reference = ok_values(launch.run(_tp_einsum_world.reference_ops, 2, family, size, timeout=240))[0]
    assert stock["losses"][-1] < stock["losses"][0]
    for r in sharded:
        assert max_rel_diff(r["losses"], stock["losses"]) <= 1e-5, (r["losses"], stock["losses"])
        # The layers' math on local blocks: exactly the all-reduces a hand-written step issues.
        assert r["ops"]["collectives"] == reference["collectives"], (r["ops"], reference)


def test_dense_bias_and_activation_run_on_local_blocks():
    """Column- and row-split Dense with bias and relu: no DTensor dispatch for the adds or the
    activations (forward or backward), the output as numpy computes it on the whole weights."""
    for r in ok_values(launch.run(_tp_einsum_world.dense_bias_and_activation_on_local_blocks, 2, timeout=120)):
        assert r["dispatches"] == [], r["dispatches"]
        assert r["max_abs"] < 1e-5, r
        assert r["bias_grads"] == [True, True]


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)])
def test_attention_einsums_split_alike_run_on_local_blocks_without_collectives(mesh_shape):
    n = 2 if mesh_shape == (2,) else 4
    for r in ok_values(launch.run(_tp_einsum_world.batched_einsum_matches_whole, n, mesh_shape, timeout=120)):
        scores, values = r["btnh,bsnh->bnts"], r["bnts,bsnh->btnh"]
        for case in (scores, values):
            assert max(case["y"], case["ga"], case["gb"]) < 1e-4, case
            assert case["collectives"] == 0, case  # none forward, none backward
        # Split by heads (and by batch on the 2-D mesh), the output keeps the split.
        assert scores["placements"][-1] == "S(1)" and values["placements"][-1] == "S(2)"
        if mesh_shape == (2, 2):
            assert scores["placements"][0] == "S(0)" and values["placements"][0] == "S(0)"
        assert r["different_letters"] is None


def test_matmul_with_a_sharded_kernel_trains_as_stock_keras_with_megatrons_f():
    sharded = ok_values(launch.run(_tp_einsum_world.matmul_layer_steps, 2, True, timeout=180))
    stock = ok_values(launch.run(_tp_einsum_world.matmul_layer_steps, 1, False, sharded[0]["initial"],
                                 timeout=180))[0]
    assert stock["losses"][-1] < stock["losses"][0]
    for r in sharded:
        assert max_rel_diff(r["losses"], stock["losses"]) <= 1e-5, (r["losses"], stock["losses"])
        for got, want in zip(r["weights"], stock["weights"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert r["placements"] == ["S(1)"]  # the output split as the kernel's columns, never gathered
        # One step: the mean squared error of the split output (one all-reduce of a float per row,
        # `vocab_parallel.mean_over_vocabulary`) and Megatron's f on the matmul's input (one).
        assert r["all_reduces"] == 2, r
