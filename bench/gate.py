"""The memory regression gate: fail when full-tensor materialization comes back.

A fixed Keras model (one dominant kernel, a smaller one, biases) is built on
N in {1, 2, 4} ranks with shardimpl and, for contrast, with stock Keras. The
gate fails when

1. a rank's sharded build peak exceeds ``PEAK_FACTOR x P/N + ALLOWANCE_BYTES``;
2. the unsharded build under ``BUDGET_FRACTION x P`` per rank does NOT run out
   of memory (the budget would no longer prove anything);
3. the sharded build under that same budget runs out of memory for N >= 2.

Thresholds (the one place they live), from measured figures (torch 2.13 CPU,
keras 3.15.1, this model, P = 40.0 MiB): sharded build peaks were
P/N + 1.0 MiB on every rank for N = 1, 2, 4 (the extra MiB is one
initializer tile, 2**18 float32 values); stock Keras peaked at 1.5 x P. So:

* ``PEAK_FACTOR = 1.1``: 10 % headroom on the shard itself;
* ``ALLOWANCE_BYTES = 2 MiB``: one 1 MiB tile plus 1 MiB of slack;
* ``BUDGET_FRACTION = 0.75``: below the unsharded need (>= P), above the
  sharded N = 2 need (P/2 + 1 MiB) with room for Keras' own objects.

Run it alone with ``python -m bench gate`` (add ``--device cuda`` on a GPU node).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["PEAK_FACTOR", "ALLOWANCE_BYTES", "BUDGET_FRACTION", "GATE_RANKS", "run_gate",
           "gate_model_bytes", "GateRun"]

MiB = 1 << 20
PEAK_FACTOR = 1.1
ALLOWANCE_BYTES = 2 * MiB
BUDGET_FRACTION = 0.75
GATE_RANKS = (1, 2, 4)

_IN, _HIDDEN, _OUT = 1024, 8192, 256  # kernels: 32 MiB (dominant) and 8 MiB, float32


def gate_model_bytes() -> int:
    return 4 * (_IN * _HIDDEN + _HIDDEN + _HIDDEN * _OUT + _OUT)


def _build_gate_model():
    import keras

    inputs = keras.Input((_IN,), batch_size=4)
    x = keras.layers.Dense(_HIDDEN, activation="relu", name="wide")(inputs)
    x = keras.layers.Dense(_OUT, name="narrow")(x)
    return keras.Model(inputs, x, name="gate")


def _regress_creation_path():
    """Bring back full-tensor materialization: build every variable whole, then slice.

    Used only by the test that proves the gate can fail.
    """
    from shardimpl import create
    from shardimpl.layout import shard_slices

    original = create.fill_local_shard

    def full_then_slice(spec, full_shape, offsets, sizes, *, dtype, device):
        full = original(spec, full_shape, (0,) * len(full_shape), full_shape, dtype=dtype, device=device)
        return full[shard_slices(offsets, sizes)].clone()

    create.fill_local_shard = full_then_slice


def _gate_rank(mode: str, budget_bytes, device: str, regress: bool) -> dict:
    import keras

    import shardimpl
    from shardimpl.budgets import budget, is_oom, warm_thread_pools
    from shardimpl.meters import PeakMeter

    if mode == "sharded":
        shardimpl.install()
        devices = keras.distribution.list_devices("gpu" if device == "cuda" else "cpu")
        mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
        lm = keras.distribution.LayoutMap(mesh)
        lm[r".*/kernel"] = (None, "model")
        lm[r".*/bias"] = ("model",)
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    if regress:
        _regress_creation_path()
    meter_device = "cpu" if device == "cpu" else "cuda"
    warm_thread_pools()  # before the meter: its warm-up tensors are not the model's
    try:
        with PeakMeter(meter_device) as m:
            if budget_bytes:
                with budget(budget_bytes, device=meter_device):
                    _build_gate_model()
            else:
                _build_gate_model()
    except Exception as exc:
        if is_oom(exc):
            return {"oom": True, "peak": None}
        raise
    return {"oom": False, "peak": m.result().device_peak_bytes}


@dataclass
class GateRun:
    ranks: int
    mode: str
    budget_bytes: int | None
    rows: list  # the launcher's rows

    def peaks(self):
        return [r.value["peak"] for r in self.rows if r.status == "ok" and r.value and r.value["peak"] is not None]

    def any_oom(self) -> bool:
        return any(r.status == "oom" or (r.value or {}).get("oom") for r in self.rows)

    def failed(self):
        return [r for r in self.rows if r.status in ("error", "timeout")]


def run_gate(*, device: str = "cpu", regress: bool = False, timeout: float = 180.0):
    """Run the gate; returns (violations, runs). An empty violations list means it passed."""
    from shardimpl import launch

    p = gate_model_bytes()
    budget_bytes = int(BUDGET_FRACTION * p)
    # Each criterion measured on its own: peaks without a budget, then fits/OOMs under it.
    plan = [(n, "sharded", None) for n in GATE_RANKS]
    plan += [(n, "sharded", budget_bytes) for n in GATE_RANKS if n >= 2]
    plan.append((2, "unsharded", budget_bytes))
    runs, violations = [], []
    for n, mode, b in plan:
        rows = launch.run(_gate_rank, n, mode, b, device, regress, device=device, timeout=timeout)
        run = GateRun(n, mode, b, rows)
        runs.append(run)
        for r in run.failed():
            violations.append(f"N={n} {mode}: rank {r.rank} {r.status}: {(r.error or '').strip()[-300:]}")
        if mode == "sharded":
            limit = PEAK_FACTOR * p / n + ALLOWANCE_BYTES
            for rank, peak in enumerate([] if b else run.peaks()):
                if peak > limit:
                    violations.append(
                        f"N={n} rank {rank}: sharded build peak {peak / MiB:.1f} MiB > "
                        f"{PEAK_FACTOR} x P/N + {ALLOWANCE_BYTES / MiB:.0f} MiB = {limit / MiB:.1f} MiB "
                        "(full-tensor materialization?)"
                    )
            if b and run.any_oom():
                violations.append(f"N={n}: the sharded build ran out of memory under the "
                                  f"{b / MiB:.1f} MiB budget it must fit")
        elif not run.any_oom():
            violations.append(f"N={n}: the unsharded build did not run out of memory under "
                              f"{b / MiB:.1f} MiB: the budget proves nothing")
    return violations, runs


def report(runs) -> str:
    p = gate_model_bytes()
    lines = [f"gate model: {p / MiB:.1f} MiB of parameters; budget {BUDGET_FRACTION} x P = "
             f"{BUDGET_FRACTION * p / MiB:.1f} MiB"]
    for run in runs:
        peaks = ", ".join(f"{x / MiB:.2f}" for x in run.peaks()) or "-"
        lines.append(f"  N={run.ranks} {run.mode:9s} budget={'none' if not run.budget_bytes else f'{run.budget_bytes / MiB:.1f} MiB'}"
                     f"  peaks/rank MiB: {peaks}  (P/N = {p / run.ranks / MiB:.2f})  oom={run.any_oom()}")
    return "\n".join(lines)
