"""python -m bench: the scaling benchmark (the main job) and its subcommands.

The main job builds each model family at each size on N CPU ranks (or GPUs), with stock Keras
and with shardimpl, measures every rank's peak memory for the build and a train step, then
builds the largest size again under a per-rank budget (stock Keras must run out of memory,
sharded N >= 2 must fit). It prints a verdict per family and the table, and writes
report.html, report.md, results.json and two plots to --out.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import time

from bench import stopping
from bench.cli import MiB, PROG, Parser, budget_bytes, parse_args

os.environ.setdefault("KERAS_BACKEND", "torch")

_START = time.perf_counter()
_STARTED = time.strftime("%Y-%m-%d %H:%M:%S %Z")
_LOAD_START = list(os.getloadavg())  # the machine's load before this run adds its own


# --- the main job ---------------------------------------------------------------------------

_progress = {"done": 0, "total": 0}


def _step_at(args, size) -> bool:
    """Whether the scenarios of ``size`` measure a train step: the largest size only, unless
    --step-every-size (or none with --no-step)."""
    return not args.no_step and (getattr(args, "step_every_size", False) or size == max(args.sizes))


def scenarios_for(args, budget):
    """Every (family, size, N, mode) without a limit (the scaling), then the largest size again
    under the budget (the OOM demonstration), ordered so that one world of ranks serves each
    (N, mode) in turn."""
    from bench.harness.scenarios import Scenario

    meshes = getattr(args, "mesh", (None,))
    train = args.train
    layouts = getattr(args, "layouts", "family")
    out = [Scenario(fam, size * MiB, n, mode, device=args.device, step=_step_at(args, size), mesh=mesh,
                    layouts=layouts, train=train)
           for n in args.ranks for mode in args.modes
           for mesh in (meshes if mode in ("sharded", "naive") else (None,))  # BxM: where B x M = N
           if mesh is None or mesh[0] * mesh[1] == n
           for fam in args.families for size in args.sizes]
    if budget:
        out += [Scenario(fam, max(args.sizes) * MiB, n, mode, device=args.device, budget_bytes=budget, step=False,
                         layouts=layouts, train=train)
                for n in args.ranks for mode in args.modes for fam in args.families]
    return out


def _say(line) -> None:
    """Progress goes to stderr one whole line per write: rank output cannot split it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _progress_line(i, total, s, rows, seconds) -> str:
    from bench.report.summary import MODE_NAMES

    statuses = {r["status"] for r in rows}
    status = ("OOM" if "oom" in statuses else "ok" if statuses == {"ok"}
              else "/".join(sorted(statuses - {"ok"})))
    limit = f"under {s.budget_bytes / MiB:g} MiB" if s.budget_bytes else ""
    width = len(str(total))
    mode = MODE_NAMES.get(s.mode, s.mode) + (f" {s.mesh[0]}x{s.mesh[1]}" if s.mesh else "")
    return (f"[{i:>{width}}/{total}] {s.family:<11} {s.param_bytes // MiB:>5} MiB  N={s.ranks:<3} "
            f"{mode:<12} {limit:<16} {status:<7} {seconds:5.1f} s")


