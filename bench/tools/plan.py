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

Each row is planned in fresh processes (the fake world is process-global; `bench.tools.plan_rank`
runs in them), ``--jobs`` at a time. A transformer deeper than 3 blocks is planned at 1, 2 and 3
blocks and extrapolated to its depth, phase by phase (`extrapolate_depth`): its blocks are
identical, so every phase's peak, the model state and the activations grow by the same bytes
per block; the 1-block run checks the line through the other two, and the row says how far it
was off (``depth.check``). ``--full-depth`` plans every block instead (a 70B model's 80 blocks
take about 20 times as long).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from bench.tools.plan_rank import describe_error, plan_rank  # noqa: F401 (describe_error: re-exported)

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["plan", "plan_runs", "extrapolate_depth", "parse_params", "default_train", "step_terms", "table", "main",
           "DEPTHS"]

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


def default_train(mesh_shape=None):
    """`PLAN_DEFAULT` with one sequence per data-parallel rank (B on a B x M mesh, 1 on one axis)."""
    from bench.harness.training import TrainConfig

    return TrainConfig(**{**PLAN_DEFAULT, "batch": mesh_shape[0] if mesh_shape else 1})


PLAN_DEFAULT = {"optimizer": "adamw", "precision": "mixed_bfloat16", "remat": "full", "seq": 4096}


def step_terms(row) -> int | None:
    """The run's named terms per rank: the model state (weights, gradients and optimizer slots
    in the variables' layouts) + 2 x the largest gathered block (the weight gathered again in
    backward and its gradient before the reduce-scatter) + the activations a forward keeps. What
    the run's peak has beyond them is temporaries (the optimizer's update, the loss's)."""
    if row.get("activation_bytes") is None or row.get("model_state_bytes") is None:
        return None
    return row["model_state_bytes"] + 2 * row["gathered_block_bytes"] + row["activation_bytes"]


def plan(family: str, param_bytes, ranks_list, *, step: bool = True, log=None, mesh=None,
         train=None, jobs: int = 1, full_depth: bool = False) -> list[dict]:
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
    return plan_runs(family, param_bytes, [(n, shape, train) for n in ranks_list], step=step, log=log,
                     jobs=jobs, full_depth=full_depth)


#: Blocks a deep transformer is planned at; its depth is extrapolated from them.
DEPTHS = (1, 2, 3)


def _depths(family: str, param_bytes, full_depth: bool) -> tuple:
    """The block counts to plan (None: the model's own depth)."""
    if family != "transformer" or full_depth:
        return (None,)
    from bench.harness.families import dims_for

    return DEPTHS if dims_for(family, param_bytes)["layers"] > max(DEPTHS) else (None,)


def plan_runs(family: str, param_bytes, runs, *, step: bool = True, log=None, jobs: int = 1,
              full_depth: bool = False) -> list[dict]:
    """Rows for ``runs`` = [(N, mesh shape or None, TrainConfig or None)], in order. Each run is
    planned in fresh processes (the fake world is process-global), ``jobs`` at a time: once, or
    at `DEPTHS` blocks and extrapolated (`extrapolate_depth`)."""
    from concurrent.futures import as_completed

    from shardimpl.launch import process_context

    runs = [(n, shape, train or default_train(shape)) for n, shape, train in runs]
    depths = _depths(family, param_bytes, full_depth)
    tasks = [(i, layers) for i in range(len(runs)) for layers in depths]
    results = [{} for _ in runs]
    jobs = max(1, min(jobs, len(tasks)))
    with ProcessPoolExecutor(jobs, mp_context=process_context(), max_tasks_per_child=1) as pool:
        futures = {pool.submit(plan_rank, family, param_bytes, runs[i][0], step, runs[i][1], runs[i][2], layers):
                   (i, layers) for i, layers in tasks}
        for future in as_completed(futures):
            i, layers = futures[future]
            results[i][layers] = future.result()
            if log and len(results[i]) == len(depths):
                n, shape, _ = runs[i]
                spent = sum(r["seconds"] for r in results[i].values())
                print(f"plan: {family} N={n} mesh {mesh_text(shape)}: {spent:.1f} s", file=log, flush=True)
    return [_row(family, param_bytes, run, result) for run, result in zip(runs, results)]


