"""First-step and new-shape latency of sharded training against stock Keras, in one run.

`python -m bench first-step [--families mlp,transformer,gemma,llama] [--size-mib 4] [--ranks 2]`

For each family: stock Keras in one process, then shardimpl on N ranks with the
family's LayoutMap, both compiled with SGD and MSE (keras-hub's CausalLMs: sparse
cross-entropy on next-token ids). Each runs ``train_on_batch``
``--steps`` times on one batch (the first call builds the optimizer, traces
and plans; the rest are steady), then once on a batch of another size (the new
shape pays DTensor's sharding propagation again). Prints first, median steady,
new-shape seconds and the first/steady ratio, and writes them as JSON with
``--json``. Rank 0's times are reported (ranks step in lock-step).
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


def _batch(family, size, rows):
    from bench.harness.families import HUB, sample_batch

    batch = sample_batch(family, size)
    if family in HUB:
        return {k: v[:rows].numpy() for k, v in batch.items()}
    return batch[:rows].numpy()


def measure_steps(family: str, size: int, sharded: bool, steps: int) -> dict:
    import keras
    import numpy as np

    from bench.harness.families import HUB, build_model, layout_map, model_mesh, sample_targets

    if sharded:
        import shardimpl

        shardimpl.install()
        mesh = model_mesh(family, keras.distribution.list_devices())
        kwargs = {"batch_dim_name": "batch"} if "batch" in mesh.axis_names else {}
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map(family, mesh, size), **kwargs))
    keras.utils.set_random_seed(1)
    model = build_model(family, size)
    x = _batch(family, size, 8)
    if family in HUB:  # a CausalLM: next-token ids, its own loss (its default metrics need them too)
        model.compile(optimizer=keras.optimizers.SGD(1e-3), weighted_metrics=[],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        y = sample_targets(family, size).numpy()[:8]
    else:
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
        out_shape = model.compute_output_shape({k: v.shape for k, v in x.items()} if isinstance(x, dict) else x.shape)
        y = np.zeros(out_shape, "float32")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    x2 = {k: v[:4] for k, v in x.items()} if isinstance(x, dict) else x[:4]
    start = time.perf_counter()
    model.train_on_batch(x2, y[:4])
    new_shape = time.perf_counter() - start
    return {"first": times[0], "steady": statistics.median(times[1:]), "new_shape": new_shape}


def measure(families, size, ranks, steps) -> list[dict]:
    from shardimpl import launch

    rows = []
    for family in families:
        row = {"family": family, "size_bytes": size, "ranks": ranks}
        for label, n, sharded in (("stock", 1, False), ("sharded", ranks, True)):
            result = launch.run(measure_steps, n, family, size, sharded, steps, timeout=900)[0]
            if result.status != "ok":
                row[label] = {"error": (result.error or result.status).strip().splitlines()[-1][:200]}
            else:
                row[label] = result.value
        rows.append(row)
    return rows


def _fmt(r):
    if "error" in r:
        return f"error: {r['error']}"
    return (f"first {r['first']:.2f} s, steady {r['steady'] * 1e3:.0f} ms, new shape {r['new_shape']:.2f} s, "
            f"first/steady {r['first'] / r['steady']:.0f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench first-step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="mlp,transformer,gemma,llama")
    p.add_argument("--size-mib", type=float, default=4.0)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = measure([f for f in args.families.split(",") if f], int(args.size_mib * MiB), args.ranks, args.steps)
    for row in rows:
        print(f"{row['family']:12} stock   : {_fmt(row['stock'])}")
        print(f"{'':12} sharded : {_fmt(row['sharded'])}  (N={row['ranks']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
