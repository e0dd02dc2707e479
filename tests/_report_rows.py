"""Synthetic results.json rows shaped like the main job's, for the report tests (no ranks)."""

from __future__ import annotations

MiB = 1 << 20


TRAIN = {"optimizer": "adamw", "precision": "float32", "remat": "none", "seq": 128, "batch": 8}
STATE = 4  # AdamW in float32: weights + gradients + two moments = 4 x P


def _peak(mode, p, n, phase):
    if phase == "step":
        return STATE * p if mode == "unsharded" else STATE * p // n + 64 * 1024
    return int(1.5 * p) if mode == "unsharded" else p // n + MiB


def job_rows(*, families=("mlp",), sizes_mib=(16, 64), ranks=(1, 2, 4), budget_mib=48, step=True,
             extra=None):
    """Rows of a run: every (family, size, N, mode) unbudgeted, then the largest size under the
    budget (stock Keras OOMs everywhere, sharded fits where P/N + 1 MiB fits). ``extra(row)``
    may return fields to add to each row (e.g. the future host_peak_bytes)."""
    rows = []

    def add(fam, p, n, mode, budget, phases):
        oom = bool(budget) and _peak(mode, p, n, "build") > budget
        for rank in range(n):
            base = {"family": fam, "param_bytes": p, "params": p // 4, "ranks": n, "rank": rank, "mode": mode,
                    "device": "cpu", **TRAIN,
                    "budget_bytes": budget, "status": "oom" if oom else "ok", "oom": oom,
                    "error": "DefaultCPUAllocator: can't allocate memory" if oom else None,
                    "init_seconds": None if oom else 0.1 * (rank + 1),
                    "gather_seconds": None if oom or mode == "unsharded" else 0.05,
                    "local_bytes": None if oom else p // n}
            for phase in phases:
                row = {**base, "phase": phase, "peak_bytes": None if oom else _peak(mode, p, n, phase),
                       "ideal_bytes": (STATE if phase == "step" else 1) * p / n}
                if extra:
                    row.update(extra(row))
                rows.append(row)

    for fam in families:
        for size in sizes_mib:
            for n in ranks:
                for mode in ("unsharded", "sharded"):
                    add(fam, size * MiB, n, mode, None, ("build", "step") if step else ("build",))
        if budget_mib:
            for n in ranks:
                for mode in ("unsharded", "sharded"):
                    add(fam, max(sizes_mib) * MiB, n, mode, budget_mib * MiB, ("build",))
    return rows


def meta(budget_mib=48):
    return {"torch": "2.13.0+cpu", "keras": "3.15.1", "numpy": "2.4", "python": "3.11.7", "device": "cpu",
            "machine": {"platform": "Linux", "processor": "x86_64", "cpu_model": "test CPU", "cpus": 2,
                        "memory_bytes": 24 << 30},
            "budget_bytes": budget_mib * MiB if budget_mib else None, "command": "python -m bench --quick",
            "wall_seconds": 12.5, "load_average": [0.5, 0.4, 0.3], "started": "2025-01-01 00:00:00 UTC"}
