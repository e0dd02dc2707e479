"""`python -m bench` (or `shardimpl-bench`): the scaling benchmark.

Builds each model family at each size on N ranks, unsharded (stock Keras) and
sharded (shardimpl), measures per-rank peaks, prints the table, and writes
results.json, report.md, scaling_vs_ranks.png and scaling_vs_size.png to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

MiB = 1 << 20
_START = time.perf_counter()
DEFAULT_SIZES_MIB = (16, 64, 256)
DEFAULT_RANKS = (1, 2, 4)


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def _names(text):
    return tuple(x for x in text.split(",") if x)


def _parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=_names, default=("mlp", "transformer"),
                   help="comma-separated: mlp,transformer (default: both)")
    p.add_argument("--sizes", type=_ints, default=DEFAULT_SIZES_MIB,
                   help="parameter sizes in MiB (default: 16,64,256)")
    p.add_argument("--ranks", type=_ints, default=DEFAULT_RANKS, help="world sizes (default: 1,2,4)")
    p.add_argument("--modes", type=_names, default=("unsharded", "sharded"),
                   help="comma-separated from unsharded,sharded,naive,keras-native (default: "
                        "unsharded,sharded; keras-native needs keras-nightly: see `python -m bench peers`)")
    p.add_argument("--budget", default="auto",
                   help="per-rank budget in MiB for the build; 'auto' = 3/4 of the largest size "
                        "(the unsharded largest build cannot fit, sharded N>=2 can); 'none' = no limit")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="bench-results", help="output folder (default: bench-results/)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per scenario before its ranks are stopped")
    p.add_argument("--no-step", action="store_true", help="measure the build only, no train step")
    p.add_argument("--mesh", default="1d",
                   help="comma-separated meshes for the sharded modes: 1d (the family's 1-D mesh) and/or BxM, "
                        "a (\"batch\", \"model\") mesh used where B x M is in --ranks (e.g. --mesh 1d,2x2)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _budget_bytes(text, sizes):
    if text == "none":
        return None
    if text == "auto":
        return int(0.75 * max(sizes) * MiB)
    return int(float(text) * MiB)


def _validate(args):
    from bench.families import FAMILIES
    from bench.scenarios import MODES

    for f in args.families:
        if f not in FAMILIES:
            raise SystemExit(f"--families: unknown family {f!r}; choose from {', '.join(FAMILIES)}")
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not args.sizes or min(args.sizes) <= 0 or not args.ranks or min(args.ranks) < 1:
        raise SystemExit("--sizes and --ranks need positive numbers, e.g. --sizes 16,64 --ranks 1,2,4")


def _meshes(args):
    from bench.families import parse_mesh

    try:
        return [parse_mesh(m) for m in getattr(args, "mesh", "1d").split(",") if m]
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _mesh_fits(mesh, n, mode) -> bool:
    """1-D runs everywhere; a BxM mesh only where B x M = N and the mode shards (stock Keras has none)."""
    return mesh is None or (mesh[0] * mesh[1] == n and mode in ("sharded", "naive"))


def collect_rows(args, budget):
    """Run every (family, size, N, mode) scenario of ``args``; results.json rows."""
    from bench.scenarios import Scenario, rows_for, run_scenario

    _validate(args)
    # Every scenario measured without a limit (the scaling), then the largest size again under
    # the per-rank budget (the OOM demonstration: unsharded must fail, sharded N >= 2 must fit).
    meshes = _meshes(args)
    scenarios = [
        Scenario(fam, size * MiB, n, mode, device=args.device, step=not args.no_step, mesh=mesh)
        for fam in args.families for size in args.sizes for n in args.ranks for mode in args.modes
        for mesh in (meshes if mode != "unsharded" else [None]) if _mesh_fits(mesh, n, mode)
    ]
    if budget:
        scenarios += [
            Scenario(fam, max(args.sizes) * MiB, n, mode, device=args.device, budget_bytes=budget, step=False)
            for fam in args.families for n in args.ranks for mode in args.modes
        ]
    rows = []
    for i, s in enumerate(scenarios, 1):
        t0 = time.perf_counter()
        if not args.quiet:
            limit = f" under {s.budget_bytes / MiB:.0f} MiB" if s.budget_bytes else ""
            on = f" mesh {s.mesh[0]}x{s.mesh[1]}" if s.mesh else ""
            print(f"[{i}/{len(scenarios)}] {s.family} {s.param_bytes // MiB} MiB N={s.ranks}{on} {s.mode}{limit} ...",
                  end="", flush=True, file=sys.stderr)
        new = rows_for(s, run_scenario(s, timeout=args.timeout))
        rows += new
        if not args.quiet:
            statuses = sorted({r["status"] for r in new})
            print(f" {'/'.join(statuses)} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return rows, None


def write_all(args, rows, budget, extra=None) -> int:
    """results.json, report.md, the plots and the table; exit status 1 if a rank errored."""
    from bench import report

    os.makedirs(args.out, exist_ok=True)
    meta = report.meta(device=args.device, budget_bytes=budget,
                       extra={"wall_seconds": time.perf_counter() - _START, "command": " ".join(sys.argv),
                              **(extra or {})})
    plots = report.plot_scaling(rows, args.out, budget)
    report.write_results(os.path.join(args.out, "results.json"), meta, rows)
    report.write_report(os.path.join(args.out, "report.md"), meta, rows, plots)
    print(report.table(rows))
    print(f"\nwrote {args.out}/results.json, report.md, " + ", ".join(os.path.basename(p) for p in plots))
    bad = [r for r in rows if r["status"] in ("error", "timeout")]
    if bad:
        print(f"{len(bad)} rank rows failed (error/timeout); see results.json", file=sys.stderr)
        return 1
    return 0


def _torchrun_rank():
    """This process's rank when started by torchrun (the harness then runs on torchrun's ranks)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0"))


