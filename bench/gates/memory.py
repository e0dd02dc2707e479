"""The memory regression gate: fail when full-tensor materialization comes back.

A fixed Keras model (one dominant kernel, a smaller one, biases) is built on
N in {1, 2, 4} ranks with shardimpl and, for contrast, with stock Keras. Each
build is measured by `PeakMeter`, which gives two figures per rank: the
torch-allocator peak (CPU storages from aten ops, or CUDA's caching allocator)
and the host peak (everything the rank's process took, torch or not: its
resident high-water and the bytes traced through Python's allocators, numpy
included). The gate fails when

1. ``torch-peak``: a rank's sharded build peak exceeds ``PEAK_FACTOR x P/N + ALLOWANCE_BYTES``;
2. ``host-peak``: a rank's sharded host peak exceeds ``PEAK_FACTOR x P/N + HOST_ALLOWANCE_BYTES``
   (the same bound on CUDA, where the shards live on the device: it leaves room for the host
   staging that a CUDA rank may do and still fails a full-size host copy at N >= 2; it has not
   been measured on a GPU yet);
3. ``unsharded-fits``: the unsharded build under ``BUDGET_FRACTION x P`` per rank does NOT run
   out of memory (the budget would no longer prove anything);
4. ``sharded-ooms``: the sharded build under that same budget runs out of memory for N >= 2;
5. ``rank-failed``: a rank raised or timed out.

Thresholds (the one place they live), from measured figures (torch 2.13 CPU,
keras 3.15.1, this model, P = 40.0 MiB, 2 shared cores at load average 8-12):

* torch figure: sharded build peaks were P/N + 0.93 to 1.00 MiB on every rank
  for N = 1, 2, 4 in every run (the initializer's 1 MiB of host scratch,
  ``SCRATCH_BYTES``); stock Keras peaked at 1.5 x P.
* host figure, clean tree, 630 rank-builds (N = 1, 2, 4; 54 worlds, 5 builds
  each, the first of each world included): P/N + [0.62, 1.42] MiB, median
  0.88 (the tile, Keras' objects; the traced view read 0.12-0.20 MiB, the
  resident view the rest). Without the metered warm-up build the first build
  of a process read up to P/N + 13.2 MiB (code pages, gloo's buffers,
  tracemalloc's own tables).

So:

* ``PEAK_FACTOR = 1.1``: 10 % headroom on the shard itself (1 MiB at N = 4);
* ``ALLOWANCE_BYTES = 2 MiB``: the 1 MiB of scratch plus 1 MiB of slack;
* ``HOST_ALLOWANCE_BYTES = 3 MiB`` =
  1 MiB (the initializer's scratch: torch's CPU memory is host memory too)
  + 0.5 MiB (interpreter and Keras objects: at most 0.42 MiB above the tile measured)
  + 1.5 MiB (slack for page rounding, huge pages and another machine's libraries).
  At N = 4 the bound leaves 1 + 3 - 1.42 = 2.6 MiB above the worst clean
  reading: a full-size copy larger than that, made while the other shards
  exist, fails (the 8 MiB narrow kernel's read P/N + 14.0 MiB);
* ``BUDGET_FRACTION = 0.75``: below the unsharded need (>= P), above the
  sharded N = 2 need (P/2 + 1 MiB) with room for Keras' own objects.

Before the measured build each rank builds a 1/64-size copy of the model
(same layers, same code paths), so that the measurement holds the build and
not the process's first use of Keras, the initializers and gloo.

Run it alone with ``python -m bench gate`` (add ``--device cuda`` on a GPU node).
`run_gate_variants` runs several variants of the creation path (a clean tree
and planted regressions, see tests/test_memory_gate.py) on one world per N.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["PEAK_FACTOR", "ALLOWANCE_BYTES", "HOST_ALLOWANCE_BYTES", "BUDGET_FRACTION", "GATE_RANKS",
           "CRITERIA", "run_gate", "run_gate_variants", "check", "caught_by", "gate_model_bytes",
           "GateRun", "report"]

MiB = 1 << 20
PEAK_FACTOR = 1.1
ALLOWANCE_BYTES = 2 * MiB
HOST_ALLOWANCE_BYTES = MiB + MiB // 2 + 3 * MiB // 2  # tile + interpreter + slack (see above)
BUDGET_FRACTION = 0.75
GATE_RANKS = (1, 2, 4)
CRITERIA = ("torch-peak", "host-peak", "unsharded-fits", "sharded-ooms", "rank-failed")

_IN, _HIDDEN, _OUT = 1024, 8192, 256  # kernels: 32 MiB (dominant) and 8 MiB, float32
_WARM_DIV = 64  # the warm-up build: every dimension but the input's / 64


def gate_model_bytes() -> int:
    return 4 * (_IN * _HIDDEN + _HIDDEN + _HIDDEN * _OUT + _OUT)


def _build_gate_model(div: int = 1):
    import keras

    inputs = keras.Input((_IN,), batch_size=4)
    x = keras.layers.Dense(_HIDDEN // div, activation="relu", name="wide")(inputs)
    x = keras.layers.Dense(_OUT // div, name="narrow")(x)
    return keras.Model(inputs, x, name="gate")


def _set_mode(mode: str, device: str) -> None:
    import keras

    import shardimpl

    if mode == "unsharded":
        keras.distribution.set_distribution(None)
        return
    shardimpl.install()
    devices = keras.distribution.list_devices("gpu" if device == "cuda" else "cpu")
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[r".*/kernel"] = (None, "model")
    lm[r".*/bias"] = ("model",)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))


_warm: set = set()


def _gate_rank(mode: str, budget_bytes, device: str, plant=None) -> dict:
    """One metered build on this rank. ``plant``: None, or a picklable callable returning a
    context manager that changes the creation path while the build runs (tests only)."""
    import contextlib

    import keras
    import torch

    from shardimpl.budgets import budget, is_oom, warm_thread_pools
    from shardimpl.meters import PeakMeter

    meter_device = "cpu" if device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    if device == "cuda":
        torch.empty(1, device=meter_device)  # the CUDA context is not the model's
    keras.backend.clear_session()  # (it also clears the distribution: set the mode after it)
    _set_mode(mode, device)
    warm_thread_pools()  # before the meter: its warm-up tensors are not the model's
    if mode not in _warm:
        # First use of Keras, the initializers, gloo and the meter itself (tracemalloc's tables)
        # is not the model's: a small build, metered, pays it.
        with PeakMeter(meter_device, trace_python=True):
            _build_gate_model(_WARM_DIV)
        _warm.add(mode)
    gc.collect()
    try:
        with plant() if plant is not None else contextlib.nullcontext():
            with PeakMeter(meter_device, trace_python=True) as m:
                if budget_bytes:
                    with budget(budget_bytes, device=meter_device):
                        model = _build_gate_model()
                else:
                    model = _build_gate_model()
            del model
    except Exception as exc:
        if is_oom(exc):
            return {"oom": True, "peak": None, "host_peak": None}
        raise
    finally:
        gc.collect()
    r = m.result()
    return {"oom": False, "peak": r.device_peak_bytes, "host_peak": r.host_peak_bytes,
            "resident": r.host_resident_peak_bytes, "traced": r.host_traced_peak_bytes,
            "blind": r.host_blind_bytes}


@dataclass
class GateRun:
    ranks: int
    mode: str
    budget_bytes: int | None
    rows: list  # the launcher's rows
    device: str = "cpu"
    seconds: float = 0.0  # wall time of the call (the ranks' builds, in parallel)

    def _values(self, key):
        return [r.value[key] for r in self.rows
                if r.status == "ok" and r.value and r.value.get(key) is not None]

    def peaks(self):
        """Per-rank torch-allocator peaks (ranks that measured one)."""
        return self._values("peak")

    def host_peaks(self):
        """Per-rank host peaks (ranks that measured one)."""
        return self._values("host_peak")

    def any_oom(self) -> bool:
        return any(r.status == "oom" or (r.value or {}).get("oom") for r in self.rows)

    def failed(self):
        return [r for r in self.rows if r.status in ("error", "timeout")]


def _calls(n: int, peaks_only: bool):
    """The (mode, budgeted) builds of one variant on N ranks: each criterion measured on its own.
    ``peaks_only``: the unbudgeted sharded build at N >= 2 only (what the peak criteria read)."""
    if peaks_only:
        return [("sharded", False)] if n >= 2 else []
    calls = [("sharded", False)]
    if n >= 2:
        calls.append(("sharded", True))
    if n == 2:
        calls.append(("unsharded", True))
    return calls


def check(runs) -> list[str]:
    """The gate's violations for one variant's runs; each starts with its criterion's name."""
    p = gate_model_bytes()
    out = []
    for run in runs:
        n, b = run.ranks, run.budget_bytes
        where = f"N={n} {run.mode}{' under budget' if b else ''}"
        for r in run.failed():
            out.append(f"rank-failed: {where}: rank {r.rank} {r.status}: {(r.error or '').strip()[-300:]}")
        if run.mode == "sharded" and not b:
            limit = PEAK_FACTOR * p / n + ALLOWANCE_BYTES
            for rank, peak in enumerate(run.peaks()):
                if peak > limit:
                    out.append(f"torch-peak: N={n} rank {rank}: sharded build peak {peak / MiB:.2f} MiB > "
                               f"{PEAK_FACTOR} x P/N + {ALLOWANCE_BYTES / MiB:.0f} MiB = {limit / MiB:.2f} MiB "
                               "(full-tensor materialization in torch?)")
            host_limit = PEAK_FACTOR * p / n + HOST_ALLOWANCE_BYTES
            for rank, peak in enumerate(run.host_peaks()):
                if peak > host_limit:
                    out.append(f"host-peak: N={n} rank {rank}: sharded host peak {peak / MiB:.2f} MiB > "
                               f"{PEAK_FACTOR} x P/N + {HOST_ALLOWANCE_BYTES / MiB:.0f} MiB = "
                               f"{host_limit / MiB:.2f} MiB (a full-size buffer on the host, inside or "
                               "outside torch?)")
        elif run.mode == "sharded" and run.any_oom():
            out.append(f"sharded-ooms: N={n}: the sharded build ran out of memory under the "
                       f"{b / MiB:.1f} MiB budget it must fit")
        elif run.mode == "unsharded" and not run.any_oom():
            out.append(f"unsharded-fits: N={n}: the unsharded build did not run out of memory under "
                       f"{b / MiB:.1f} MiB: the budget proves nothing")
    return out


