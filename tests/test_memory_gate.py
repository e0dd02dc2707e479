"""The CI memory gate: sharded builds stay near P/N on both meters, and the budget separates the modes.

Thresholds live in `bench.gates.memory` (documented there, from measured figures). The
mutation kit (`_gate_mutations.MUTATIONS`) plants regressions of the creation
path inside the ranks; the clean tree and every mutation run in one world per
N (one spawn each), and each mutation must fail the gate.
"""

from __future__ import annotations

import pytest

from _gate_mutations import MUTATIONS
from bench.gates import memory as gate

pytestmark = pytest.mark.distributed

MiB = 1 << 20

# Criteria that must catch each mutation (others may fire too).
EXPECTED = {
    "torch full-then-slice": {"torch-peak", "host-peak"},
    "numpy full-then-slice": {"host-peak"},
    "bytes buffer held": {"host-peak"},
    "small variable full copy": {"host-peak"},
    "extra shard clone": {"torch-peak", "host-peak"},
    "C malloc full buffer": {"host-peak"},
}


@pytest.fixture(scope="module")
def kit():
    # The clean tree runs every criterion; the mutations the builds the peak criteria read
    # (N = 2 and 4, no budget): one spawn per N for all of them.
    return gate.run_gate_variants({"clean": None, **MUTATIONS}, device="cpu", peaks_only=set(MUTATIONS))


def _figures(runs) -> str:
    cells = []
    for run in runs:
        if run.mode == "sharded" and not run.budget_bytes and run.peaks():
            cells.append(f"N={run.ranks} {max(run.peaks()) / MiB:.2f}/{max(run.host_peaks()) / MiB:.2f}")
    return ", ".join(cells)


def test_mutation_kit_table(kit):
    """The table: variant -> criteria that fired -> worst rank's torch/host peak (MiB) per N."""
    lines = ["| variant | caught by | worst rank torch/host peak MiB |", "|---|---|---|"]
    for name, (violations, runs) in kit.items():
        lines.append(f"| {name} | {', '.join(gate.caught_by(violations)) or 'passes'} | {_figures(runs)} |")
    print("\n" + "\n".join(lines))
    assert set(kit) == {"clean", *MUTATIONS}


def test_gate_passes_on_the_sharded_creation_path(kit):
    violations, runs = kit["clean"]
    print(gate.report(runs))
    assert not violations, "\n".join(violations)
    # What the gate stands on: the budget refused stock Keras and admitted shardimpl.
    by_key = {(r.ranks, r.mode, bool(r.budget_bytes)): r for r in runs}
    assert by_key[(2, "unsharded", True)].any_oom()
    assert not by_key[(2, "sharded", True)].any_oom() and not by_key[(4, "sharded", True)].any_oom()
    assert len(by_key[(4, "sharded", False)].peaks()) == 4 == len(by_key[(4, "sharded", False)].host_peaks())


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_gate_fails_on_each_planted_regression(kit, name):
    violations, runs = kit[name]
    caught = set(gate.caught_by(violations))
    assert EXPECTED[name] <= caught, (name, violations)
    assert "rank-failed" not in caught, violations