def run_main(args) -> int:
    budget = _budget_bytes(args.budget, args.sizes)
    rank = _torchrun_rank()
    if rank is not None:
        world = int(os.environ["WORLD_SIZE"])
        if tuple(args.ranks) != (world,):
            args.ranks = (world,)  # under torchrun the world is torchrun's: every scenario uses it
        args.quiet = args.quiet or rank != 0
    rows, _ = collect_rows(args, budget)
    if rank is None:
        return write_all(args, rows, budget)
    status = write_all(args, rows, budget) if rank == 0 else int(
        any(r["status"] in ("error", "timeout") for r in rows))
    _leave_torchrun_world()
    return status


def _leave_torchrun_world() -> None:
    """Tear the process group down before exit: a live gloo group at interpreter exit can
    abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gate_main(argv) -> int:
    """`python -m bench gate [--device cuda]`: the memory regression gate; exit 1 on a violation."""
    from bench import gate

    p = argparse.ArgumentParser(prog="python -m bench gate", description=gate.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    violations, runs = gate.run_gate(device=args.device)
    print(gate.report(runs))
    for v in violations:
        print("GATE FAILED:", v)
    print("gate passed" if not violations else f"gate failed: {len(violations)} violation(s)")
    return 1 if violations else 0


def peers_main(argv) -> int:
    """`python -m bench peers [options]`: unsharded, naive, keras-native and sharded in one report."""
    from bench import peers
    from bench.scenarios import Scenario

    p = _parser()
    p.prog = "python -m bench peers"
    p.add_argument("--venv", default=os.environ.get("SHARDIMPL_NIGHTLY_VENV", ".venv-nightly"),
                   help="the keras-nightly virtualenv to create or reuse (default: .venv-nightly)")
    p.set_defaults(modes=("unsharded", "naive", "sharded"), out="bench-results/peers")
    args = p.parse_args(argv)
    local_modes = tuple(m for m in args.modes if m != "keras-native")
    args.modes = local_modes
    budget = _budget_bytes(args.budget, args.sizes)
    rows, status = collect_rows(args, budget)
    scenarios = [Scenario(f, s * MiB, n, "keras-native", device=args.device, budget_bytes=budget,
                          step=not args.no_step)
                 for f in args.families for s in args.sizes for n in args.ranks]
    native_rows, native_meta = peers.run_keras_native(args, scenarios, args.venv)
    rows += native_rows
    extra = {"keras_native": {"venv": args.venv, "keras": (native_meta or {}).get("keras"),
                              "torch": (native_meta or {}).get("torch"),
                              "error": None if native_meta else native_rows[0]["error"] if native_rows else None}}
    return write_all(args, rows, budget, extra)


def main(argv=None) -> int:
    from shardimpl.budgets import prefer_mmap

    prefer_mmap()  # under torchrun this process runs many scenarios: freed memory must leave
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gate":
        return gate_main(argv[1:])
    if argv and argv[0] == "plan":
        from bench import plan

        return plan.main(argv[1:])
    if argv and argv[0] == "peers":
        return peers_main(argv[1:])
    if argv and argv[0] == "compare-memory":
        from bench import compare

        return compare.main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run_main(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
