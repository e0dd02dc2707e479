"""Plan before booking a cluster: per-rank memory of a model far larger than this machine.

`python -m bench plan --family transformer --params 70B --ranks 8,64,1024 --mesh 1d,128x8`
runs shardimpl's real creation code (the Keras hook, layouts, shard-local initializers) and
the harness' real train step (Keras' compile + train_step with the optimizer, dtype policy,
remat, sequence length and global batch asked for: `bench.harness.training`) as rank 0 of an
N-rank world, under `FakeTensorMode` with torch's fake process group: shapes, shards and
collectives are real, storage is not, so a 70B model "builds" and trains on a laptop. The
PeakMeter counts the fake tensors' bytes exactly as it counts real ones. Rank 0 holds the
largest shard (chunks are ceil-sized), so its figures bound every rank's.

Each row itemises the run's peak: the model state (weights + gradients + optimizer slots,
this rank's, measured) beside ZeRO's figure for it (bytes per parameter x P / N: 16 for AdamW
in mixed precision), the largest block a layer gathers along "batch", and the activations a
forward keeps for backward. Defaults: AdamW, mixed_bfloat16, remat full, 4096 tokens, one
sequence per data-parallel rank (the batch of a ("batch", "model") mesh's B ranks is B).

Each N runs in a fresh process (the fake world is process-global).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["plan_rank", "plan", "parse_params", "default_train", "describe_error", "step_terms", "table", "main"]

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


def plan_rank(family: str, param_bytes, ranks: int, step: bool = True, mesh=None, train=None) -> dict:
    """Rank 0 of a fake ``ranks``-rank world: build (and train) the model; peaks of live bytes.

    ``mesh``: None (the family's 1-D mesh) or (B, M) / 'BxM' for a ("batch", "model") mesh.
    ``train``: the `TrainConfig` (default: `PLAN_DEFAULT` with one sequence per data rank).
    """
    import keras
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import shardimpl
    from bench.harness import training
    from bench.harness.families import build_model, layout_map, mesh_label, model_mesh, param_count, parse_mesh
    from shardimpl.fsdp import stats as fsdp_stats
    from shardimpl.mesh import to_torch_mesh
    from shardimpl.meters import PeakMeter

    mesh_shape = parse_mesh(mesh, ranks)
    train = train or default_train(mesh_shape)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    _strided_shard_bounds_outside_fake_mode()
    shardimpl.install()
    keras_mesh = model_mesh(family, [f"cpu:{r}" for r in range(ranks)], mesh_shape)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map(family, keras_mesh, param_bytes, batch=train.batch)))
    to_torch_mesh(keras_mesh)  # mesh and seed agreement outside the fake mode (they read real values)
    start = time.perf_counter()
    params = param_count(family, param_bytes)
    row = {"family": family if not isinstance(param_bytes, str) else f"{family} ({param_bytes})",
           "params": params, "param_bytes": params * training.variable_itemsize(train), "ranks": ranks,
           "mesh": mesh_label(mesh_shape, ranks), **train.as_row(), "step_peak_bytes": None,
           "step_error": None, "activation_bytes": None, "gathered_block_bytes": 0}
    row["ideal_bytes"] = row["param_bytes"] / ranks
    row["zero_state_bytes"] = params * training.state_bytes_per_param(train) / ranks
    shape = {"batch": train.batch, "seq": train.seq, "remat": train.remat == "full"}
    with FakeTensorMode(allow_non_fake_inputs=True), training.dtype_policy(train):
        with PeakMeter("cpu") as run:
            with PeakMeter("cpu") as build:
                model = build_model(family, param_bytes, **shape)
            row["build_peak_bytes"] = build.result().device_peak_bytes
            row["local_param_bytes"] = sum(_local(v.value) for v in model.weights)
            if step:
                try:
                    data = training.train_data(family, param_bytes, train)
                    training.compile_model(model, family, train)
                    training.train_step(model, data)  # creates the optimizer's slots, as the harness
                    fsdp_stats().reset()
                    with _forward_kept(model, run) as kept:
                        training.train_step(model, data)  # a forward beside the last step's gradients
                    row["gathered_block_bytes"] = fsdp_stats().largest_bytes
                    row["activation_bytes"] = kept["bytes"]
                except Exception as exc:  # a layout DTensor cannot run at this N is a result, not a crash
                    row["step_error"] = describe_error(exc)
        if step and row["step_error"] is None:
            row["step_peak_bytes"] = run.result().device_peak_bytes
            row.update(training.model_state_bytes(model))
    row["seconds"] = time.perf_counter() - start
    row["host_peak_rss_bytes"] = _max_rss()
    return row


def default_train(mesh_shape=None):
    """`PLAN_DEFAULT` with one sequence per data-parallel rank (B on a B x M mesh, 1 on one axis)."""
    from bench.harness.training import TrainConfig

    return TrainConfig(**{**PLAN_DEFAULT, "batch": mesh_shape[0] if mesh_shape else 1})


PLAN_DEFAULT = {"optimizer": "adamw", "precision": "mixed_bfloat16", "remat": "full", "seq": 4096}


def _local(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def describe_error(exc: BaseException) -> str:
    """One line that names the cause: the exception's own first line, and its causes' (Keras
    re-raises layer errors with the original message first and call arguments after)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        parts.append(f"{type(exc).__name__}: {first}"[:400])
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def _max_rss() -> int:
    """This (planning) process's peak resident set size so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def step_terms(row) -> int | None:
    """The run's named terms per rank: the model state (weights, gradients and optimizer slots
    in the variables' layouts) + 2 x the largest gathered block (the weight gathered again in
    backward and its gradient before the reduce-scatter) + the activations a forward keeps. What
    the run's peak has beyond them is temporaries (the optimizer's update, the loss's)."""
    if row.get("activation_bytes") is None or row.get("model_state_bytes") is None:
        return None
    return row["model_state_bytes"] + 2 * row["gathered_block_bytes"] + row["activation_bytes"]


