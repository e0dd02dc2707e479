"""Train-step speed of shardimpl against stock Keras, interleaved repeats in one run.

`python -m bench.speed [--families mlp,transformer] [--size-mib 64] [--ranks 2] [--repeats 3]`

Each repeat runs stock Keras in one process, then shardimpl on N ranks (the
family's LayoutMap), alternately, so machine load hits both alike. In each run
the model is built and compiled (SGD with momentum, MSE), two warm-up
``train_on_batch`` calls are made, then ``--steps`` timed ones (the median
is the run's step time), then ``fit`` over ``--fit-batches`` batches (steps/s,
after one warm-up epoch). Prints min / median over repeats and the
sharded/stock ratios; ``--json`` writes every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

MiB = 1 << 20


def run_once(family: str, size: int, sharded: bool, steps: int, fit_batches: int) -> dict:
    import keras
    import numpy as np

    from bench.families import BATCH, build_model, layout_map, model_mesh, sample_batch

    if sharded:
        import shardimpl

        shardimpl.install()
        mesh = model_mesh(family, keras.distribution.list_devices())
        kwargs = {"batch_dim_name": "batch"} if "batch" in mesh.axis_names else {}
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map(family, mesh, size), **kwargs))
    keras.utils.set_random_seed(1)
    model = build_model(family, size)
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss="mse")
    batch = sample_batch(family, size)
    x = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else batch.numpy()
    shape = model.compute_output_shape({k: v.shape for k, v in x.items()} if isinstance(x, dict) else x.shape)
    y = np.zeros(shape, "float32")
    for _ in range(2):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)

    def tile(a):
        return np.concatenate([a] * fit_batches)

    xs = {k: tile(v) for k, v in x.items()} if isinstance(x, dict) else tile(x)
    ys = tile(y)
    model.fit(xs, ys, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    model.fit(xs, ys, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    fit_seconds = time.perf_counter() - start
    return {"step_seconds": statistics.median(times), "steps_per_second": fit_batches / fit_seconds}


def measure(families, size, ranks, repeats, steps, fit_batches) -> dict:
    from shardimpl import launch

    samples = {f: {"stock": [], "sharded": []} for f in families}
    for _ in range(repeats):
        for family in families:
            for label, n, sharded in (("stock", 1, False), ("sharded", ranks, True)):
                row = launch.run(run_once, n, family, size, sharded, steps, fit_batches, timeout=900)[0]
                if row.status != "ok":
                    raise SystemExit(f"{family} {label}: {row.status}: {(row.error or '').strip()[-500:]}")
                samples[family][label].append(row.value)
    return samples


def summary(samples) -> list[str]:
    lines = []
    for family, runs in samples.items():
        def stat(label, key):
            values = [r[key] for r in runs[label]]
            return min(values), statistics.median(values)

        st, sh = stat("stock", "step_seconds"), stat("sharded", "step_seconds")
        fs, fh = stat("stock", "steps_per_second"), stat("sharded", "steps_per_second")
        lines.append(f"{family:12} step ms  stock {st[0] * 1e3:7.1f} / {st[1] * 1e3:7.1f}   sharded "
                     f"{sh[0] * 1e3:7.1f} / {sh[1] * 1e3:7.1f}   ratio (median) {sh[1] / st[1]:.2f}x")
        lines.append(f"{'':12} fit steps/s stock {fs[0]:5.1f} / {fs[1]:5.1f}   sharded {fh[0]:5.1f} / {fh[1]:5.1f}"
                     f"   ratio (median) {fh[1] / fs[1]:.2f}x")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="mlp,transformer")
    p.add_argument("--size-mib", type=float, default=64.0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fit-batches", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    samples = measure(families, int(args.size_mib * MiB), args.ranks, args.repeats, args.steps, args.fit_batches)
    print(f"min / median over {args.repeats} interleaved repeats, N={args.ranks}, {args.size_mib:g} MiB")
    print("\n".join(summary(samples)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
