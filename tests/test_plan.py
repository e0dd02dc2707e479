"""The planner's predictions agree with real measurements at small N, for the step users run."""

from __future__ import annotations

import pytest

from bench.harness.scenarios import Scenario, run_scenario
from bench.harness.training import TrainConfig
from bench.tools import plan

pytestmark = pytest.mark.distributed
MiB = 1 << 20
# The harness' default step with short sequences (the checks need no more), and the step users
# plan with (AdamW, mixed precision, every block rematerialized).
PLAIN = TrainConfig(optimizer="adamw", precision="float32", remat="none", seq=32, batch=8)
REAL = TrainConfig(optimizer="adamw", precision="mixed_bfloat16", remat="full", seq=64, batch=4)


def _measured(family, size, n, mesh=None, train=PLAIN):
    rows = run_scenario(Scenario(family, size, n, "sharded", mesh=mesh, train=train), timeout=400)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    return rows[0].value  # rank 0, as the plan simulates


def _close(row, real, keys=("build_peak_bytes", "step_peak_bytes"), rel=0.05):
    for key in keys:
        assert abs(row[key] - real[key]) <= rel * real[key], (key, row[key], real[key])


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_predicted_build_and_run_peaks_match_measurement_within_5_percent(family):
    size = 16 * MiB
    predicted = plan.plan(family, size, [2, 4], train=PLAIN)
    for row, n in zip(predicted, [2, 4]):
        assert row["step_error"] is None, row["step_error"]
        real = _measured(family, size, n)
        _close(row, real)
        assert row["local_param_bytes"] == real["local_bytes"]
        assert row["model_state_bytes"] == real["model_state_bytes"]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_adamw_mixed_precision_remat_plan_matches_a_real_run_and_zeros_model_state(n):
    """The README's question at small scale: AdamW + mixed_bfloat16 + remat, planned and run."""
    size = 16 * MiB
    row = plan.plan("transformer", size, [n], train=REAL)[0]
    assert row["step_error"] is None, row["step_error"]
    assert (row["optimizer"], row["precision"], row["remat"], row["seq"], row["batch"]) == \
        ("adamw", "mixed_bfloat16", "full", 64, 4)
    real = _measured("transformer", size, n, train=REAL)
    _close(row, real)
    # Weights + gradients + AdamW's moments, float32 under mixed precision: ZeRO's 16 bytes per
    # parameter over N (rank 0 holds the largest, ceil-sized shards).
    assert abs(row["model_state_bytes"] - row["zero_state_bytes"]) <= 0.03 * row["zero_state_bytes"]
    assert row["zero_state_bytes"] == 16 * row["params"] / n


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_2x2_mesh_predictions_match_measurement_within_5_percent(family):
    """FSDP x TP on a (2, 2) ("batch", "model") mesh: build and run peaks, planned and real."""
    size = 16 * MiB
    train = TrainConfig(optimizer="sgd", precision="float32", remat="none", seq=32, batch=8)
    row = plan.plan(family, size, [4], mesh="2x2", train=train)[0]
    assert row["mesh"] == "2x2" and row["step_error"] is None, row["step_error"]
    real = _measured(family, size, 4, mesh=(2, 2), train=train)
    assert row["local_param_bytes"] == real["local_bytes"]
    _close(row, real)
    assert row["build_peak_bytes"] <= 1.25 * row["ideal_bytes"]  # every weight over all 4 ranks


def test_70b_on_a_128x8_mesh_plans_the_step_users_run_near_zeros_bound():
    """Llama 3 70B, AdamW + mixed_bfloat16 + remat, 4096 tokens, one sequence per data rank, on
    128 x 8: the build near P/N, the step runs, the model state at ZeRO's 16 bytes x P/N."""
    row = plan.plan("transformer", plan.parse_params("70B"), [1024], mesh="128x8")[0]
    assert row["step_error"] is None, row["step_error"]
    assert (row["batch"], row["seq"], row["precision"], row["remat"]) == (128, 4096, "mixed_bfloat16", "full")
    assert row["build_peak_bytes"] <= 1.05 * row["ideal_bytes"]
    assert abs(row["model_state_bytes"] - row["zero_state_bytes"]) <= 0.03 * row["zero_state_bytes"]
    assert row["step_peak_bytes"] >= row["model_state_bytes"]
    assert row["host_peak_rss_bytes"] < 4 << 30