def collect_rows(args, budget):
    """Run every scenario of ``args``; (results.json rows, None). Ranks are reused across the
    scenarios of one (N, mode) (a fresh world for the budgeted ones) unless under torchrun."""
    from bench.harness.scenarios import measure_rank, rows_for, run_scenario
    from shardimpl import launch

    scenarios = scenarios_for(args, budget)
    _progress.update(done=0, total=len(scenarios))
    if not args.quiet:
        limit = (f"; then {max(args.sizes)} MiB under a {budget / MiB:g} MiB per-rank budget" if budget else "")
        _say(f"{PROG}: {len(scenarios)} scenarios on {args.device}: {','.join(args.families)} x "
             f"{','.join(map(str, args.sizes))} MiB x N = {','.join(map(str, args.ranks))} x "
             f"{','.join(args.modes)}{limit} -> {args.out}/")
    torchrun = launch.in_launched_world()
    if not torchrun:
        stopping.start_forkserver()
    rows, world, world_key = [], None, None
    try:
        for i, s in enumerate(scenarios, 1):
            t0 = time.perf_counter()
            if torchrun:
                launched = run_scenario(s, timeout=args.timeout)
            else:
                key = (s.ranks, s.mode, bool(s.budget_bytes))
                if world is None or world.closed or key != world_key:
                    if world is not None:
                        world.close()
                    world, world_key = launch.World(s.ranks, device=s.device, timeout=args.timeout), key
                launched = world.run(measure_rank, s, timeout=args.timeout)
            new = rows_for(s, launched)
            rows += new
            _progress["done"] = i
            if not args.quiet:
                _say(_progress_line(i, len(scenarios), s, new, time.perf_counter() - t0))
                for r in launched:
                    if r.status not in ("ok", "oom") and r.error:
                        _say(f"    rank {r.rank} {r.status}: {r.error.strip().splitlines()[-1][:200]}")
    finally:
        if world is not None:
            world.close()
    return rows, None


def _wrap(label, text) -> str:
    import shutil
    import textwrap

    width = max(60, min(120, shutil.get_terminal_size((100, 20)).columns))
    glue = "\x00"  # keeps "N = 2", "P = 128 MiB" on one line: the wrapper breaks at spaces only
    kept = re.sub(r"(?<=\b[A-Z]) = (?=\S)", f"{glue}={glue}", text)
    kept = re.sub(r"(?<=\d) (?=MiB|s\b|x\b)", glue, kept)
    wrapped = textwrap.fill(kept, width=width, initial_indent=f"{label}: ",
                            subsequent_indent=" " * (len(label) + 2))
    return wrapped.replace(glue, " ")


def write_all(args, rows, budget, extra=None, *, peers=()) -> int:
    """results.json, the plots, report.md, report.html; the table and the verdicts on stdout.
    Exit status 1 if a rank of the harness errored or timed out; rows of the modes in ``peers``
    are results like any other (their failures are in the table and the verdict), not the
    harness' failures."""
    from bench.report import html as html_report
    from bench.report import plots as plotting
    from bench.report import summary as report

    os.makedirs(args.out, exist_ok=True)
    plots = plotting.plot_scaling(rows, args.out, budget)
    if peers:
        plots += plotting.plot_peers(rows, args.out)
    meta = report.meta(device=args.device, budget_bytes=budget, extra={
        "command": " ".join([PROG] + [shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])]),
        "started": _STARTED, "load_average_start": _LOAD_START, "load_average": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - _START,
        "train_step": args.train.as_row() if getattr(args, "train", None) else None, **(extra or {})})
    path = os.path.join
    report.write_results(path(args.out, "results.json"), meta, rows)
    report.write_report(path(args.out, "report.md"), meta, rows, plots)
    html_report.write_html(path(args.out, "report.html"), meta, rows, plots)
    print(report.table(rows))
    print()
    for fam, text in report.verdicts(report.summarize(rows), budget).items():
        print(_wrap(fam, text))
    print(f"\nwrote {path(args.out, 'report.html')} (open it in a browser), report.md, results.json, "
          + ", ".join(os.path.basename(p) for p in plots))
    print(f"wall time {time.perf_counter() - _START:.0f} s (1-minute load average {_LOAD_START[0]:.2f} "
          f"at the start, {os.getloadavg()[0]:.2f} now; {os.cpu_count()} CPUs)")
    failed = [r for r in rows if r["status"] in ("error", "timeout")]
    bad = [r for r in failed if r["mode"] not in peers]
    if len(failed) > len(bad):
        print(f"{len(failed) - len(bad)} peer rows failed (error/timeout): results, in the table and the "
              "verdict; the exit status counts the harness' own rows", file=sys.stderr)
    if bad:
        print(f"{len(bad)} rank rows failed (error/timeout); see results.json", file=sys.stderr)
        return 1
    return 0


