"""Train-step speed of shardimpl against stock Keras and a hand-written tensor-parallel step.

`python -m bench speed [--families mlp,transformer] [--size-mib 64] [--ranks 2] [--repeats 5]`

Each repeat runs stock Keras in one process, then shardimpl on N ranks (the
family's LayoutMap), then the hand-written reference on N ranks (plain torch, the same
layout, explicit all-reduces: `bench.tools.tp_reference`), alternately, so machine load hits
all alike. In each Keras run
the model is built and compiled (SGD with momentum, MSE against zeros; keras-hub's CausalLMs:
sparse cross-entropy on next-token ids, no reference), `WARMUP` warm-up
``train_on_batch`` calls are made, then ``--steps`` timed ones (the median
is the run's step time: single steps on this 2-core machine vary by a third, so 15 by default), then ``fit`` over ``--fit-batches`` batches (steps/s,
after one warm-up epoch); the reference does the same with its own step (SGD with momentum,
MSE against zeros) and a loop over as many batches for "fit". Each run then counts one
step's operators (`bench.tools.op_count`: ATen ops, collectives, DTensor dispatches). Prints
min / median over repeats, the ratios of the medians against stock and against the reference,
the per-round ratios, the counts, and rank 0's process CPU per step (the work, which other
processes' load moves far less than wall time on a shared machine); ``--json`` writes every sample.
``--floor`` adds stock Keras on one rank's shapes in each of the N ranks, without any
communication (`bench.harness.rank_local`): of the gap between shardimpl and the reference, the
part above this floor is the collectives' and shardimpl's, the part below it stock Keras' own.
``--keras-megatron`` adds that floor with the reference's collectives put in by hand (Megatron's f
and g as a user writes them in Keras: `bench.tools.keras_megatron`): the closest any Keras step
can come to the reference, since it is Keras' own layers and trainer plus the same communication.
``--paired`` adds a run per round in which each rank times shardimpl's step and the reference's
alternately, step by step (`bench.tools.paired`): the median of per-step ratios, which the
machine's drift between launches does not move.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

from bench.tools import keras_megatron  # noqa: E402
from bench.tools.keras_variants import MiB, WARMUP, keras_step, ordinary_malloc  # noqa: E402


def run_once(family: str, size: int, sharded: bool, steps: int, fit_batches: int,
             all_column: bool = False, one_rank_of: int | None = None, megatron: bool = False) -> dict:
    """One Keras variant's samples (`keras_step`'s variants)."""
    import numpy as np

    from bench.harness.families import BATCH
    from bench.tools.op_count import count_ops

    ordinary_malloc()
    model, x, y = keras_step(family, size, sharded, all_column, one_rank_of, megatron)
    for _ in range(WARMUP):
        model.train_on_batch(x, y)
    times, cpus = _timed(lambda: model.train_on_batch(x, y), steps)

    def tile(a):
        return np.concatenate([a] * fit_batches)

    xs = {k: tile(v) for k, v in x.items()} if isinstance(x, dict) else tile(x)
    ys = tile(y)
    model.fit(xs, ys, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(xs, ys, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    fit_seconds = time.perf_counter() - start
    return {"step_seconds": statistics.median(times), "step_cpu_seconds": statistics.median(cpus),
            "steps_per_second": fit_batches / fit_seconds, "ops": count_ops(lambda: model.train_on_batch(x, y))}


def _timed(step, steps) -> tuple[list, list]:
    """Wall seconds and CPU seconds (this process, all its threads) of each of ``steps`` calls.
    The CPU figure is the work a step costs, which other processes' load moves far less
    than its wall time."""
    times, cpus = [], []
    for _ in range(steps):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return times, cpus


def run_reference(family: str, size: int, steps: int, fit_batches: int) -> dict:
    """The hand-written tensor-parallel step (`bench.tools.tp_reference`) timed as `run_once`
    times Keras: `WARMUP` warm-up steps, the median of ``steps``, then steps/s over ``fit_batches``
    batches taken from host arrays as ``fit`` takes them (after one warm-up pass)."""
    import numpy as np
    import torch

    from bench.tools import tp_reference
    from bench.tools.keras_variants import warmed_reference
    from bench.tools.op_count import count_ops

    model, optimizer, x = warmed_reference(family, size)
    times, cpus = _timed(lambda: tp_reference.reference_step(model, optimizer, x), steps)
    xs = np.concatenate([x.numpy()] * fit_batches)
    rows = x.shape[0]

    def epoch():
        for i in range(fit_batches):
            tp_reference.reference_step(model, optimizer, torch.from_numpy(xs[i * rows:(i + 1) * rows]))

    epoch()
    start = time.perf_counter()
    epoch()
    fit_seconds = time.perf_counter() - start
    return {"step_seconds": statistics.median(times), "step_cpu_seconds": statistics.median(cpus),
            "steps_per_second": fit_batches / fit_seconds,
            "ops": count_ops(lambda: tp_reference.reference_step(model, optimizer, x))}


FLOOR = "stock, one rank's shapes"  # the --floor variant's label
MEGATRON = keras_megatron.LABEL  # the --keras-megatron variant's label


PAIRED = "paired"  # the --paired run's label: `bench.tools.paired`


def measure(families, size, ranks, repeats, steps, fit_batches, all_column=False, reference=True,
            floor=False, paired=False, megatron=False) -> dict:
    """Every variant of every family once per round, rounds repeated: {family: {label: [sample]}};
    each sample also holds the machine's load average (1 min) when its run started."""
    from shardimpl import launch

    variants = [("stock", 1, False, False), ("sharded", ranks, True, False)]
    if reference:
        variants.append(("reference", ranks, None, False))
    if floor:
        variants.append((FLOOR, ranks, False, False))
    if megatron:
        variants.append((MEGATRON, ranks, False, False))
    if all_column:
        variants.append(("sharded, all-column mlp", ranks, True, True))
    if paired:
        variants.append((PAIRED, ranks, None, False))
    from bench.tools.tp_reference import REFERENCE_FAMILIES

    def applies(family, label):  # the all-column map is the mlp's; references and floors exist for some families
        return ((family == "mlp" or "all-column" not in label)
                and (label not in ("reference", FLOOR, PAIRED, MEGATRON) or family in REFERENCE_FAMILIES))

    samples = {f: {label: [] for label, *_ in variants if applies(f, label)} for f in families}
    for _ in range(repeats):
        for family in families:
            for label, n, sharded, columns in variants:
                if label not in samples[family]:
                    continue
                load = os.getloadavg()[0]
                if label == PAIRED:
                    from bench.tools.paired import run_paired

                    rows = launch.run(run_paired, n, family, size, steps, megatron, timeout=900)
                elif sharded is None:
                    rows = launch.run(run_reference, n, family, size, steps, fit_batches, timeout=900)
                else:
                    rows = launch.run(run_once, n, family, size, sharded, steps, fit_batches, columns,
                                      n if label == FLOOR else None, label == MEGATRON, timeout=900)
                if rows[0].status != "ok":
                    raise SystemExit(f"{family} {label}: {rows[0].status}: {(rows[0].error or '').strip()[-500:]}")
                samples[family][label].append({**rows[0].value, "load": load})
    return samples


