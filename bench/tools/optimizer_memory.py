"""Keras optimizers on shardimpl: whole-run peak per rank and step time, Keras' own update vs the chunked one.

`python -m bench optimizer-memory [--families mlp,transformer,llama] [--size-mib 16] [--ranks 1,2,4]
[--optimizers adamw,adam,sgd] [--speed-rounds 20] [--no-peaks] [--json FILE]`

Memory (one world per N): each rank, for every (family, optimizer, arm), builds
the family's model under its LayoutMap, compiles it with the Keras optimizer
and runs three ``train_on_batch`` steps, as a user would, all inside one
`PeakMeter` (the torch figure): the whole run's peak over P/N. It also records
the peak while ``optimizer.apply`` runs (live bytes at its start plus the
rise inside it), so that a peak elsewhere (forward, backward) shows. A
1/64-size run of the same kind goes first, unmetered for the figures, so
first-use costs stay out. Arm ``keras``: Keras' own update, inside
`shardimpl.keras.optimizers.keras_own_updates`; arm ``chunked``: shardimpl's.

Speed (``--speed-rounds`` > 0, N = the largest of ``--ranks``): one model per
(family, optimizer); after three warm-up steps of each arm, the steps
alternate between the arms, the order flipping every round, so machine load
hits both alike. Prints medians and the chunked/keras ratio of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

MiB = 1 << 20
ARMS = ("keras", "chunked")
STEPS = 3


def _optimizer(name: str):
    import keras

    makers = {"adamw": lambda: keras.optimizers.AdamW(1e-4), "adam": lambda: keras.optimizers.Adam(1e-4),
              "sgd": lambda: keras.optimizers.SGD(1e-4, momentum=0.9)}
    if name not in makers:
        raise ValueError(f"--optimizers: choose from {sorted(makers)}. Received: {name!r}.")
    return makers[name]()


def _arm(arm: str):
    from shardimpl.keras.optimizers import keras_own_updates

    return keras_own_updates() if arm == "keras" else contextlib.nullcontext()


def _sharded(family: str, size: int) -> None:
    import keras

    import shardimpl
    from bench.harness.families import layout_map, model_mesh

    shardimpl.install()
    mesh = model_mesh(family, keras.distribution.list_devices())
    kwargs = {"batch_dim_name": "batch"} if "batch" in mesh.axis_names else {}
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map(family, mesh, size), **kwargs))


def _compiled(family: str, size: int, optimizer: str):
    """(model, x, y): the family's model compiled with the Keras optimizer, and one batch."""
    import numpy as np

    from bench.harness.families import build_model, sample_batch

    model = build_model(family, size)
    model.compile(optimizer=_optimizer(optimizer), loss="mse")
    batch = sample_batch(family, size)
    x = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else batch.numpy()
    shapes = {k: v.shape for k, v in x.items()} if isinstance(x, dict) else x.shape
    return model, x, np.zeros(model.compute_output_shape(shapes), "float32")


def _metered_apply(model, outer, probe: dict) -> None:
    from shardimpl.meters import PeakMeter

    apply = model.optimizer.apply

    def metered(*args, **kwargs):
        live = outer.live_bytes
        with PeakMeter("cpu", trace_python=False) as meter:
            apply(*args, **kwargs)
        probe["update"] = max(probe["update"], live + meter.result().device_peak_bytes)

    model.optimizer.apply = metered