def test_a_deep_transformer_extrapolated_from_three_depths_equals_planning_every_block():
    """Blocks are identical: every figure planned at 1, 2 and 3 blocks and extrapolated equals
    the plan of all 16 blocks (1.1B parameters, AdamW + mixed precision + remat, 8 ranks)."""
    train = TrainConfig(optimizer="adamw", precision="mixed_bfloat16", remat="full", seq=128, batch=1)
    size = plan.parse_params("1B")
    deep, full = plan.plan("transformer", size, [8], train=train, jobs=2)[0], \
        plan.plan("transformer", size, [8], train=train, full_depth=True)[0]
    assert deep["depth"]["blocks"] == 16 and deep["depth"]["planned"] == [1, 2, 3] and "depth" not in full
    for key in ("build_peak_bytes", "step_peak_bytes", "model_state_bytes", "local_param_bytes", "activation_bytes"):
        assert abs(deep[key] - full[key]) <= 1e-3 * full[key], (key, deep[key], full[key])


def test_a_step_error_names_its_cause_not_the_last_line():
    try:
        try:
            raise RuntimeError("Cannot unflatten unevenly sharded tensor: size 8 over mesh dimension 0 (size 128)")
        except RuntimeError as inner:
            raise ValueError("Exception encountered when calling Model.call().\n\n• training=None") from inner
    except ValueError as exc:
        text = plan.describe_error(exc)
    assert text.startswith("ValueError: Exception encountered when calling Model.call().")
    assert "Cannot unflatten unevenly sharded tensor" in text and "training=None" not in text


def test_mesh_option_runs_1d_at_every_n_and_each_bxm_once():
    from bench.harness.families import parse_mesh

    assert plan._runs([8, 64], ["1d", "2x4", "128x8"]) == [(8, None), (64, None), (8, (2, 4)), (1024, (128, 8))]
    assert parse_mesh("128x8") == (128, 8) and parse_mesh(None) is None and parse_mesh("1d") is None
    with pytest.raises(ValueError, match="BxM"):
        parse_mesh("128")
    with pytest.raises(ValueError, match="world has 8"):
        parse_mesh("2x2", 8)


def test_the_default_planned_step_is_one_sequence_per_data_rank():
    assert plan.default_train(None).batch == 1 and plan.default_train((128, 8)).batch == 128
    t = plan.default_train((2, 4))
    assert (t.optimizer, t.precision, t.remat, t.seq) == ("adamw", "mixed_bfloat16", "full", 4096)


def test_params_parse_counts_and_sizes():
    assert plan.parse_params("70B") == 70 * 10**9 * 4
    assert plan.parse_params("350M") == 350 * 10**6 * 4
    assert plan.parse_params("256MiB") == 256 * MiB
    with pytest.raises(ValueError, match="cannot read"):
        plan.parse_params("lots")


keras_hub = pytest.importorskip("keras_hub", reason="keras-hub families need keras-hub installed")


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_keras_hub_families_predictions_match_measurement_within_5_percent(family):
    """keras-hub CausalLMs, the LM head in the step (its untied output embedding gets a gradient)."""
    size = 8 * MiB
    row = plan.plan(family, size, [2], train=PLAIN)[0]
    assert row["step_error"] is None, row["step_error"]
    real = _measured(family, size, 2)
    assert row["local_param_bytes"] == real["local_bytes"]
    _close(row, real)
    assert row["model_state_bytes"] == real["model_state_bytes"]
    assert abs(row["model_state_bytes"] - row["zero_state_bytes"]) <= 0.05 * row["zero_state_bytes"]


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_keras_hub_parameter_counts_are_exact(family):
    import keras

    from bench.harness.families import build_model, exact_param_bytes

    keras.distribution.set_distribution(None)
    model = build_model(family, 2 * MiB)
    built = sum(int(v.value.numel()) * 4 for v in model.weights)
    assert exact_param_bytes(family, 2 * MiB) == built


def test_published_presets_have_their_published_sizes():
    from bench.harness.families import exact_param_bytes

    billions = {p: exact_param_bytes(p.split("-")[0].replace("llama3", "llama"), p) / 4e9
                for p in ("llama3-8b", "llama3-70b", "gemma-2b", "gemma-7b")}
    assert round(billions["llama3-8b"], 2) == 8.03 and round(billions["llama3-70b"], 1) == 70.6
    assert round(billions["gemma-2b"], 2) == 2.51 and round(billions["gemma-7b"], 2) == 8.54


def test_rematerialized_blocks_keep_only_their_inputs_when_layers_run_on_local_blocks():
    """keras.RematScope's checkpoint hooks stay in charge of what the local-math paths (Dense,
    attention, RMS norm on local blocks) save: a rematerialized forward keeps under half of what
    a plain one keeps (measured 0.41; 0.69 when the local paths saved their tensors themselves)."""
    kept = {}
    for remat in ("none", "full"):
        train = TrainConfig(optimizer="adamw", precision="mixed_bfloat16", remat=remat, seq=256, batch=4)
        row = plan.plan("transformer", 16 * MiB, [2], train=train)[0]
        assert row["step_error"] is None, row["step_error"]
        kept[remat] = row["activation_bytes"]
    assert kept["full"] < 0.5 * kept["none"], kept
