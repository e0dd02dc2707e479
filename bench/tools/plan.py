"""Plan before booking a cluster: per-rank memory of a model far larger than this machine.

`python -m bench plan --family transformer --params 70B --ranks 8,64,1024 --mesh 1d,2x4,8x8,128x8`
runs shardimpl's real creation code (the Keras hook, layouts, shard-local
initializers) and a real train step (forward, backward, SGD with momentum on
DTensors) as rank 0 of an N-rank world, under `FakeTensorMode` with torch's
fake process group: shapes, shards and collectives are real, storage is not,
so a 70B model "builds" on a laptop. The PeakMeter counts the fake tensors'
bytes exactly as it counts real ones. Rank 0 holds the largest shard (chunks
are ceil-sized), so its figures bound every rank's.

Each N runs in a fresh process (the fake world is process-global).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["plan_rank", "plan", "parse_params", "main"]

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_params(text: str, itemsize: int = 4) -> int:
    """'70B' (parameters) -> bytes of float32 parameters; '256MiB' -> bytes; '1e6' -> parameters."""
    t = text.strip().upper()
    m = re.fullmatch(r"([0-9.E+]+)\s*(MIB|GIB|KIB)", t)
    if m:
        return int(float(m.group(1)) * {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}[m.group(2)])
    m = re.fullmatch(r"([0-9.E+]+)\s*([KMBGT]?)", t)
    if not m:
        raise ValueError(f"--params: cannot read {text!r}; use a parameter count like 70B, 1.3B, 350M "
                         "or a size like 256MiB.")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)]) * itemsize


def _strided_shard_bounds_outside_fake_mode() -> None:
    """In this (fresh, planning-only) process, let DTensor compute _StridedShard bounds on real tensors.

    torch 2.13 derives a strided shard's offsets from ``torch.arange(n).tolist()``,
    which FakeTensorMode refuses (a data-dependent output); keras-hub's attention
    einsums produce such placements. The arange is index arithmetic of n integers,
    not model data, so it runs on real memory here. Applied only in plan workers.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.tensor.placement_types import _StridedShard

    original = _StridedShard.local_shard_size_and_offset
    if getattr(original, "_shardimpl_plan", False):
        return

    def bounds(self, *args, **kwargs):
        with unset_fake_temporarily():
            return original(self, *args, **kwargs)

    bounds._shardimpl_plan = True
    _StridedShard.local_shard_size_and_offset = bounds


