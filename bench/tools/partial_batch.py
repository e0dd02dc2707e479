"""Cost of a batch the data axis does not divide (run replicated) against a full, split batch.

`python -m bench partial-batch [--mesh dp|2d] [--ranks 2] [--width 512] [--depth 4] [--batch 512]`

A batch whose size the data axis (D ranks) does not divide runs replicated:
every rank computes all of it (`shardimpl.keras.steps.splits_evenly`). On
DataParallel over ``--ranks`` (``--mesh dp``) or a (2, 2) ("batch", "model")
mesh with every kernel split along both axes (``--mesh 2d``: FSDP x TP), an MLP
runs ``train_on_batch`` in interleaved rounds on

* ``full``: B rows (split: B / D rows per rank);
* ``last``: B - 1 rows, the largest last partial batch (replicated: B - 1 per rank);
* ``one``:  1 row (replicated).

Per kind: rank 0's median step seconds and its peak of torch-allocator bytes
during the step (`shardimpl.meters.PeakMeter`, above the value at entry), with
the ratio to ``full``; the same for stock Keras in one process. Pad-and-mask
would pad ``last`` to B rows: it would cost what ``full`` costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

KINDS = ("full", "last", "one")


def _rows(kind: str, batch: int) -> int:
    return {"full": batch, "last": batch - 1, "one": 1}[kind]


def _build(width: int, depth: int):
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((width,))
    h = inputs
    for i in range(depth):
        h = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(width, name="head")(h))


def _distribute(mesh_kind: str) -> int:
    """Set the distribution; returns the data-axis size."""
    import keras

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    if mesh_kind == "dp":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return len(devices)
    mesh = keras.distribution.DeviceMesh((2, len(devices) // 2), ["batch", "model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[r".*kernel"] = ("batch", "model")
    lm[r".*bias"] = ("model",)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm, batch_dim_name="batch"))
    return 2


def measure_steps(mesh_kind: str | None, width: int, depth: int, batch: int, rounds: int) -> dict:
    """Interleaved rounds of full / last / one train steps; median seconds and peak bytes per kind."""
    import keras
    import numpy as np

    from shardimpl.meters import PeakMeter

    data_ranks = _distribute(mesh_kind) if mesh_kind else 1
    model = _build(width, depth)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    rs = np.random.RandomState(0)
    x = rs.randn(batch, width).astype("float32")
    y = rs.randn(batch, width).astype("float32")
    times = {k: [] for k in KINDS}
    peaks = {k: 0 for k in KINDS}
    for r in range(rounds + 1):  # round 0 warms up (optimizer build, sharding plans)
        for kind in KINDS:
            n = _rows(kind, batch)
            with PeakMeter("cpu", trace_python=False) as meter:
                start = time.perf_counter()
                model.train_on_batch(x[:n], y[:n])
                elapsed = time.perf_counter() - start
            if r:
                times[kind].append(elapsed)
                peaks[kind] = max(peaks[kind], meter.result().device_peak_bytes)
    return {"data_ranks": data_ranks,
            **{k: {"rows": _rows(k, batch), "seconds": statistics.median(times[k]), "peak_bytes": peaks[k]}
               for k in KINDS}}


def measure(mesh_kind: str, ranks: int, width: int, depth: int, batch: int, rounds: int) -> dict:
    from shardimpl import launch

    n = ranks if mesh_kind == "dp" else 4
    out = {"mesh": mesh_kind, "ranks": n, "width": width, "depth": depth, "batch": batch}
    for label, world, kind in (("stock", 1, None), ("sharded", n, mesh_kind)):
        row = launch.run(measure_steps, world, kind, width, depth, batch, rounds, timeout=900)[0]
        out[label] = row.value if row.status == "ok" else {"error": (row.error or row.status).strip()[-300:]}
    return out


def _print(result: dict) -> None:
    print(f"mesh {result['mesh']}, N = {result['ranks']}, MLP width {result['width']} x {result['depth'] + 1}, "
          f"B = {result['batch']}")
    for label in ("stock", "sharded"):
        r = result[label]
        if "error" in r:
            print(f"  {label:8} error: {r['error']}")
            continue
        full = r["full"]
        for kind in KINDS:
            k = r[kind]
            print(f"  {label:8} {kind:5} {k['rows']:5} rows: {k['seconds'] * 1e3:8.1f} ms "
                  f"({k['seconds'] / full['seconds']:.2f}x full), peak {k['peak_bytes'] / 2**20:7.2f} MiB "
                  f"({k['peak_bytes'] / max(full['peak_bytes'], 1):.2f}x full)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench partial-batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", choices=("dp", "2d"), default="dp")
    p.add_argument("--ranks", type=int, default=2, help="DataParallel ranks (--mesh dp; 2d uses 4)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.batch < 2:
        p.error(f"--batch must be at least 2 (a full and a smaller last batch). Received: --batch {args.batch}.")
    result = measure(args.mesh, args.ranks, args.width, args.depth, args.batch, args.rounds)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
