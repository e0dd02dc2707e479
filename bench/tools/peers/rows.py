"""Rows a peer returns when it could not measure: one per rank per phase, status error or timeout.

They have the shape of the harness' rows (`bench.harness.scenarios.rows_for`), so the report
shows a failed peer in the table and the verdict instead of dropping it.
"""

from __future__ import annotations

__all__ = ["failed_rows"]


def failed_rows(scenarios, message: str, *, status: str = "error", **fields) -> list[dict]:
    """Rows for ``scenarios`` that did not run, each with ``message`` as its error."""
    from bench.harness.families import exact_param_bytes

    rows = []
    for s in scenarios:
        p = exact_param_bytes(s.family, s.param_bytes)
        phases = ("build", "step") if s.step else ("build",)
        for rank in range(s.ranks):
            for phase in phases:
                rows.append({"family": s.family, "param_bytes": p, "ranks": s.ranks, "rank": rank,
                             "mode": s.mode, "device": s.device, "mesh": "1d",
                             "layouts": getattr(s, "layouts", "family"), "budget_bytes": s.budget_bytes,
                             "status": status, "oom": False, "error": message, "init_seconds": None,
                             "gather_seconds": None, "local_bytes": None, "phase": phase, "peak_bytes": None,
                             "ideal_bytes": p / s.ranks * (2 if phase == "step" else 1), **fields})
    return rows
