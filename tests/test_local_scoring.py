"""Losses and metrics of replicated outputs in plain torch, vocabulary-split mean errors from each
rank's block, and GroupQueryAttention's repeat on local blocks: all equal to stock Keras."""

from __future__ import annotations

import numpy as np
import pytest

import _local_scoring_world as world
from _rows import ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


def _close(a, b, tol=1e-5):
    return all(np.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("last_layout,loss,loss_saw", [
    ("row", "mse", ["Tensor"]),  # a replicated output: the loss gets plain tensors
    ("row", "mae", ["Tensor"]),
    ("column", "mse", ["DTensor"]),  # split along the last dim: the vocabulary-split mean error
    ("column", "mae", ["DTensor"]),
])
def test_scoring_equals_stock_keras_without_dtensor_dispatches_in_the_loss(last_layout, loss, loss_saw):
    ranks = ok_values(launch.run(world.train, 2, last_layout, loss, True, timeout=240))
    stock = ok_values(launch.run(world.train, 1, last_layout, loss, False, ranks[0]["initial"], timeout=240))[0]
    for r in ranks:
        assert r["loss_saw"] == loss_saw
        assert r["loss_dtensor_dispatches"] and not any(r["loss_dtensor_dispatches"]), r["loss_dtensor_dispatches"]
        assert np.allclose(r["losses"], stock["losses"], rtol=1e-5), (r["losses"], stock["losses"])
        assert np.allclose(r["mae"], stock["mae"], rtol=1e-5)
        assert r["evaluate"].keys() == stock["evaluate"].keys()
        assert np.allclose(list(r["evaluate"].values()), list(stock["evaluate"].values()), rtol=1e-5)
        assert _close(r["weights"], stock["weights"])


def test_repeat_of_a_split_dtensor_runs_on_local_blocks_and_equals_keras():
    for r in ok_values(launch.run(world.repeat_matches_keras, 2, timeout=120)):
        for name in ("heads_split", "replicated", "other_dim_split"):
            assert r[name]["values"] and r[name]["gradients"], (name, r[name])
        assert r["heads_split"]["placements"] == ["S(2)"] and r["heads_split"]["dtensor_dispatches"] == 0
        assert r["replicated"]["dtensor_dispatches"] == 0 and r["other_dim_split"]["dtensor_dispatches"] == 0
        assert r["partial"]["values"] and r["partial"]["dtensor_dispatches"] > 0  # a sum: Keras' own repeat
