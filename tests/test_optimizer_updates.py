"""The chunked optimizer update of sharded variables (`shardimpl.keras.optimizers`).

Single-process: how variables are cut into groups, which optimizers have a
rule. On 2 CPU ranks (one spawn, `_optim_world.optimizer_world`): every Keras
torch optimizer trained 10 steps with the chunked update equals Keras' own
update (fp32 and mixed_bfloat16), optimizers without a rule take Keras' path,
and the update's scratch is measured against its bound.
"""

from __future__ import annotations

import keras
import pytest

import _optim_world
from _rows import ok_values
from shardimpl import launch
from shardimpl.keras import optimizers

TOLERANCE = 1e-6  # max abs difference over weights and optimizer variables after 10 steps
SCALAR_ALLOWANCE = 4096  # bytes: 0-d tensors (step counters, bias corrections) made during apply


# --- single process --------------------------------------------------------------------------


def test_chunk_groups_cover_every_element_once_in_order_and_respect_the_limit():
    sizes = [(10, 4), (3, 4), (0, 4), (7, 2), (100, 4)]
    groups = optimizers.chunk_groups(sizes, 16)
    seen = {i: [] for i in range(len(sizes))}
    for group in groups:
        assert sum((b - a) * sizes[i][1] for i, a, b in group) <= 16
        for i, a, b in group:
            assert a < b
            seen[i].append((a, b))
    for i, (numel, _) in enumerate(sizes):
        bounds = [0] + [b for _, b in seen[i]]
        assert [a for a, _ in seen[i]] == bounds[:-1]  # each piece starts where the last ended
        assert bounds[-1] == numel
    assert sum(len(g) for g in groups) > len(sizes)  # tensors were cut


def test_a_limit_below_one_element_still_makes_progress():
    groups = optimizers.chunk_groups([(3, 8)], 4)
    assert groups == [[(0, 0, 1)], [(0, 1, 2)], [(0, 2, 3)]]


def test_chunk_bytes_is_a_sixteenth_of_the_update_between_the_floor_and_the_cap():
    MiB = 1 << 20
    assert optimizers.chunk_bytes(1024) == optimizers.MIN_CHUNK_BYTES
    assert optimizers.chunk_bytes(64 * MiB) == 4 * MiB
    assert optimizers.chunk_bytes(1 << 40) == optimizers.MAX_CHUNK_BYTES


def test_every_keras_torch_optimizer_has_a_rule_and_adamw_shares_adams():
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Lion", "Nadam"):
        assert optimizers.rule_for(getattr(keras.optimizers, name)(1e-3)) is not None, name
    assert optimizers.rule_for(keras.optimizers.AdamW(1e-3)) is optimizers.rule_for(keras.optimizers.Adam(1e-3))


def test_optimizers_without_keras_elementwise_update_have_no_rule():
    assert optimizers.rule_for(keras.optimizers.Lamb(1e-3)) is None  # a norm per variable
    assert optimizers.rule_for(_optim_world._optimizer("CustomAdam", {})) is None  # own _parallel_update_step


def test_a_moved_slot_list_fails_loudly_naming_it():
    from shardimpl.keras.compat import optimizer_slot_lists

    with pytest.raises(RuntimeError, match=r"slot lists of Adam.*_no_such_slots"):
        optimizer_slot_lists(keras.optimizers.Adam(1e-3), ("_no_such_slots",))


# --- two ranks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    return ok_values(launch.run(_optim_world.optimizer_world, 2, timeout=600))


CASES = [f"{name}/{policy}" for name in _optim_world.COVERED for policy in _optim_world.POLICIES]
FALLBACK = [f"{name}/{policy}" for name in _optim_world.FALLBACK for policy in _optim_world.POLICIES]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_the_chunked_update_equals_keras_own_update_after_10_steps(world, case):
    for rank in world:
        result = rank["compare"][case]
        assert result["max_abs_diff"] <= TOLERANCE, result
        assert result["weights_moved"] > 100 * TOLERANCE, result  # the comparison is not of untrained weights
        steps = _optim_world.STEPS // (2 if "accumulate" in case else 1)
        assert result["chunked_runs"] == steps, result  # the chunked path did run, once per update
        assert result["chunked_runs_in_keras_own"] == 0, result  # and the reference did not


@pytest.mark.distributed
@pytest.mark.parametrize("case", FALLBACK)
def test_optimizers_without_a_rule_take_keras_own_path(world, case):
    for rank in world:
        result = rank["compare"][case]
        assert result["chunked_runs"] == 0, result
        assert result["max_abs_diff"] <= TOLERANCE, result
        assert result["weights_moved"] > 100 * TOLERANCE, result


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(_optim_world.SCRATCH_CASES))
def test_the_update_allocates_at_most_its_bound_while_keras_own_allocates_whole_model_temporaries(world, case):
    for rank in world:
        s = rank["scratch"][case]
        # chunked: the rule's temporaries, each at most one group (chunk_bytes) of variables
        assert s["chunked"] <= s["bound"] + SCALAR_ALLOWANCE, s
        if case != "sgd-momentum":  # SGD's update is in place in Keras too: nothing to compare
            assert s["bound"] < s["local_bytes"], s
            assert s["keras_own"] >= 2 * s["local_bytes"], s  # the meter does see temporaries


@pytest.mark.distributed
@pytest.mark.parametrize("policy", _optim_world.POLICIES)
def test_a_variable_the_rule_cannot_take_gets_keras_own_update_and_the_rest_stays_chunked(world, policy):
    for rank in world:
        adam = rank["compare"][f"adam-partly-keras/{policy}"]
        assert adam["chunked_runs"] == _optim_world.STEPS and adam["max_abs_diff"] <= TOLERANCE, adam
        nadam = rank["compare"][f"nadam-partly-keras/{policy}"]  # its shared product: all or nothing
        assert nadam["chunked_runs"] == 0 and nadam["max_abs_diff"] <= TOLERANCE, nadam
        assert min(adam["weights_moved"], nadam["weights_moved"]) > 100 * TOLERANCE