@contextlib.contextmanager
def _forward_kept(model, meter):
    """Measures, during one Keras train step, the bytes its forward keeps for the backward: the
    live bytes when the loss is computed (Keras' torch step has run the forward and dropped the
    last step's gradients by then) less those when the step started, gradients excluded."""
    kept = {"bytes": None}
    start = {}
    original = model.compute_loss

    def compute_loss(*args, **kwargs):
        if kept["bytes"] is None:
            kept["bytes"] = meter.live_bytes - start["live"]
        return original(*args, **kwargs)

    grads = sum(_local(v.value.grad) for v in model.trainable_weights if v.value.grad is not None)
    start["live"] = meter.live_bytes - grads
    model.compute_loss = compute_loss
    try:
        yield kept
    finally:
        del model.compute_loss


def plan(family: str, param_bytes, ranks_list, *, step: bool = True, log=None, mesh=None,
         train=None, jobs: int = 1) -> list[dict]:
    """One row per world size in ``ranks_list``, each planned in a fresh process (``jobs`` at a time).

    ``mesh``: None for the family's 1-D mesh, or (B, M) / 'BxM' for a ("batch", "model") mesh
    (then ``ranks_list`` may be omitted or must be [B x M]). ``train``: a `TrainConfig`, or
    None for `default_train` (one sequence per data-parallel rank).
    """
    from bench.harness.families import parse_mesh

    shape = parse_mesh(mesh)
    if shape is not None:
        ranks_list = list(ranks_list or [shape[0] * shape[1]])
        if ranks_list != [shape[0] * shape[1]]:
            raise ValueError(f"plan: mesh {shape[0]}x{shape[1]} has {shape[0] * shape[1]} ranks; "
                             f"received ranks {ranks_list}.")
    return plan_runs(family, param_bytes, [(n, shape, train) for n in ranks_list], step=step, log=log, jobs=jobs)


def plan_runs(family: str, param_bytes, runs, *, step: bool = True, log=None, jobs: int = 1) -> list[dict]:
    """Rows for ``runs`` = [(N, mesh shape or None, TrainConfig or None)], in order; each in a
    fresh process (the fake world is process-global), ``jobs`` processes at a time."""
    from concurrent.futures import as_completed

    from shardimpl.launch import process_context

    jobs = max(1, min(jobs, len(runs)))
    with ProcessPoolExecutor(jobs, mp_context=process_context(), max_tasks_per_child=1) as pool:
        futures = {pool.submit(plan_rank, family, param_bytes, n, step, shape, train): i
                   for i, (n, shape, train) in enumerate(runs)}
        rows = [None] * len(runs)
        for future in as_completed(futures):
            row = rows[futures[future]] = future.result()
            if log:
                print(f"plan: {family} N={row['ranks']} mesh {row['mesh']}: {row['seconds']:.1f} s", file=log,
                      flush=True)
    return rows