def caught_by(violations) -> list[str]:
    """The criteria (in `CRITERIA` order) that the violations name."""
    named = {v.split(":", 1)[0] for v in violations}
    return [c for c in CRITERIA if c in named]


def run_gate_variants(variants: dict, *, device: str = "cpu", timeout: float = 300.0,
                      peaks_only=()) -> dict:
    """Run the gate for each ``{name: plant}`` (plant None: the creation path as it is) on one
    world per N, each variant's builds one after another in the same ranks. Variants named in
    ``peaks_only`` run only the builds that the peak criteria read (unbudgeted, N >= 2).

    Returns ``{name: (violations, runs)}``.
    """
    from shardimpl import launch

    p = gate_model_bytes()
    budget_bytes = int(BUDGET_FRACTION * p)
    runs = {name: [] for name in variants}
    for n in GATE_RANKS:
        world = None
        try:
            for name, plant in variants.items():
                for mode, budgeted in _calls(n, name in peaks_only):
                    if world is None or world.closed:  # a failed call closes its world: start anew
                        world = launch.World(n, device=device, timeout=timeout).start()
                    b = budget_bytes if budgeted else None
                    start = time.perf_counter()
                    rows = world.run(_gate_rank, mode, b, device, plant, timeout=timeout)
                    runs[name].append(GateRun(n, mode, b, rows, device, time.perf_counter() - start))
        finally:
            if world is not None:
                world.close()
    return {name: (check(rs), rs) for name, rs in runs.items()}


def run_gate(*, device: str = "cpu", plant=None, timeout: float = 300.0):
    """Run the gate; returns (violations, runs). An empty violations list means it passed."""
    return run_gate_variants({"gate": plant}, device=device, timeout=timeout)["gate"]


def report(runs) -> str:
    p = gate_model_bytes()
    lines = [f"gate model: {p / MiB:.1f} MiB of parameters; budget {BUDGET_FRACTION} x P = "
             f"{BUDGET_FRACTION * p / MiB:.1f} MiB; per rank MiB: torch-allocator peak / host peak"]
    for run in runs:
        peaks = ", ".join(f"{a / MiB:.2f}/{h / MiB:.2f}" for a, h in zip(run.peaks(), run.host_peaks())) or "-"
        budget = "none" if not run.budget_bytes else f"{run.budget_bytes / MiB:.1f} MiB"
        lines.append(f"  N={run.ranks} {run.mode:9s} budget={budget}  peaks/rank: {peaks}  "
                     f"(P/N = {p / run.ranks / MiB:.2f})  oom={run.any_oom()}")
    return "\n".join(lines)
