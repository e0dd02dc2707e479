"""The CI memory gate: sharded builds stay near P/N, and the budget separates the modes.

Thresholds live in `bench.gate` (documented there, from measured figures).
"""

from __future__ import annotations

import pytest

from bench import gate

pytestmark = pytest.mark.distributed


def test_gate_passes_on_the_sharded_creation_path():
    violations, runs = gate.run_gate(device="cpu")
    print(gate.report(runs))
    assert not violations, "\n".join(violations)
    # What the gate stands on: the budget refused stock Keras and admitted shardimpl.
    by_key = {(r.ranks, r.mode, bool(r.budget_bytes)): r for r in runs}
    assert by_key[(2, "unsharded", True)].any_oom()
    assert not by_key[(2, "sharded", True)].any_oom() and not by_key[(4, "sharded", True)].any_oom()
    assert len(by_key[(4, "sharded", False)].peaks()) == 4


def test_gate_fails_when_creation_materializes_full_tensors():
    violations, runs = gate.run_gate(device="cpu", regress=True)
    print(gate.report(runs))
    for n in (2, 4):
        # The peak criterion catches it on every rank of N = 2 and 4 ...
        caught = [v for v in violations if v.startswith(f"N={n} rank ") and "sharded build peak" in v]
        assert len(caught) == n, violations
        # ... and so does the budget criterion.
        assert any(v.startswith(f"N={n}: the sharded build ran out of memory") for v in violations), violations
