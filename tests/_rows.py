"""Reading the launcher's rows in tests: every rank's value, or one failure naming each bad rank."""

from __future__ import annotations

import numpy as np


def ok_values(rows):
    """Each rank's value; fails the test with every failing rank's status and error."""
    bad = [r for r in rows if r.status != "ok"]
    assert not bad, "\n".join(f"rank {r.rank}: {r.status}\n{r.error}" for r in bad)
    return [r.value for r in rows]


def max_rel_diff(a, b):
    """Largest elementwise |a - b| / |b| (|b| floored at 1e-6), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))