def _launched_world():
    """This process's `shardimpl.launchers.Launch` when a launcher (torchrun, srun) started it as
    one rank of several: the harness then runs on the launcher's ranks. None otherwise."""
    from shardimpl import launch, launchers

    return launchers.detect() if launch.in_launched_world() else None


def _use_the_launchers_world(args, launched) -> dict:
    """--ranks becomes the launcher's world size (said on rank 0 when it differs); the world
    (launcher, hosts, ranks per host) for the report's metadata."""
    from shardimpl import rendezvous

    world = launched.world_size
    if tuple(args.ranks) != (world,) and launched.rank == 0:
        _say(f"{PROG}: under {launched.launcher} the ranks are the launcher's: N = {world}; --ranks "
             f"{','.join(map(str, args.ranks))} is ignored (run {PROG} without a launcher to spawn "
             "each N itself)")
    args.ranks = (world,)
    args.quiet = args.quiet or launched.rank != 0
    rendezvous.initialize()
    return rendezvous.describe_world()


def run_main(argv) -> int:
    from bench import cli

    args = parse_args(argv, parser=cli.make_parser(description=__doc__))
    args.argv = list(argv)
    budget = budget_bytes(args.budget, args.sizes)
    launched = _launched_world()
    _prepare_process()
    world = _use_the_launchers_world(args, launched) if launched is not None else None
    rows, _ = collect_rows(args, budget)
    if launched is None:
        return write_all(args, rows, budget)
    status = write_all(args, rows, budget, {"world": world}) if launched.rank == 0 else int(
        any(r["status"] in ("error", "timeout") for r in rows))
    _leave_torchrun_world()
    return status


def _prepare_process() -> None:
    """After parsing (torch is imported here, not before): freed memory leaves the process,
    and torch's "CPU process group does not support alltoall yet" notice stays quiet in the
    ranks (TORCH_LOGS set by the user wins)."""
    os.environ.setdefault("TORCH_LOGS", "-dtensor")
    from shardimpl.memory import prefer_mmap

    prefer_mmap()  # under torchrun this process runs many scenarios: freed memory must leave