def plan_rank(family: str, param_bytes: int, ranks: int, step: bool = True, mesh=None) -> dict:
    """Rank 0 of a fake ``ranks``-rank world: build (and step) the model; peaks of live bytes.

    ``mesh``: None (the family's 1-D mesh) or (B, M) / 'BxM' for a ("batch", "model") mesh.
    """
    import keras
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import shardimpl
    from bench.harness.families import (build_model, exact_param_bytes, layout_map, mesh_label, model_mesh, parse_mesh,
                                sample_batch)
    from bench.harness.scenarios import _train_step
    from shardimpl.fsdp import stats as fsdp_stats
    from shardimpl.mesh import to_torch_mesh
    from shardimpl.meters import PeakMeter

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    _strided_shard_bounds_outside_fake_mode()
    shardimpl.install()
    mesh_shape = parse_mesh(mesh, ranks)
    keras_mesh = model_mesh(family, [f"cpu:{r}" for r in range(ranks)], mesh_shape)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map(family, keras_mesh, param_bytes)))
    to_torch_mesh(keras_mesh)  # mesh and seed agreement outside the fake mode (they read real values)
    start = time.perf_counter()
    step_peak = None
    with FakeTensorMode(allow_non_fake_inputs=True):
        with PeakMeter("cpu") as build:
            model = build_model(family, param_bytes)
        local = sum(v.value.to_local().numel() * v.value.element_size() for v in model.weights)
        trainable = sum(v.value.to_local().numel() * v.value.element_size() for v in model.trainable_weights)
        step_error = activations = None
        block = 0
        if step:
            batch = sample_batch(family, param_bytes)
            try:
                _train_step(model, batch, "cpu")  # creates the momentum slots, as in the real harness
                fsdp_stats().reset()
                with PeakMeter("cpu") as meter:
                    _train_step(model, batch, "cpu")
                step_peak = meter.result().device_peak_bytes
                block = fsdp_stats().largest_bytes
                activations = _forward_kept_bytes(model, batch)
            except Exception as exc:  # a layout DTensor cannot run at this N is a result, not a crash
                step_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return {
        "family": family if not isinstance(param_bytes, str) else f"{family} ({param_bytes})",
        "param_bytes": exact_param_bytes(family, param_bytes), "ranks": ranks,
        "mesh": mesh_label(mesh_shape, ranks),
        "build_peak_bytes": build.result().device_peak_bytes, "step_peak_bytes": step_peak,
        "local_param_bytes": local, "ideal_bytes": exact_param_bytes(family, param_bytes) / ranks,
        "seconds": time.perf_counter() - start, "step_error": step_error,
        # The step's terms (see `step_bound`): gradients + momentum in the variables' layouts,
        # the largest block a layer gathers along the data axis, what a forward keeps for backward.
        "grad_momentum_bytes": 2 * trainable, "gathered_block_bytes": block, "activation_bytes": activations,
        "host_peak_rss_bytes": _max_rss(),
    }