def mesh_text(shape) -> str:
    return "1d" if shape is None else f"{shape[0]}x{shape[1]}"


def _row(family: str, param_bytes, run, results: dict) -> dict:
    """The row of one run: what the model is, and this rank's figures (extrapolated in depth
    when the run was planned at `DEPTHS`)."""
    from bench.harness import training
    from bench.harness.families import dims_for, param_count

    n, shape, train = run
    params = param_count(family, param_bytes)
    row = {"family": family if not isinstance(param_bytes, str) else f"{family} ({param_bytes})",
           "params": params, "param_bytes": params * training.variable_itemsize(train), "ranks": n,
           "mesh": mesh_text(shape), **train.as_row(), "step_peak_bytes": None}
    row["ideal_bytes"] = row["param_bytes"] / n
    row["zero_state_bytes"] = params * training.state_bytes_per_param(train) / n
    if None in results:
        return {**row, **results[None]}
    return {**row, **extrapolate_depth(results, dims_for(family, param_bytes)["layers"])}


#: Figures that grow by the same bytes per block (every phase's peak too).
_PER_BLOCK = ("build_peak_bytes", "local_param_bytes", "activation_bytes", "weight_bytes", "grad_bytes",
              "slot_bytes", "model_state_bytes")


def extrapolate_depth(results: dict, layers: int) -> dict:
    """This rank's figures at ``layers`` blocks from plans at a few (``{blocks: plan_rank row}``):
    each linear figure on the line through the two deepest plans; the run's peak is the largest
    extrapolated phase peak. ``depth.check``: the largest relative miss of that line at the
    shallowest plan (0 when every figure grows exactly by block)."""
    depths = sorted(results)
    lo, a, b = (results[d] for d in depths)
    errors = [r["step_error"] for r in (lo, a, b) if r.get("step_error")]
    out = {"seconds": sum(r["seconds"] for r in results.values()),
           "host_peak_rss_bytes": max(r["host_peak_rss_bytes"] for r in results.values()),
           "gathered_block_bytes": max(r["gathered_block_bytes"] for r in results.values()),
           "step_error": errors[0] if errors else None}

    def line(get):
        ya, yb = get(a), get(b)
        if ya is None or yb is None:
            return None, None
        slope = (yb - ya) / (depths[2] - depths[1])
        return round(yb + slope * (layers - depths[2])), ya - slope * (depths[1] - depths[0])

    misses = []

    def fit(name, get):
        value, at_lo = line(get)
        if value is not None and get(lo):
            misses.append((abs(at_lo - get(lo)) / get(lo), name))
        return value

    for key in _PER_BLOCK:
        out[key] = fit(key, lambda r, k=key: r.get(k))
    phases = {name: fit(name, lambda r, k=name: r["phase_peaks"].get(k)) for name in b["phase_peaks"]}
    out["phase_peaks"] = phases
    if out["step_error"] is None and len(phases) > 1:
        out["step_peak_bytes"] = max(v for v in phases.values() if v is not None)
    worst = max(misses) if misses else (None, None)
    out["depth"] = {"blocks": layers, "planned": depths, "check": worst[0], "check_figure": worst[1]}
    return out


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
    p.add_argument("--full-depth", action="store_true",
                   help="plan every block of a deep transformer (default: 1, 2 and 3 blocks, extrapolated)")
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
    rows = plan_runs(args.family, size, runs, step=not args.no_step, log=sys.stderr, jobs=args.jobs,
                     full_depth=args.full_depth)
    print(table(rows))
    deep = [r["depth"] for r in rows if r.get("depth")]
    if deep:
        worst = max(deep, key=lambda d: d["check"] or 0)
        print(f"{worst['blocks']} blocks extrapolated from plans at {', '.join(map(str, worst['planned']))} "
              f"blocks; the line through the two deepest misses the shallowest by at most "
              f"{100 * (worst['check'] or 0):.2f} % ({worst['check_figure']}) (--full-depth plans every block)")
    print(f"planned {len(rows)} rows in {time.perf_counter() - start:.0f} s ({args.jobs} processes at a "
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
