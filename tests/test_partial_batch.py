"""Batches the data axis does not divide: the last partial batch, a batch smaller than the data axis.

On DataParallel (2 ranks) and on a (2, 2) ("batch", "model") mesh with every kernel split along
"batch" (FSDP x TP), fit/evaluate/predict on 7 samples with batch_size 2 end on a batch of 1;
such a batch runs replicated (`shardimpl.keras.steps.splits_evenly`) and every result equals
stock Keras in one process from the same weights. `predict` over several split batches (which
hung before its outputs were gathered in the step) is covered too.
"""

from __future__ import annotations

import numpy as np
import pytest

import _partial_batch_world as world
from _rows import ok_values as _ok, max_rel_diff as _rel
from shardimpl import launch

LOSS_TOL = 1e-5
PRED_TOL = 1e-5


@pytest.fixture(scope="module", params=[("data_parallel", 2), ("fsdp_tp", 4)], ids=lambda p: p[0])
def runs(request):
    setup, n = request.param
    values = _ok(launch.run(world.sharded_run, n, setup, timeout=300))
    ref = _ok(launch.run(world.reference_run, 1, values[0]["initial"], timeout=300))[0]
    return setup, values, ref


def _same_logs(got, want, what):
    """Keras' logs (a list of losses/metrics, or a History dict of lists) within LOSS_TOL."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), what
        for key in want:
            _same_logs(got[key], want[key], f"{what}[{key}]")
        return
    assert np.shape(got) == np.shape(want), (what, got, want)
    assert _rel(got, want) <= LOSS_TOL, (what, got, want)


def _same_predictions(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)  # the same number of rows
    np.testing.assert_allclose(got, want, rtol=PRED_TOL, atol=PRED_TOL, err_msg=what)


@pytest.mark.distributed
def test_only_batches_the_data_axis_divides_are_split(runs):
    setup, values, ref = runs
    for v in values:
        assert v["data_axis"] == "batch"
        sizes = {size for size, _ in v["steps"]}
        assert {1, 2, 3} <= sizes  # the world ran partial, single and full batches
        for size, split in v["steps"]:
            assert split == (size % 2 == 0), (size, split)
    if setup == "fsdp_tp":  # every kernel split along "batch": gathered while its layer runs
        assert {"dense_a/kernel", "dense_b/kernel", "head/kernel"} <= set(values[0]["split_weights"])


@pytest.mark.distributed
def test_fit_and_evaluate_with_a_last_batch_of_one_match_stock_keras(runs):
    setup, values, ref = runs
    for v in values:
        for key in ("fit", "fit_weighted", "evaluate", "evaluate_weighted", "fit_even"):
            _same_logs(v[key], ref[key], key)
    assert ref["fit"]["loss"][1] < ref["fit"]["loss"][0]  # it trains


@pytest.mark.distributed
def test_predict_with_a_last_batch_of_one_matches_stock_keras_row_for_row(runs):
    setup, values, ref = runs
    for v in values:
        for key in ("predict", "predict_after"):
            assert len(v[key]) == world.SAMPLES
            _same_predictions(v[key], ref[key], key)


@pytest.mark.distributed
def test_single_batches_smaller_than_or_not_a_multiple_of_the_data_axis_match_stock_keras(runs):
    setup, values, ref = runs
    for v in values:
        for key in ("evaluate_1", "train_on_batch_1", "test_on_batch_3"):
            _same_logs(v[key], ref[key], key)
        for key in ("predict_1", "predict_on_batch_3"):
            _same_predictions(v[key], ref[key], key)


@pytest.mark.distributed
def test_direct_calls_with_an_odd_batch_match_stock_keras(runs):
    setup, values, ref = runs
    for v in values:
        _same_predictions(v["direct_3"], ref["direct_3"], "direct_3")
        _same_predictions(v["direct_1"], ref["direct_1"], "direct_1")


@pytest.mark.distributed
def test_weights_after_training_match_stock_keras_and_agree_across_ranks(runs):
    setup, values, ref = runs
    for v in values:
        for got, want, same in zip(v["weights"], ref["weights"], values[0]["weights"]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(got, same)


def test_splits_evenly_reads_dim_0_of_every_array_and_skips_scalars():
    import torch

    from shardimpl.keras.steps import splits_evenly

    x, y = np.zeros((4, 3)), torch.zeros(4, 2)
    assert splits_evenly((x, y, None), 2)
    assert not splits_evenly((x, torch.zeros(3, 2)), 2)  # one array is enough to replicate
    assert not splits_evenly({"ids": np.zeros((1, 5))}, 2)  # a batch smaller than the data axis
    assert splits_evenly((x, np.float32(1.0), torch.tensor(2.0)), 4)