def _ops(sample) -> str:
    o = sample["ops"]
    return (f"{o['aten_ops']} ATen ops ({o['outer_ops']} outermost, {o['dtensor_dispatches']} DTensor dispatches), "
            f"{o['collectives']} collective events")


def _cpu_lines(runs) -> list[str]:
    """Rank 0's process CPU per step (median of its steps; min / median over rounds) and, against
    the reference, the median over rounds of the per-round CPU ratio. Stock Keras' one process runs
    a thread per core (its CPU counts them all, spin-waits included) and N ranks share the cores,
    unless OMP_NUM_THREADS sets every process's threads."""
    if not all("step_cpu_seconds" in r for rs in runs.values() for r in rs):
        return []  # samples from before the CPU figure (an old --json)
    lines = []
    for label, rs in runs.items():
        cpu = [r["step_cpu_seconds"] * 1e3 for r in rs]
        line = f"{'':12}   CPU ms per step, {label}: {min(cpu):.1f} / {statistics.median(cpu):.1f}"
        if "reference" in runs and label not in ("reference", "stock"):
            rounds = [a["step_cpu_seconds"] / b["step_cpu_seconds"] for a, b in zip(rs, runs["reference"])]
            line += f", vs reference per round {' '.join(f'{r:.2f}' for r in rounds)}, median {statistics.median(rounds):.2f}"
        lines.append(line)
    return lines