def _leave_torchrun_world() -> None:
    """Tear the process group down before exit: a live gloo group at interpreter exit can
    abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gate_main(argv) -> int:
    """`python -m bench gate [--device cuda]`: the memory regression gate; exit 1 on a violation."""
    from bench.gates import memory as gate

    p = Parser(prog=f"{PROG} gate", description=gate.__doc__,
               epilog=f"example:\n  {PROG} gate\n  {PROG} gate --device cuda   # on a GPU node",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    _prepare_process()
    violations, runs = gate.run_gate(device=args.device)
    print(gate.report(runs))
    for v in violations:
        print("GATE FAILED:", v)
    print("gate passed" if not violations else f"gate failed: {len(violations)} violation(s)")
    return 1 if violations else 0


def _peer_list(text):
    from bench.tools.peers import peer_names

    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in names if x not in peer_names()]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(map(repr, bad)) or '(none given)'}; choose from "
                                         f"{', '.join(peer_names())}, separated by commas. Received: {text!r}")
    return names


def peers_main(argv) -> int:
    """`python -m bench peers [options]`: the harness' modes and every peer in one report."""
    from bench import cli
    from bench.harness.scenarios import Scenario
    from bench.tools import peers

    p = cli.make_parser(f"{PROG} peers")
    p.description = peers.__doc__
    p.epilog = (f"example:\n  {PROG} peers --families mlp --sizes 16,64 --ranks 1,2\n"
                f"  {PROG} peers --peers keras-jax --families transformer --sizes 64 --ranks 1,2\n"
                "(creates or reuses each peer's virtualenv: --venv for keras-native, --jax-venv for keras-jax)\n\n"
                "exit status: 0 when the harness worked (a peer's failures are rows and a verdict line), "
                "1 when a rank of the harness failed, 2 bad options")
    p.add_argument("--peers", type=_peer_list, default=peers.peer_names(), metavar="LIST",
                   help=f"peers to run, from {','.join(peers.peer_names())} (default: all)")
    p.add_argument("--venv", default=os.environ.get("SHARDIMPL_NIGHTLY_VENV", ".venv-nightly"),
                   help="the keras-nightly virtualenv to create or reuse (default: .venv-nightly)")
    p.add_argument("--jax-venv", default=os.environ.get("SHARDIMPL_JAX_VENV"),
                   help="the Keras-on-JAX virtualenv to create or reuse (default: .venv-jax; with --device "
                        "cuda .venv-jax-cuda)")
    args = parse_args(argv, parser=p, out_default=os.path.join("bench-results", "peers"),
                      modes_default=("unsharded", "naive", "sharded"), native_here=False)
    args.argv = ["peers"] + list(argv)
    args.modes = tuple(m for m in args.modes if m not in peers.peer_names())
    budget = budget_bytes(args.budget, args.sizes)
    _prepare_process()
    rows, _ = collect_rows(args, budget)

    def scenarios_for_peer(name):
        return [Scenario(f, s * MiB, n, name, device=args.device, step=_step_at(args, s), train=args.train)
                for f in args.families for s in args.sizes for n in args.ranks]

    peer_rows, metas = peers.run_peers(args, scenarios_for_peer, args.peers)
    return write_all(args, rows + peer_rows, budget, {"peers": metas}, peers=tuple(args.peers))


def _check_plan_json(argv) -> None:
    """`plan --json PATH`: its folder is created and test-written before planning, not after."""
    from bench import cli

    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--json" and i + 1 < len(argv) else a[7:] if a.startswith("--json=") else None
        if path:
            problem = cli.check_out(os.path.dirname(path) or ".", "--json", "--json bench-results/plan.json")
            if problem:
                cli.Parser(prog=f"{PROG} plan").error(problem)


_TOOLS = {"speed": "bench.tools.speed", "first-step": "bench.tools.first_step",
          "optimizer-memory": "bench.tools.optimizer_memory",
          "init-speed": "bench.tools.init_speed", "partial-batch": "bench.tools.partial_batch",
          "step-phases": "bench.tools.step_phases"}


def _dispatch(argv) -> int:
    if argv and argv[0] in _TOOLS:
        import importlib

        return importlib.import_module(_TOOLS[argv[0]]).main(argv[1:])
    if argv and argv[0] == "gate":
        return gate_main(argv[1:])
    if argv and argv[0] == "plan":
        from bench.tools import plan

        _check_plan_json(argv[1:])
        os.environ.setdefault("TORCH_LOGS", "-dtensor")  # torch's alltoall notice, once per planned N
        return plan.main(argv[1:])
    if argv and argv[0] == "peers":
        return peers_main(argv[1:])
    if argv and argv[0] == "compare-memory":
        from bench.gates import compare_memory as compare

        return compare.main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run_main(argv)


def main(argv=None) -> int:
    """The command line. SIGINT exits 130 and SIGTERM 143, with one line and no process left."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stopping.install_signal_handlers()
    try:
        return _dispatch(argv)
    except stopping.Stopped as stop:
        signum = stop.signum
    except KeyboardInterrupt:  # a SIGINT that came before the handler was installed
        signum = signal.SIGINT
    done = f" after {_progress['done']} of {_progress['total']} scenarios" if _progress["total"] else ""
    stopping.exit_stopped(signum, f"{PROG}: stopped by {{signal}}{done} "
                                  f"({time.perf_counter() - _START:.1f} s); no report written")
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
