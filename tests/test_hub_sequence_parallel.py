"""keras-hub backbones under the hub families' sequence-parallel maps, against stock Keras.

`bench.harness.hub_families.hub_layout_map(..., seq=)` keeps keras-hub's weight layouts and
splits the residual stream along the sequence (Megatron's sequence parallelism). The map itself
(no ranks); then Gemma and Llama 3 on a (1, 2) mesh and Gemma on a (2, 2) mesh: train steps,
predict and greedy generate() against stock single-process Keras from the same initial
weights, and where the stream lives. Skipped where keras-hub is not installed (see
tests/test_keras_hub.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras_hub", reason="keras-hub is not installed (see the README's keras-hub section)")
pytest.importorskip("grain", reason="keras-hub's predict needs grain (pip install -e '.[hub]')")

import _hub_sp_world  # noqa: E402
from _rows import ok_values as _ok, run_once_more_after_a_native_crash  # noqa: E402
from bench.harness.hub_families import HUB_FAMILIES, hub_layout_map  # noqa: E402
from shardimpl import launch  # noqa: E402

#: family -> (a row-split layer's output, a norm's output feeding column-split layers, the final norm's output)
OUTPUTS = {"gemma": ("decoder_block_3/ffw_linear/output", "decoder_block_0/pre_ffw_norm/output",
                     "final_normalization/output"),
           "llama": ("transformer_layer_3/self_attention/attention_output/output",
                     "transformer_layer_1/feedforward_layernorm/output", "sequence_output_layernorm/output")}


def _mesh(batch, model):
    import keras

    return keras.distribution.DeviceMesh((batch, model), ["batch", "model"], [f"cpu:{i}" for i in range(batch * model)])


def _activation_keys(layout_map):
    """The map's rules for layer outputs (activation layouts)."""
    return [k for k in layout_map if k.rstrip("$").endswith("/output")]


@pytest.mark.parametrize("family", sorted(HUB_FAMILIES))
def test_the_map_splits_the_stream_only_where_the_sequence_divides_over_model(family):
    import keras_hub

    row_output, norm_output, final_norm_output = OUTPUTS[family]
    mesh = _mesh(2, 2)
    split = hub_layout_map(family, mesh, seq=12, batch=4)
    assert split[row_output].axes == ("batch", "model", None)
    assert split[norm_output].axes == split[final_norm_output].axes == ("batch", None, None)
    assert hub_layout_map(family, mesh, seq=12, batch=3)[row_output].axes == (None, "model", None)  # 3 rows over 2
    assert split["token_embedding/output"] is None  # the same layer computes the logits (reverse=True)
    assert hub_layout_map(family, _mesh(1, 2), seq=12)[row_output].axes == (None, "model", None)
    for whole in (hub_layout_map(family, mesh), hub_layout_map(family, mesh, seq=13),
                  hub_layout_map(family, _mesh(2, 1), seq=12)):  # no seq; 13 tokens over 2; one model rank
        assert not _activation_keys(whole)
    own = getattr(keras_hub.models, HUB_FAMILIES[family][0]).get_layout_map(mesh)
    for key in own:  # keras-hub's own weight layouts kept
        assert split[key].axes == own[key].axes, key


@pytest.fixture(scope="module", params=[((1, 2), ["gemma", "llama3"]), ((2, 2), ["gemma"])],
                ids=["1x2-gemma-llama3", "2x2-gemma"])
def runs(request):
    mesh_shape, names = request.param
    n = mesh_shape[0] * mesh_shape[1]
    sharded = _ok(run_once_more_after_a_native_crash(launch.run, _hub_sp_world.sharded_many, n, names, mesh_shape,
                                                     timeout=900))
    initials = {name: sharded[0][name]["initial"] for name in names}
    ref = _ok(launch.run(_hub_sp_world.reference_many, 1, initials, timeout=900))[0]
    return mesh_shape, names, sharded, ref


@pytest.mark.distributed
def test_train_losses_equal_stock_keras(runs):
    _, names, sharded, ref = runs
    for rank in sharded:
        for name in names:
            np.testing.assert_allclose(rank[name]["train"], ref[name]["train"], rtol=1e-5, atol=0)
            assert rank[name]["train"][-1] < rank[name]["train"][0]  # it trains


@pytest.mark.distributed
def test_predict_and_greedy_generate_match_stock_keras(runs):
    _, names, sharded, ref = runs
    for rank in sharded:
        for name in names:
            np.testing.assert_allclose(rank[name]["predict"], ref[name]["predict"], rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(rank[name]["generate"], ref[name]["generate"])


@pytest.mark.distributed
def test_the_stream_is_split_along_the_sequence_and_gathered_before_attention(runs):
    mesh_shape, names, sharded, _ = runs
    batch = ["S(0)"] if mesh_shape[0] > 1 else []  # the batch dim split along "batch" where it has ranks
    for rank in sharded:
        for name in names:
            seen = rank[name]["placements"]
            assert seen["block"] == batch + ["S(1)"], (name, seen)  # a block's output: 1/M of the tokens
            assert seen["norm"] == batch + ["S(1)"], (name, seen)  # the norm runs on its tokens
            assert seen["query_input"] == batch + ["R"], (name, seen)  # all-gathered for attention
