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
"""

from __future__ import annotations

import statistics
import time

__all__ = ["run_paired", "paired_lines"]


def _timed_once(step) -> tuple[float, float]:
    import torch.distributed as dist

    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - cpu


def run_paired(family: str, size: int, steps: int) -> dict:
    """In each rank: ``steps`` timed steps of each, alternating, each after an untimed one of its
    own (module docstring), after `WARMUP` steps of each. Returns every timed step's wall and CPU
    seconds, per variant, in pair order."""
    from bench.harness.families import sample_batch
    from bench.tools import tp_reference
    from bench.tools.keras_variants import WARMUP, keras_step, ordinary_malloc

    ordinary_malloc()
    model, x, y = keras_step(family, size, sharded=True)
    reference = tp_reference.build_reference(family, size)
    optimizer = tp_reference.make_optimizer(reference)
    batch = sample_batch(family, size)
    variants = {"sharded": lambda: model.train_on_batch(x, y),
                "reference": lambda: tp_reference.reference_step(reference, optimizer, batch)}
    for _ in range(WARMUP):
        for step in variants.values():
            step()
    out = {f"{label}_{kind}": [] for label in variants for kind in ("seconds", "cpu_seconds")}
    for i in range(steps):
        order = ("sharded", "reference") if i % 2 == 0 else ("reference", "sharded")
        for label in order:
            variants[label]()  # untimed: the timed step then follows its own model's (module docstring)
            wall, cpu = _timed_once(variants[label])
            out[f"{label}_seconds"].append(wall)
            out[f"{label}_cpu_seconds"].append(cpu)
    return out


def _pair_ratio(sample, kind: str) -> float:
    """Median over the run's pairs of sharded / reference (``kind``: "seconds" or "cpu_seconds")."""
    return statistics.median(a / b for a, b in zip(sample[f"sharded_{kind}"], sample[f"reference_{kind}"]))


def paired_lines(samples) -> list[str]:
    """The summary lines of a family's paired runs (one sample per round)."""
    walls = [_pair_ratio(s, "seconds") for s in samples]
    cpus = [_pair_ratio(s, "cpu_seconds") for s in samples]
    sharded = statistics.median(statistics.median(s["sharded_seconds"]) for s in samples)
    reference = statistics.median(statistics.median(s["reference_seconds"]) for s in samples)
    return [f"{'':12} paired (same ranks, alternating steps): step ms sharded {sharded * 1e3:.1f}, reference "
            f"{reference * 1e3:.1f}; sharded / reference, median of per-step ratios per round "
            f"{' '.join(f'{r:.2f}' for r in walls)}, median {statistics.median(walls):.2f}; "
            f"CPU {' '.join(f'{r:.2f}' for r in cpus)}, median {statistics.median(cpus):.2f}"]