def _max_rss() -> int:
    """This (planning) process's peak resident set size so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def step_bound(row) -> int | None:
    """The derived per-rank step bound: 2 x trainable shard (gradients + momentum, kept in the
    variables' layouts) + 2 x the largest gathered block (the weight gathered again in backward
    and its gradient before the reduce-scatter) + the activations a forward keeps."""
    if row.get("activation_bytes") is None:
        return None
    return row["grad_momentum_bytes"] + 2 * row["gathered_block_bytes"] + row["activation_bytes"]


def _forward_kept_bytes(model, batch) -> int:
    """Bytes a forward leaves alive for its backward (activations; gathered weights are tokens)."""
    from bench.harness.scenarios import _to_device
    from shardimpl.meters import PeakMeter

    with PeakMeter("cpu") as meter:
        out = model(_to_device(batch, "cpu"))
        loss = (out.float() ** 2).mean()
    kept = meter.result().live_bytes_end
    del out, loss
    return kept


def plan(family: str, param_bytes: int, ranks_list, *, step: bool = True, log=None, mesh=None) -> list[dict]:
    """One row per world size in ``ranks_list`` (each in a fresh process).

    ``mesh``: None for the family's 1-D mesh, or (B, M) / 'BxM' for a ("batch", "model") mesh
    (then ``ranks_list`` may be omitted or must be [B x M]).
    """
    from bench.harness.families import parse_mesh
    from shardimpl.launch import process_context

    shape = parse_mesh(mesh)
    if shape is not None:
        ranks_list = list(ranks_list or [shape[0] * shape[1]])
        if ranks_list != [shape[0] * shape[1]]:
            raise ValueError(f"plan: mesh {shape[0]}x{shape[1]} has {shape[0] * shape[1]} ranks; "
                             f"received ranks {ranks_list}.")
    rows = []
    for n in ranks_list:
        if log:
            label = f" mesh {shape[0]}x{shape[1]}" if shape else ""
            print(f"plan: {family} N={n}{label} ...", end="", flush=True, file=log)
        with ProcessPoolExecutor(1, mp_context=process_context(), max_tasks_per_child=1) as pool:
            row = pool.submit(plan_rank, family, param_bytes, n, step, shape).result()
        rows.append(row)
        if log:
            print(f" {row['seconds']:.1f} s", file=log)
    return rows


def _mib(x):
    return "-" if x is None else f"{x / 2**20:,.1f}"


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def table(rows) -> str:
    """The plan as Markdown: one row per (mesh, N), the step's terms itemised (MiB per rank)."""
    lines = ["family | params | N | mesh | build peak | build/ideal | step peak | step/ideal | "
             "grads+momentum | gathered block | activations | bound | ideal P/N",
             "--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---"]
    for r in rows:
        step = r["step_peak_bytes"]
        lines.append(" | ".join([
            r["family"], _count(r["param_bytes"] // 4), str(r["ranks"]), r.get("mesh", "1d"),
            _mib(r["build_peak_bytes"]), f"{r['build_peak_bytes'] / r['ideal_bytes']:.3f}",
            _mib(step), "-" if step is None else f"{step / r['ideal_bytes']:.2f}",
            _mib(r.get("grad_momentum_bytes")), _mib(r.get("gathered_block_bytes")),
            _mib(r.get("activation_bytes")), _mib(step_bound(r)), _mib(r["ideal_bytes"]),
        ]))
    lines.append("")
    lines.append("MiB per rank (rank 0 holds the largest shards). step peak: one train step (forward, "
                 "backward, SGD with momentum) above the weights. bound = grads+momentum + 2 x gathered "
                 "block (the block a layer gathers along \"batch\", gathered again in backward, and its "
                 "gradient before the reduce-scatter) + activations (what a forward keeps for backward). "
                 "A step peak above the bound is memory the layout wastes (1-D at N > heads: attention "
                 "gradients computed whole).")
    return "\n".join(lines)


def _runs(ranks, meshes):
    """(N, mesh) pairs: '1d' runs every N of ``ranks``; 'BxM' runs N = B x M."""
    from bench.harness.families import parse_mesh

    runs = []
    for m in meshes:
        shape = parse_mesh(m)
        if shape is None:
            runs += [(n, None) for n in ranks]
        else:
            runs.append((shape[0] * shape[1], shape))
    return runs


def main(argv=None) -> int:
    from bench.report import summary as report
    from bench.harness.families import FAMILIES
    from bench.harness.hub_families import PRESETS

    p = argparse.ArgumentParser(prog="python -m bench plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="transformer")
    p.add_argument("--params", default="70B",
                   help="parameter count (70B, 1.3B, 350M), size (256MiB), or a published shape of a "
                        "keras-hub family: " + ", ".join(sorted(PRESETS)) + " (sets --family)")
    p.add_argument("--ranks", default="8,64,1024", help="comma-separated world sizes (for --mesh 1d)")
    p.add_argument("--mesh", default="1d",
                   help="comma-separated meshes: 1d (the family's 1-D mesh, at every --ranks) and/or BxM, "
                        "a (\"batch\", \"model\") mesh of B x M ranks, e.g. --mesh 1d,2x4,8x8,128x8")
    p.add_argument("--json", help="write {meta, rows} here")
    p.add_argument("--no-step", action="store_true", help="plan the build only")
    args = p.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",") if x]
    if not ranks or min(ranks) < 1:
        raise SystemExit("--ranks needs positive world sizes, e.g. --ranks 8,64,1024")
    preset = args.params.lower()
    if preset in PRESETS:
        args.family, size = PRESETS[preset][0], preset
    else:
        size = parse_params(args.params)
    try:
        runs = _runs(ranks, [m for m in args.mesh.split(",") if m])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    rows = []
    for n, shape in runs:
        rows += plan(args.family, size, [n], step=not args.no_step, log=sys.stderr, mesh=shape)
    print(table(rows))
    for r in rows:
        if r.get("step_error"):
            print(f"N={r['ranks']} mesh {r.get('mesh', '1d')}: the train step could not run: {r['step_error']}")
    if args.json:
        meta = report.meta(device="cpu (FakeTensorMode, fake process group)", budget_bytes=None,
                           extra={"command": " ".join(sys.argv), "dtype": "float32", "rank": 0})
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0