def summary(samples) -> list[str]:
    lines = []
    for family, runs in samples.items():
        paired = runs.get(PAIRED)
        runs = {label: rs for label, rs in runs.items() if label != PAIRED}
        def stat(label, key):
            values = [r[key] for r in runs[label]]
            return min(values), statistics.median(values)

        st, fs = stat("stock", "step_seconds"), stat("stock", "steps_per_second")
        loads = [r["load"] for rs in runs.values() for r in rs]
        lines.append(f"{family:12} stock{'':20} step ms {st[0] * 1e3:7.1f} / {st[1] * 1e3:7.1f}   "
                     f"fit steps/s {fs[0]:5.1f} / {fs[1]:5.1f}   (load {min(loads):.2f}-{max(loads):.2f})")
        ref = stat("reference", "step_seconds") if "reference" in runs else None
        for label in [k for k in runs if k != "stock"]:
            sh, fh = stat(label, "step_seconds"), stat(label, "steps_per_second")
            line = (f"{'':12} {label:25} step ms {sh[0] * 1e3:7.1f} / {sh[1] * 1e3:7.1f}   "
                    f"fit steps/s {fh[0]:5.1f} / {fh[1]:5.1f}   vs stock (medians): step "
                    f"{sh[1] / st[1]:.2f}x, steps/s {fh[1] / fs[1]:.2f}x")
            if ref and label != "reference":
                rounds = [a["step_seconds"] / b["step_seconds"] for a, b in zip(runs[label], runs["reference"])]
                line += (f"; vs reference: step {sh[1] / ref[1]:.2f}x (per round "
                         f"{' '.join(f'{r:.2f}' for r in rounds)}, median {statistics.median(rounds):.2f})")
            lines.append(line)
        if paired:
            from bench.tools.paired import paired_lines

            lines.extend(paired_lines(paired))
        lines.extend(_cpu_lines(runs))
        for label in runs:
            lines.append(f"{'':12}   ops per step, {label}: {_ops(runs[label][-1])}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="mlp,transformer")
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--fit-batches", type=int, default=16)
    p.add_argument("--all-column", action="store_true",
                   help="also time the mlp with every kernel column-split (the slow layout, for comparison)")
    p.add_argument("--no-reference", action="store_true",
                   help="leave the hand-written tensor-parallel step (bench.tools.tp_reference) out")
    p.add_argument("--floor", action="store_true",
                   help="also time stock Keras on one rank's shapes in each of the N ranks, no communication "
                        "(bench.harness.rank_local): what of the gap to the reference is Keras' own")
    p.add_argument("--keras-megatron", action="store_true",
                   help="also time stock Keras layers on one rank's shapes with the reference's collectives put in by "
                        "hand (bench.tools.keras_megatron): the closest a Keras step can come to the reference")
    p.add_argument("--paired", action="store_true",
                   help="also time shardimpl and the reference in the same ranks, alternating step by step "
                        "(bench.tools.paired): per-step ratios that the machine's drift between runs does not move")
    p.add_argument("--json")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    samples = measure(families, int(args.size_mib * MiB), args.ranks, args.repeats, args.steps, args.fit_batches,
                      args.all_column, reference=not args.no_reference, floor=args.floor,
                      paired=args.paired and not args.no_reference, megatron=args.keras_megatron)
    print(f"min / median over {args.repeats} interleaved repeats, N={args.ranks}, {args.size_mib:g} MiB, "
          f"load average (1 min) at the runs' starts in brackets")
    print("\n".join(summary(samples)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
