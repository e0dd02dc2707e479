"""`shardimpl.local_views`: the cached to_local / from_local give the gradients DTensor's own give,
layouts and values, including a transposed local gradient and Partial layouts."""

from __future__ import annotations

import pytest

import _local_views_world
from _rows import ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


def test_cached_local_views_give_dtensors_own_gradients():
    for r in ok_values(launch.run(_local_views_world.views_match_dtensor, 2, timeout=120)):
        for case in ("to_local/default", "to_local/given", "to_local/transposed", "from_local/same",
                     "from_local/other", "partial_forward_sums"):
            assert r[case] is True, (case, r)
        assert r["transposed_gradients_seen"] == 1  # the computed transposed case took the strided path
        for case in ("outside_autograd_grad_sees_it", "one_leaf_per_parameter", "leaf_gradient_in_parameter_layout",
                     "leaf_and_dtensor_uses_accumulate", "replaced_local_tensor_new_leaf",
                     "leaf_sees_in_place_updates"):
            assert r[case] is True, (case, r)
        assert "pass shape=" in r["missing_shape_error"]


def test_sum_partial_sums_as_dtensor_does_and_to_local_takes_a_dtensor_gradient():
    for r in ok_values(launch.run(_local_views_world.sum_partial_matches_dtensor, 2, timeout=120)):
        assert r == {"values": True, "gradients": True, "unsummed_is_itself": True, "dtensor_gradient": True}, r
