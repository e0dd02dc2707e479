"""ModelParallel on Keras' torch backend, end to end, on N = 2 and 4 CPU ranks.

Sharded runs are compared with the same model trained unsharded by stock Keras
in one process from the same initial weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import _keras_world
from _rows import ok_values as _ok, max_rel_diff as _rel
from shardimpl import launch

pytestmark = pytest.mark.distributed
RTOL = 1e-5


def _same_weights(a, b, atol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="module", params=[("mlp", 2), ("mlp", 4), ("block", 2), ("block", 4)],
                ids=lambda p: f"{p[0]}-N{p[1]}")
def trained(request):
    kind, n = request.param
    values = _ok(launch.run(_keras_world.sharded_train, n, kind, timeout=240))
    ref = _ok(launch.run(_keras_world.reference_train, 1, kind, values[0]["initial"], timeout=240))[0]
    return kind, n, values, ref


def test_train_on_batch_losses_match_unsharded_keras(trained):
    kind, n, values, ref = trained
    for v in values:
        assert _rel(v["losses"], ref["losses"]) <= RTOL, (v["losses"], ref["losses"])
    assert ref["losses"][2] < ref["losses"][0]  # it trains


def test_predict_matches_unsharded_keras(trained):
    kind, n, values, ref = trained
    for v in values:
        np.testing.assert_allclose(v["pred"], ref["pred"], rtol=1e-4, atol=1e-5)


def test_get_weights_are_full_and_identical_on_every_rank(trained):
    kind, n, values, ref = trained
    for v in values[1:]:
        _same_weights(v["weights"], values[0]["weights"])
    for got, want in zip(values[0]["weights"], ref["weights"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_layout_map_shards_model_and_optimizer_variables(trained):
    kind, n, values, ref = trained
    v = values[0]
    assert v["sharded_variables"] >= 4
    if kind == "mlp":  # every variable sharded: model + Adam slots hold 1/N per rank
        assert v["local_bytes"] <= 1.05 * v["full_bytes"] / n, (v["local_bytes"], v["full_bytes"])


@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_fit_on_numpy_with_a_model_only_mesh_matches_unsharded(kind):
    values = _ok(launch.run(_keras_world.sharded_fit, 2, kind, timeout=240))
    ref = _ok(launch.run(_keras_world.reference_fit, 1, kind, values[0]["initial"], timeout=240))[0]
    for v in values:
        assert v["data_axis"] is None  # every rank sees the whole batch
        assert _rel(v["loss"], ref["loss"]) <= RTOL, (v["loss"], ref["loss"])
        _same_weights(v["weights"], values[0]["weights"])
        assert v["shuffled_loss"] == values[0]["shuffled_loss"]  # ranks saw the same batches
        assert v["evaluate"] == values[0]["evaluate"]


def test_fit_on_a_2x2_batch_model_mesh_splits_batches_and_matches_unsharded():
    values = _ok(launch.run(_keras_world.sharded_fit, 4, "mlp", (2, 2), timeout=240))
    ref = _ok(launch.run(_keras_world.reference_fit, 1, "mlp", values[0]["initial"], timeout=240))[0]
    for v in values:
        assert v["data_axis"] == "batch"
        assert _rel(v["loss"], ref["loss"]) <= RTOL, (v["loss"], ref["loss"])
        _same_weights(v["weights"], values[0]["weights"])


def test_data_parallel_replicates_variables_splits_batches_and_matches_unsharded():
    values = _ok(launch.run(_keras_world.data_parallel_fit, 2, "mlp", timeout=240))
    ref = _ok(launch.run(_keras_world.reference_fit, 1, "mlp", values[0]["initial"], timeout=240))[0]
    for v in values:
        assert v["data_axis"] == "batch" and v["replicated"]
        assert _rel(v["loss"], ref["loss"]) <= RTOL, (v["loss"], ref["loss"])
        _same_weights(v["weights"], values[0]["weights"])


def test_fit_on_a_pydataset_with_a_model_only_mesh():
    values = _ok(launch.run(_keras_world.sharded_fit_pydataset, 2, "mlp", timeout=240))
    assert values[0]["loss"] == values[1]["loss"]
    assert values[0]["loss"][1] < values[0]["loss"][0]
    _same_weights(values[0]["weights"], values[1]["weights"])


def test_save_on_2_load_unsharded_and_on_4(tmp_path):
    saved = _ok(launch.run(_keras_world.save_sharded, 2, "mlp", str(tmp_path), timeout=240))
    assert [v["wrote"] for v in saved] == [[True, True], [False, False]]
    assert saved[1]["files"] == ["model.keras", "model.weights.h5"]  # nothing else left behind
    single = _ok(launch.run(_keras_world.load_unsharded, 1, "mlp", str(tmp_path), timeout=240))[0]
    _same_weights(single["weights"], saved[0]["weights"])
    _same_weights(single["whole"], saved[0]["weights"])
    four = _ok(launch.run(_keras_world.load_sharded, 4, "mlp", str(tmp_path), timeout=240))
    for v in four:
        assert v["whole_is_sharded"]
        _same_weights(v["weights"], saved[0]["weights"])
        _same_weights(v["whole"], saved[0]["weights"])
