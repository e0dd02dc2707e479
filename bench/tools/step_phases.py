"""Where a train step's CPU goes: by phase of the step and by thread, for each variant.

`python -m bench step-phases [--family mlp] [--size-mib 64] [--ranks 2] [--steps 100] [--repeats 2]`

`python -m bench speed` says how much slower shardimpl's step is than the hand-written one;
this says in which part of the step. Each repeat launches, on N ranks, shardimpl's step (the
family's LayoutMap), stock Keras on one rank's shapes with no collective (`speed --floor`'s
variant), that floor with the hand-written step's collectives put in by hand
(`bench.tools.keras_megatron`: Keras' own cost with the same communication) and the hand-written
tensor-parallel step (`bench.tools.tp_reference`), one after the other. Rank 0 times every step
with timers on its phases, in main-thread CPU
(`time.thread_time`): for Keras, the model's call (forward), ``_compute_loss``, ``backward``,
``optimizer.apply``, ``compute_metrics`` and the rest of ``train_on_batch``; for the
hand-written step, its forward, ``backward``, ``optimizer.step`` and the rest (its loss is in
the rest). It also reads each thread's CPU from ``/proc/self/task`` (Linux) around the timed
steps: the collectives' threads (gloo's) apart from the main thread.

``--skip-collectives`` adds shardimpl's step and the hand-written step with
``torch.distributed.all_reduce`` replaced by a no-op (the calls shardimpl's local paths make; a
redistribution DTensor runs itself still communicates): diagnostics, not valid training steps
(their results are wrong, and nothing checks them). Against the floor, the first is shardimpl's
own CPU; against each step with its collectives, what the collectives cost the main thread,
the waits' cold caches included. Each variant also reports how many
``all_reduce`` calls a step made, so that the skipped step is seen to make the same calls.

Thread CPU comes in clock ticks (1/100 s here): over 100 steps, 0.1 ms a step.

Prints, per variant and phase, the median over a launch's steps (the lowest and highest over
repeats), and per thread group the CPU per step. docs/layouts-and-speed.md ("a sixth round") has what it found.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from collections import defaultdict

os.environ.setdefault("KERAS_BACKEND", "torch")

from bench.tools import keras_megatron  # noqa: E402
from bench.tools.keras_variants import MiB, WARMUP  # noqa: E402

__all__ = ["run_keras", "run_reference", "thread_cpu", "main"]

SHARDED, SKIPPED, FLOOR, REFERENCE = "shardimpl", "collectives skipped", "stock, one rank's shapes", "hand-written"
MEGATRON = keras_megatron.LABEL  # the floor with the hand-written step's collectives
REFERENCE_SKIPPED = "hand-written, skipped"  # the hand-written step, its all_reduce calls made but not issued
KERAS_PHASES = ("forward", "loss", "backward", "optimizer", "metrics", "rest")
REFERENCE_PHASES = ("forward", "backward", "optimizer", "rest")


def thread_cpu() -> dict:
    """{thread id: (name, CPU seconds so far)} of this process's threads; {} where /proc has none."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _per_thread_group(before: dict, after: dict, steps: int) -> dict:
    """CPU ms per step by thread group: the main thread (this one) and the others by name."""
    main = str(threading.get_native_id())
    groups = defaultdict(float)
    for tid, (name, seconds) in after.items():
        spent = seconds - before.get(tid, (name, 0.0))[1]
        groups["main thread" if tid == main else name] += spent * 1e3 / steps
    return {k: round(v, 2) for k, v in groups.items() if v >= 0.05}


