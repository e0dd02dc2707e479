"""Entry points outside Keras' trainer under ModelParallel: direct calls of a model in eager code,
a custom training loop's loss.backward(), and activation layouts ("<layer>/output" in a LayoutMap),
each compared with stock single-process Keras from the same weights."""

from __future__ import annotations

import numpy as np
import pytest

import _keras_world
from _rows import ok_values as _ok
from shardimpl import launch

pytestmark = pytest.mark.distributed

CASES = [("mlp", 2, None, False), ("block", 2, None, True), ("mlp", 4, (2, 2), True)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-N{c[1]}{'-2x2' if c[2] else ''}"
                f"{'-activation-layouts' if c[3] else ''}")
def compared(request):
    kind, n, mesh_shape, activations = request.param
    values = _ok(launch.run(_keras_world.sharded_direct, n, kind, mesh_shape, activations, timeout=300))
    ref = _ok(launch.run(_keras_world.reference_direct, 1, kind, values[0]["initial"], timeout=300))[0]
    return values, ref


def test_a_direct_call_returns_plain_tensors_equal_to_stock_keras(compared):
    values, ref = compared
    for v in values:
        assert v["direct_is_plain"]
        np.testing.assert_allclose(v["direct"], ref["direct"], rtol=1e-5, atol=1e-6)


def test_activation_layouts_are_applied_only_when_asked(compared):
    values, ref = compared
    for v in values:
        if v["activations"]:
            assert any("Shard" in p for p in v["activation_placements"]), v["activation_placements"]
        else:
            assert v["activation_placements"] == []


def test_a_custom_loop_backward_gives_stock_gradients(compared):
    values, ref = compared
    for v in values:
        assert abs(v["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
        assert len(v["grads"]) == len(ref["grads"])
        for got, want in zip(v["grads"], ref["grads"]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_train_and_predict_after_direct_calls_match_stock(compared):
    values, ref = compared
    for v in values:
        np.testing.assert_allclose(v["train"], ref["train"], rtol=1e-5)
        np.testing.assert_allclose(v["predict"], ref["predict"], rtol=1e-4, atol=1e-6)


def test_the_eager_build_fallback_works_on_sharded_variables():
    """Keras builds a model on its first call by tracing on the meta device; when that fails it
    traces eagerly with the real values. Both paths must work on DTensors."""
    values = _ok(launch.run(_keras_world.build_fallback_run, 2, True, timeout=300))
    ref = _ok(launch.run(_keras_world.build_fallback_run, 1, False, values[0]["initial"], timeout=300))[0]
    for v in values:
        assert v["sharded"] >= 3
        np.testing.assert_allclose(v["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(v["direct"], ref["direct"], rtol=1e-5, atol=1e-6)
