"""The planner's predictions agree with real measurements at small N."""

from __future__ import annotations

import pytest

from bench.tools import plan
from bench.harness.scenarios import Scenario, run_scenario

pytestmark = pytest.mark.distributed
MiB = 1 << 20


def _measured(family, size, n, mesh=None):
    rows = run_scenario(Scenario(family, size, n, "sharded", mesh=mesh), timeout=400)
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    return rows[0].value  # rank 0, as the plan simulates


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_predicted_build_peak_matches_measurement_within_5_percent(family):
    size = 16 * MiB
    predicted = plan.plan(family, size, [2, 4])
    for row, n in zip(predicted, [2, 4]):
        real = _measured(family, size, n)
        assert abs(row["build_peak_bytes"] - real["build_peak_bytes"]) <= 0.05 * real["build_peak_bytes"], (
            n, row["build_peak_bytes"], real["build_peak_bytes"])
        assert row["local_param_bytes"] == real["local_bytes"]


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_predicted_step_peak_matches_measurement_within_5_percent(family):
    size = 16 * MiB
    row = plan.plan(family, size, [2])[0]
    real = _measured(family, size, 2)
    assert abs(row["step_peak_bytes"] - real["step_peak_bytes"]) <= 0.05 * real["step_peak_bytes"]
    # Gradients and momentum stay sharded (the embedding's included): about 2 x P/N.
    assert real["step_peak_bytes"] <= 1.1 * 2 * row["param_bytes"] / 2


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_2x2_mesh_predictions_match_measurement_within_5_percent(family):
    """FSDP x TP on a (2, 2) ("batch", "model") mesh: build and step peaks, planned and real."""
    size = 16 * MiB
    row = plan.plan(family, size, [4], mesh="2x2")[0]
    assert row["mesh"] == "2x2" and row["step_error"] is None, row["step_error"]
    real = _measured(family, size, 4, mesh=(2, 2))
    assert row["local_param_bytes"] == real["local_bytes"]
    for key in ("build_peak_bytes", "step_peak_bytes"):
        assert abs(row[key] - real[key]) <= 0.05 * real[key], (key, row[key], real[key])
    # Every weight over all 4 ranks: the build near P/N; the step within its derived bound.
    assert row["build_peak_bytes"] <= 1.25 * row["ideal_bytes"]
    assert row["step_peak_bytes"] <= plan.step_bound(row), (row["step_peak_bytes"], plan.step_bound(row))


def test_70b_on_a_128x8_mesh_plans_in_under_a_minute_near_p_over_n():
    """N = 1024 as 128 x 8: build <= 1.05 P/N; the step within 2 x trainable share + 2 x the largest
    gathered block + activations (`plan.step_bound`), which here is under 8 x P/N."""
    row = plan.plan("transformer", plan.parse_params("70B"), [1024], mesh="128x8")[0]
    assert row["step_error"] is None, row["step_error"]
    ideal = row["ideal_bytes"]
    assert row["build_peak_bytes"] <= 1.05 * ideal
    assert row["step_peak_bytes"] <= plan.step_bound(row)
    assert row["step_peak_bytes"] <= 8 * ideal, row["step_peak_bytes"] / ideal
    assert row["seconds"] < 60 and row["host_peak_rss_bytes"] < 4 << 30


def test_mesh_option_runs_1d_at_every_n_and_each_bxm_once():
    from bench.harness.families import parse_mesh

    assert plan._runs([8, 64], ["1d", "2x4", "128x8"]) == [(8, None), (64, None), (8, (2, 4)), (1024, (128, 8))]
    assert parse_mesh("128x8") == (128, 8) and parse_mesh(None) is None and parse_mesh("1d") is None
    with pytest.raises(ValueError, match="BxM"):
        parse_mesh("128")
    with pytest.raises(ValueError, match="world has 8"):
        parse_mesh("2x2", 8)


def test_params_parse_counts_and_sizes():
    assert plan.parse_params("70B") == 70 * 10**9 * 4
    assert plan.parse_params("350M") == 350 * 10**6 * 4
    assert plan.parse_params("256MiB") == 256 * MiB
    with pytest.raises(ValueError, match="cannot read"):
        plan.parse_params("lots")


keras_hub = pytest.importorskip("keras_hub", reason="keras-hub families need keras-hub installed")


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_keras_hub_families_predictions_match_measurement_within_5_percent(family):
    size = 8 * MiB
    row = plan.plan(family, size, [2])[0]
    assert row["step_error"] is None, row["step_error"]
    real = _measured(family, size, 2)
    assert row["local_param_bytes"] == real["local_bytes"]
    for key in ("build_peak_bytes", "step_peak_bytes"):
        assert abs(row[key] - real[key]) <= 0.05 * real[key], (key, row[key], real[key])


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