def _mib(x):
    return "-" if x is None else f"{x / 2**20:,.1f}"


def table(rows) -> str:
    """The plan as Markdown: one row per (mesh, N), the run's peak itemised (MiB per rank)."""
    from bench.report.summary import count_text, train_label

    lines = ["family | params | N | mesh | step | build peak | build/ideal | run peak | model state | "
             "ZeRO's state | gathered block | activations | temporaries | run peak / ZeRO's state",
             " | ".join(["---"] * 14)]
    for r in rows:
        peak, zero = r.get("step_peak_bytes"), r.get("zero_state_bytes")
        lines.append(" | ".join([
            r["family"], count_text(r["params"]), str(r["ranks"]), r.get("mesh", "1d"), train_label(r),
            _mib(r["build_peak_bytes"]), f"{r['build_peak_bytes'] / r['ideal_bytes']:.3f}",
            _mib(peak), _mib(r.get("model_state_bytes")), _mib(zero), _mib(r.get("gathered_block_bytes")),
            _mib(r.get("activation_bytes")),
            "-" if peak is None or step_terms(r) is None else _mib(peak - step_terms(r)),
            "-" if peak is None or not zero else f"{peak / zero:.2f}",
        ]))
    lines.append("")
    lines.append("MiB per rank (rank 0 holds the largest shards). run peak: live bytes over the build and two "
                 "train steps (Keras' compile + train_step). model state: this rank's weights + gradients + "
                 "optimizer slots, measured; ZeRO's state: bytes per parameter x params / N (16 for AdamW in "
                 "float32 or mixed_bfloat16, 12 for SGD with momentum, half in bfloat16). gathered block: the "
                 "largest a layer gathers along \"batch\" (it and its gradient coexist in backward). activations: "
                 "what a forward keeps for backward (block inputs under remat). temporaries = run peak - (model "
                 "state + 2 x gathered block + activations): the optimizer's update and the loss's buffers.")
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
    from bench.cli import add_train_options, positive_int, train_config
    from bench.harness.families import FAMILIES
    from bench.harness.hub_families import PRESETS
    from bench.harness.training import TrainConfig, check_supported
    from bench.report import summary as report

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
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                   help="rows planned at once, each in its own process (default: the CPU count)")
    add_train_options(p, TrainConfig(**PLAN_DEFAULT), batch_default_text="one sequence per data-parallel rank")
    p.set_defaults(remat=None)  # full, but none for the mlp under mixed precision (`check_supported`)
    args = p.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",") if x]
    if not ranks or min(ranks) < 1:
        raise SystemExit("--ranks needs positive world sizes, e.g. --ranks 8,64,1024")
    preset = args.params.lower()
    if preset in PRESETS:
        args.family, size = PRESETS[preset][0], preset
    else:
        size = parse_params(args.params)
    if args.remat is None:
        args.remat = "none" if args.family == "mlp" and args.precision == "mixed_bfloat16" else "full"
    try:
        runs = _runs(ranks, [m for m in args.mesh.split(",") if m])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    runs = [(n, shape, train_config(args, batch=shape[0] if shape else 1)) for n, shape in runs]
    try:
        check_supported(args.family, runs[0][2])
    except ValueError as exc:
        p.error(str(exc))
    start = time.perf_counter()
    rows = plan_runs(args.family, size, runs, step=not args.no_step, log=sys.stderr, jobs=args.jobs)
    print(table(rows))
    print(f"planned {len(rows)} rows in {time.perf_counter() - start:.0f} s ({min(args.jobs, len(rows))} at a "
          f"time); largest planning process {max(r['host_peak_rss_bytes'] for r in rows) / 2**30:.2f} GiB RSS")
    for r in rows:
        if r.get("step_error"):
            print(f"N={r['ranks']} mesh {r.get('mesh', '1d')}: the train step could not run: {r['step_error']}")
    if args.json:
        meta = report.meta(device="cpu (FakeTensorMode, fake process group)", budget_bytes=None,
                           extra={"command": " ".join(sys.argv), "rank": 0})
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0
