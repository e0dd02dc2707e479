"""The planner's predictions agree with real measurements at small N."""

from __future__ import annotations

import pytest

from bench import plan
from bench.scenarios import Scenario, run_scenario

pytestmark = pytest.mark.distributed
MiB = 1 << 20


def _measured(family, size, n):
    rows = run_scenario(Scenario(family, size, n, "sharded"), timeout=240)
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


def test_params_parse_counts_and_sizes():
    assert plan.parse_params("70B") == 70 * 10**9 * 4
    assert plan.parse_params("350M") == 350 * 10**6 * 4
    assert plan.parse_params("256MiB") == 256 * MiB
    with pytest.raises(ValueError, match="cannot read"):
        plan.parse_params("lots")