def _one_peak(family: str, size: int, optimizer: str, arm: str) -> dict:
    import torch.distributed as dist

    from shardimpl.meters import PeakMeter

    n = dist.get_world_size()
    _sharded(family, size)
    probe = {"update": 0}
    with _arm(arm):
        gc.collect()
        dist.barrier()
        with PeakMeter("cpu", trace_python=False):  # first use of this family's code paths
            model, x, y = _compiled(family, max(size // 64, 1 << 16), optimizer)
            for _ in range(2):
                model.train_on_batch(x, y)
        del model
        gc.collect()
        with PeakMeter("cpu", trace_python=False) as meter:
            model, x, y = _compiled(family, size, optimizer)
            _metered_apply(model, meter, probe)
            for _ in range(STEPS):
                model.train_on_batch(x, y)
    param_bytes = sum(int(v.value.numel()) * v.value.element_size() for v in model.weights)
    del model
    gc.collect()
    share = param_bytes / n
    return {"family": family, "optimizer": optimizer, "arm": arm, "ranks": n, "param_bytes": param_bytes,
            "peak_bytes": meter.result().device_peak_bytes, "peak_over_share": meter.result().device_peak_bytes / share,
            "update_peak_over_share": probe["update"] / share}


def measure_peaks(configs) -> list[dict]:
    """Runs on every rank: the memory rows of ``configs`` [(family, size, optimizer, arm)]."""
    from shardimpl.budgets import warm_thread_pools

    warm_thread_pools()
    return [_one_peak(*c) for c in configs]


def _one_speed(family: str, size: int, optimizer: str, rounds: int) -> dict:
    import torch.distributed as dist

    from shardimpl.budgets import prefer_mmap

    prefer_mmap(32 * MiB)  # an ordinary process's malloc, as `bench speed` times
    _sharded(family, size)
    model, x, y = _compiled(family, size, optimizer)
    for _ in range(STEPS):
        for arm in ARMS:
            with _arm(arm):
                model.train_on_batch(x, y)
    times = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in (ARMS if r % 2 == 0 else ARMS[::-1]):
            dist.barrier()
            with _arm(arm):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[arm].append(time.perf_counter() - start)
    keras_s, chunked_s = (statistics.median(times[a]) for a in ARMS)
    return {"family": family, "optimizer": optimizer, "ranks": dist.get_world_size(), "rounds": rounds,
            "keras_step_seconds": keras_s, "chunked_step_seconds": chunked_s, "ratio": chunked_s / keras_s}


def measure_speed(configs, rounds: int) -> list[dict]:
    """Runs on every rank: interleaved step times of ``configs`` [(family, size, optimizer)]."""
    return [_one_speed(*c, rounds) for c in configs]


def _ok(rows, what: str):
    bad = [r for r in rows if r.status != "ok"]
    if bad:
        raise SystemExit(f"{what}: " + "; ".join(f"rank {r.rank} {r.status}: {(r.error or '').strip()[-800:]}"
                                                 for r in bad))
    return [r.value for r in rows]


def main(argv=None) -> int:
    from shardimpl import launch

    p = argparse.ArgumentParser(prog="python -m bench optimizer-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="mlp,transformer,llama")
    p.add_argument("--size-mib", type=float, default=16.0)
    p.add_argument("--ranks", default="2")
    p.add_argument("--optimizers", default="adamw,adam,sgd")
    p.add_argument("--speed-rounds", type=int, default=0)
    p.add_argument("--no-peaks", action="store_true", help="time steps only")
    p.add_argument("--json")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    optimizers = [o for o in args.optimizers.split(",") if o]
    size = int(args.size_mib * MiB)
    out = {"load_before": os.getloadavg(), "peaks": [], "speed": []}
    for n in [] if args.no_peaks else [int(r) for r in args.ranks.split(",")]:
        configs = [(f, size, o, arm) for f in families for o in optimizers for arm in ARMS]
        per_rank = _ok(launch.run(measure_peaks, n, configs, timeout=3600), f"peaks at N={n}")
        for rows in zip(*per_rank):  # the largest over ranks
            worst = max(rows, key=lambda r: r["peak_bytes"])
            out["peaks"].append(worst)
            print(f"N={n} {worst['family']:12} {worst['optimizer']:6} {worst['arm']:8} whole run "
                  f"{worst['peak_over_share']:.2f} x P/N   during apply {worst['update_peak_over_share']:.2f} x P/N",
                  flush=True)
    if args.speed_rounds:
        n = max(int(r) for r in args.ranks.split(","))
        configs = [(f, size, o) for f in families for o in optimizers]
        per_rank = _ok(launch.run(measure_speed, n, configs, args.speed_rounds, timeout=3600), "speed")
        out["speed"] = per_rank
        for row in per_rank[0]:
            print(f"N={n} {row['family']:12} {row['optimizer']:6} step ms keras {row['keras_step_seconds'] * 1e3:7.1f}"
                  f"  chunked {row['chunked_step_seconds'] * 1e3:7.1f}  ratio {row['ratio']:.2f} (rank 0)", flush=True)
    out["load_after"] = os.getloadavg()
    print(f"load average before {out['load_before'][0]:.1f}, after {out['load_after'][0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
