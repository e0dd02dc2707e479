"""A sharded Dense call's decisions kept per layer (`shardimpl.keras.dense_plan`) change nothing:
training with them equals training without them, bit for bit (Keras' ``Layer.__call__`` skipped
for planned calls where it would only run the call), and a changed layer is re-planned."""

from __future__ import annotations

import pytest

import _dense_plan_world
from _rows import ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


def test_planned_calls_train_exactly_as_the_full_path_and_a_changed_layer_is_replanned():
    for r in ok_values(launch.run(_dense_plan_world.plans_match_the_full_path, 2, timeout=180)):
        assert r["losses_equal"] and r["weights_equal"], r
        # Every call of the last step is planned, the first layer's on the plain batch too.
        assert r["last_step"] == [("col", True), ("row", True), ("col2", True), ("row_nobias", True)], r
        assert r["last_step_fast"] == [("col", True), ("row", True), ("col2", True), ("row_nobias", False)], r
        assert r["changed_activation_equal"] and r["changed_activation_call_missed"] and r["changed_activation_replanned"], r
        assert r["replaced_kernel_equal"] and r["replaced_kernel_missed"], r
        assert r["new_shape_second_layer_missed"], r
        assert r["grad_input_never_planned"] and r["grad_input_gets_its_gradient"], r