class _Phases:
    """Main-thread CPU per phase of one step: `timed` wraps a callable so that its calls add to a phase."""

    def __init__(self):
        self.spent = defaultdict(float)

    def timed(self, phase, fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[phase] += time.thread_time() - start

        return wrapper


def _timed_steps(step, phases: _Phases, steps: int, names) -> tuple[dict, dict]:
    """Per-phase medians (ms) over ``steps`` calls of ``step``, the rest being the step's
    main-thread CPU outside every timed phase; and the CPU per step by thread group."""
    rows = []
    before = thread_cpu()
    for _ in range(steps):
        phases.spent.clear()
        start = time.thread_time()
        step()
        total = time.thread_time() - start
        row = {name: phases.spent.get(name, 0.0) for name in names if name != "rest"}
        row["rest"] = total - sum(row.values())
        row["step"] = total
        rows.append(row)
    threads = _per_thread_group(before, thread_cpu(), steps)
    return {k: round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in rows[0]}, threads


@contextlib.contextmanager
def _model_call_timed(model, phases: _Phases):
    """The model's own ``__call__`` (the forward, with shardimpl's hooks on it) timed as "forward"."""
    import keras

    layer_class = keras.layers.Layer
    original = layer_class.__call__
    timed = phases.timed("forward", original)

    def call(self, *args, **kwargs):
        return (timed if self is model else original)(self, *args, **kwargs)

    layer_class.__call__ = call
    try:
        yield
    finally:
        layer_class.__call__ = original


@contextlib.contextmanager
def _backward_timed(phases: _Phases):
    import torch

    original = torch.Tensor.backward
    torch.Tensor.backward = phases.timed("backward", original)
    try:
        yield
    finally:
        torch.Tensor.backward = original


def run_keras(family: str, size: int, variant: str, steps: int) -> dict:
    """In a rank: one Keras variant's phases and threads (module docstring)."""
    import torch.distributed as dist

    from bench.tools.keras_variants import keras_step, ordinary_malloc

    ordinary_malloc()
    if variant == FLOOR:
        model, x, y = keras_step(family, size, False, one_rank_of=dist.get_world_size())
    elif variant == MEGATRON:
        model, x, y = keras_step(family, size, False, megatron=True)
    else:
        model, x, y = keras_step(family, size, True)
    for _ in range(WARMUP):
        model.train_on_batch(x, y)
    calls = _count_all_reduces(skip=variant == SKIPPED)
    phases = _Phases()
    for attr, phase in (("_compute_loss", "loss"), ("compute_metrics", "metrics")):
        setattr(model, attr, phases.timed(phase, getattr(model, attr)))
    model.optimizer.apply = phases.timed("optimizer", model.optimizer.apply)
    with _model_call_timed(model, phases), _backward_timed(phases):
        medians, threads = _timed_steps(lambda: model.train_on_batch(x, y), phases, steps, KERAS_PHASES)
    return {"phases": medians, "threads": threads, "all_reduces_per_step": calls["n"] / steps}


def run_reference(family: str, size: int, steps: int, skip: bool = False) -> dict:
    """In a rank: the hand-written step's phases and threads (``skip``: its all_reduce calls not issued)."""
    from bench.tools import tp_reference
    from bench.tools.keras_variants import warmed_reference

    model, optimizer, x = warmed_reference(family, size)
    phases = _Phases()
    calls = _count_all_reduces(skip=skip)
    model.forward = phases.timed("forward", model.forward)
    optimizer.step = phases.timed("optimizer", optimizer.step)
    with _backward_timed(phases):
        medians, threads = _timed_steps(lambda: tp_reference.reference_step(model, optimizer, x), phases, steps,
                                        REFERENCE_PHASES)
    return {"phases": medians, "threads": threads, "all_reduces_per_step": calls["n"] / steps}


def _count_all_reduces(skip: bool) -> dict:
    """From now on in this rank (it ends with the run), count ``torch.distributed.all_reduce``
    calls; with ``skip``, return from each without communicating."""
    import torch.distributed as dist

    calls, original = {"n": 0}, dist.all_reduce

    def all_reduce(*args, **kwargs):
        calls["n"] += 1
        return None if skip else original(*args, **kwargs)

    dist.all_reduce = all_reduce
    return calls


def measure(family: str, size: int, ranks: int, steps: int, repeats: int, skip: bool) -> dict:
    """{variant: [rank 0's result per repeat]}, variants launched in turn within each repeat."""
    from shardimpl import launch

    variants = ([SHARDED] + ([SKIPPED] if skip else []) + [FLOOR, MEGATRON, REFERENCE]
                + ([REFERENCE_SKIPPED] if skip else []))
    out = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            if variant in (REFERENCE, REFERENCE_SKIPPED):
                rows = launch.run(run_reference, ranks, family, size, steps, variant == REFERENCE_SKIPPED, timeout=900)
            else:
                rows = launch.run(run_keras, ranks, family, size, variant, steps, timeout=900)
            if rows[0].status != "ok":
                raise SystemExit(f"{family} {variant}: {rows[0].status}: {(rows[0].error or '').strip()[-500:]}")
            out[variant].append(rows[0].value)
    return out


def table(results: dict) -> list[str]:
    """One line per variant, one column per phase (and the step): the repeats' figures, as
    "low-high" where they differ; then the all_reduce calls and the CPU by thread."""
    def cell(variant, phase):
        figures = sorted(r["phases"][phase] for r in results[variant] if phase in r["phases"])
        if not figures:
            return "-"
        low, high = f"{figures[0]:.1f}", f"{figures[-1]:.1f}"
        return low if low == high else f"{low}-{high}"

    label = max(len(v) for v in results) + 2
    columns = KERAS_PHASES + ("step",)
    lines = [f"{'main-thread CPU, ms':{label}}" + "".join(f"{c:>12}" for c in columns)]
    for variant in results:
        lines.append(f"{variant:{label}}" + "".join(f"{cell(variant, c):>12}" for c in columns))
    lines.append("all_reduce calls per step: " + ", ".join(
        f"{v} {results[v][0]['all_reduces_per_step']:g}" for v in results))
    lines.append("CPU ms per step by thread (each repeat):")
    for variant, runs in results.items():
        lines.append(f"  {variant}: " + " | ".join(
            ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(r["threads"].items(), key=lambda kv: -kv[1]))
            for r in runs))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench step-phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="mlp", choices=("mlp", "transformer"))
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-collectives", action="store_true",
                   help="also time shardimpl's and the hand-written step with all_reduce a no-op "
                        "(shardimpl's own CPU, the collectives' cost; not valid steps)")
    args = p.parse_args(argv)
    results = measure(args.family, int(args.size_mib * MiB), args.ranks, args.steps, args.repeats,
                      args.skip_collectives)
    print(f"{args.family}, {args.size_mib:g} MiB, N={args.ranks}: rank 0, median of {args.steps} steps per "
          f"launch, lowest-highest over {args.repeats} repeats (the hand-written step's loss is in its rest)")
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
