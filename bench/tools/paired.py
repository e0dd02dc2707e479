"""shardimpl's step and the hand-written step timed in the same ranks, alternating step by step.

`python -m bench speed --paired` adds this run to each round. On a shared machine the speed of
the ranks drifts by more than the gap being measured between one launch and the next (the same
code gave 1.09 and 1.18 x the reference an hour apart). Here each of the N ranks builds both
the sharded Keras model (the family's LayoutMap, `bench.tools.keras_variants.keras_step`) and
`bench.tools.tp_reference`'s model, and times them in turns: step i of one, then step i of the
other, the order flipping every step, every step started by a barrier so that both ranks begin
it together. Each pair of neighbouring steps shares the machine's state, so the ratio of a pair
moves with shardimpl's work, not with the machine's mood; the run's figure is the median of
the per-pair ratios (wall, and rank 0's process CPU).

Each timed step follows an untimed step of its own model. A step right after the other model's
starts with that model's data and code in the caches: measured in one 64 MiB mlp run at N = 2
(random order, 120 steps), shardimpl's step took 33.7 ms CPU after a reference step and 31.1
after its own, the reference 27.2 after shardimpl's and 27.7 after its own. Timing every step
straight after the other's charged the Keras step, whose Python state is the larger, with the
switch.

Both models live in each rank at once (twice one variant's memory); both use the default
process group's ranks (the Keras model through its mesh), never at the same time.

With ``megatron`` (`python -m bench speed --paired --keras-megatron`) a third model joins the
turns: stock Keras layers on the rank's blocks with the reference's f and g put in by hand
(`bench.tools.keras_megatron`), built before the distribution is set and stepped with none set.
Which model goes first rotates every turn, and the order runs backwards every other cycle, so
that each pair of models is timed in both orders equally often.
Then sharded / Keras-by-hand is shardimpl's own cost, and Keras-by-hand / reference Keras' own,
each from steps of the same turn.
"""

from __future__ import annotations

import statistics
import time

from bench.tools import keras_megatron

__all__ = ["run_paired", "paired_lines"]


def _timed_once(step) -> tuple[float, float]:
    import torch.distributed as dist

    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - cpu


def run_paired(family: str, size: int, steps: int, megatron: bool = False) -> dict:
    """In each rank: ``steps`` timed steps of each, alternating, each after an untimed one of its
    own (module docstring), after `WARMUP` steps of each. Returns every timed step's wall and CPU
    seconds, per variant, in pair order."""
    from bench.harness.families import sample_batch
    from bench.tools import tp_reference
    from bench.tools.keras_variants import WARMUP, keras_step, ordinary_malloc

    ordinary_malloc()
    by_hand = keras_step(family, size, False, megatron=True) if megatron else None  # before the distribution
    model, x, y = keras_step(family, size, sharded=True)
    reference = tp_reference.build_reference(family, size)
    optimizer = tp_reference.make_optimizer(reference)
    batch = sample_batch(family, size)
    variants = {"sharded": lambda: model.train_on_batch(x, y),
                "reference": lambda: tp_reference.reference_step(reference, optimizer, batch)}
    if by_hand is not None:
        variants[MEGATRON_KEY] = lambda: _without_distribution(by_hand)
    for _ in range(WARMUP):
        for step in variants.values():
            step()
    out = {f"{label}_{kind}": [] for label in variants for kind in ("seconds", "cpu_seconds")}
    labels = list(variants)
    for i in range(steps):
        order = labels[i % len(labels):] + labels[:i % len(labels)]  # each model first in turn
        if len(labels) > 2 and (i // len(labels)) % 2:  # three: every pair in both orders as often
            order.reverse()
        for label in order:
            variants[label]()  # untimed: the timed step then follows its own model's (module docstring)
            wall, cpu = _timed_once(variants[label])
            out[f"{label}_seconds"].append(wall)
            out[f"{label}_cpu_seconds"].append(cpu)
    return out


MEGATRON_KEY = "keras_megatron"


def _without_distribution(model_x_y):
    """One train step of a stock Keras model while the rank's sharded model's distribution is unset."""
    import keras

    model, x, y = model_x_y
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        model.train_on_batch(x, y)
    finally:
        keras.distribution.set_distribution(distribution)


def _pair_ratio(sample, kind: str, a: str = "sharded", b: str = "reference") -> float:
    """Median over the run's pairs of a / b (``kind``: "seconds" or "cpu_seconds")."""
    return statistics.median(x / y for x, y in zip(sample[f"{a}_{kind}"], sample[f"{b}_{kind}"]))


def paired_lines(samples) -> list[str]:
    """The summary lines of a family's paired runs (one sample per round)."""
    walls = [_pair_ratio(s, "seconds") for s in samples]
    cpus = [_pair_ratio(s, "cpu_seconds") for s in samples]
    sharded = statistics.median(statistics.median(s["sharded_seconds"]) for s in samples)
    reference = statistics.median(statistics.median(s["reference_seconds"]) for s in samples)
    lines = [f"{'':12} paired (same ranks, alternating steps): step ms sharded {sharded * 1e3:.1f}, reference "
             f"{reference * 1e3:.1f}; sharded / reference, median of per-step ratios per round "
             f"{' '.join(f'{r:.2f}' for r in walls)}, median {statistics.median(walls):.2f}; "
             f"CPU {' '.join(f'{r:.2f}' for r in cpus)}, median {statistics.median(cpus):.2f}"]
    if all(f"{MEGATRON_KEY}_seconds" in s for s in samples):
        for a, b, what in (("sharded", MEGATRON_KEY, "shardimpl's own"), (MEGATRON_KEY, "reference", "Keras' own")):
            walls = [_pair_ratio(s, "seconds", a, b) for s in samples]
            cpus = [_pair_ratio(s, "cpu_seconds", a, b) for s in samples]
            names = {MEGATRON_KEY: keras_megatron.LABEL}
            lines.append(f"{'':14} {names.get(a, a)} / {names.get(b, b)} ({what}): per round "
                         f"{' '.join(f'{r:.2f}' for r in walls)}, median {statistics.median(walls):.2f}; "
                         f"CPU {' '.join(f'{r:.2f}' for r in cpus)}, median {statistics.median(cpus):.2f}")
    return lines
