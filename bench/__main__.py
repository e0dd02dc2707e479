"""python -m bench: the scaling benchmark (the main job) and its subcommands.

The main job builds each model family at each size on N CPU ranks (or GPUs), with stock Keras
and with shardimpl, measures every rank's peak memory for the build and a train step, then
builds the largest size again under a per-rank budget (stock Keras must run out of memory,
sharded N >= 2 must fit). It prints a verdict per family and the table, and writes
report.html, report.md, results.json and two plots to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
import time

from bench.families import FAMILIES
from bench.scenarios import MODES

os.environ.setdefault("KERAS_BACKEND", "torch")

MiB = 1 << 20
_START = time.perf_counter()
PROG = "python -m bench"
DEFAULT_SIZES_MIB = (16, 64, 256)
DEFAULT_RANKS = (1, 2, 4)
DEFAULT_MODES = ("unsharded", "sharded")
QUICK_SIZES_MIB = (8, 32)
QUICK_RANKS = (1, 2)
MAIN_JOB_SECONDS = "about 70 s"  # measured: see the README

_SUBCOMMANDS = f"""\
subcommands ({PROG} SUBCOMMAND --help for each one's options):
  run             the main job (the default: `{PROG}` is `{PROG} run`)
                    {PROG} --quick --out /tmp/smoke
  peers           unsharded, naive, keras-native and sharded in one report
                    {PROG} peers --families mlp --sizes 16,64 --ranks 1,2
  plan            per-rank peaks at scale, predicted with fake tensors (no memory used)
                    {PROG} plan --family transformer --params 70B --ranks 8,64,1024
  gate            the memory regression gate CI runs (exit 1 on a violation)
                    {PROG} gate
  compare-memory  gate per-rank peaks between two pytest-benchmark JSON files
                    {PROG} compare-memory .benchmarks/base.json .benchmarks/new.json --factor 1.10

examples:
  {PROG}                                    # the main job, {MAIN_JOB_SECONDS} on 2 cores
  {PROG} --quick                            # smoke run: sizes {",".join(map(str, QUICK_SIZES_MIB))} MiB, N = {",".join(map(str, QUICK_RANKS))}, build only
  {PROG} --families mlp --sizes 32,128 --ranks 1,2,4 --budget 96 --out /tmp/r

exit status: 0 done, 1 a rank failed (error/timeout, see results.json), 2 bad options,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong, what was received, what to do."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(parser, message):
    parser.error(message)


# --- option types: each raises with the valid choices and the value received --------------


def _positive_ints(what, example):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            values = tuple(sorted({int(x) for x in items}))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected {what}: positive whole numbers separated by commas, e.g. {example}. "
                f"Received: {text!r}")
        return values
    return parse


def _names(what, valid):
    def parse(text):
        items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [x for x in items if x not in valid]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}; choose from "
                f"{', '.join(valid)}, separated by commas. Received: {text!r}")
        return items
    return parse


def _budget(text):
    t = text.strip().lower()
    if t in ("auto", "none"):
        return t
    try:
        value = float(t)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'none' or a positive number of MiB per rank, e.g. 192. Received: {text!r}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, e.g. 300. Received: {text!r}")
    return value


def _parser(prog=PROG):
    p = _Parser(prog=prog, description=__doc__, epilog=_SUBCOMMANDS,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=_names("family", FAMILIES), default=None, metavar="LIST",
                   help=f"model families, from {','.join(FAMILIES)} (default: all)")
    p.add_argument("--sizes", type=_positive_ints("sizes in MiB", "16,64,256"), default=None, metavar="MIB",
                   help=f"parameter sizes in MiB (default: {','.join(map(str, DEFAULT_SIZES_MIB))})")
    p.add_argument("--ranks", type=_positive_ints("world sizes", "1,2,4"), default=None, metavar="N",
                   help=f"world sizes (default: {','.join(map(str, DEFAULT_RANKS))})")
    p.add_argument("--modes", type=_names("mode", MODES), default=None, metavar="LIST",
                   help=f"from {','.join(MODES)} (default: {','.join(DEFAULT_MODES)}; keras-native needs "
                        f"keras-nightly: `{PROG} peers` makes its environment)")
    p.add_argument("--budget", type=_budget, default="auto", metavar="MIB",
                   help="per-rank budget for the largest size's second build: 'auto' = 3/4 of the largest "
                        "size (stock Keras cannot fit, sharded N >= 2 can), 'none', or MiB (default: auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks on this machine's cores; cuda: one rank per GPU (default: cpu)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, created if missing (default: bench-results/)")
    p.add_argument("--timeout", type=_seconds, default=300.0, metavar="S",
                   help="seconds per scenario before its ranks are stopped (default: 300)")
    p.add_argument("--no-step", action="store_true", help="measure the build only, no train step")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: sizes {','.join(map(str, QUICK_SIZES_MIB))} MiB, N = "
                        f"{','.join(map(str, QUICK_RANKS))}, build only; options given explicitly still apply")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _has_keras_nightly() -> bool:
    from importlib import metadata

    for dist in ("keras-nightly", "keras"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if dist == "keras-nightly" or ".dev" in version:
            return True
    return False


def _check_out(path) -> str | None:
    """None when ``path`` is (now) a folder we can write to, else why not."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bench-write-test-"):
            pass
    except OSError as exc:
        return (f"--out: cannot create or write to the folder {path!r} ({exc.strerror or exc}); "
                "choose a writable folder, e.g. --out bench-results")
    return None


def parse_args(argv, *, parser=None, out_default="bench-results", modes_default=DEFAULT_MODES,
               native_here=True):
    """Parsed and validated options: every check runs here, before any rank starts."""
    p = parser or _parser()
    args = p.parse_args(argv)
    quick = args.quick
    args.families = args.families or FAMILIES
    args.sizes = args.sizes or (QUICK_SIZES_MIB if quick else DEFAULT_SIZES_MIB)
    args.ranks = args.ranks or (QUICK_RANKS if quick else DEFAULT_RANKS)
    args.modes = args.modes or modes_default
    args.no_step = args.no_step or quick
    args.out = args.out or out_default
    if native_here and "keras-native" in args.modes and not _has_keras_nightly():
        _fail(p, "--modes keras-native needs keras-nightly, which this environment lacks; "
                 f"`{PROG} peers` measures it in its own virtualenv")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail(p, "--device cuda: this machine has no usable CUDA device; use --device cpu")
    problem = _check_out(args.out)
    if problem:
        _fail(p, problem)
    return args


def _budget_bytes(budget, sizes):
    if budget == "none":
        return None
    if budget == "auto":
        return int(0.75 * max(sizes) * MiB)
    return int(budget * MiB)


# --- stopping cleanly on SIGINT / SIGTERM ---------------------------------------------------


class Stopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM, after every child process was killed."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_stopping = False


def _kill_descendants() -> None:
    """SIGKILL every process this one started, by pid: ranks, the forkserver, the resource
    tracker, a peers subprocess and theirs."""
    import psutil

    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in kids:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(kids, timeout=3)


def _on_signal(signum, frame):
    global _stopping
    if _stopping:
        return
    _stopping = True
    _kill_descendants()  # first: ranks must not outlive us, whatever the main thread was doing
    raise Stopped(signum)


def _install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # background jobs keep ignoring it
        signal.signal(signal.SIGINT, _on_signal)


def _exit_stopped(signum) -> None:
    """One line, no process left, exit 128 + signum (130 for SIGINT, 143 for SIGTERM)."""
    import multiprocessing.process
    import shutil

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _kill_descendants()
    tempdir = multiprocessing.process.current_process()._config.get("tempdir")
    if tempdir:
        shutil.rmtree(tempdir, ignore_errors=True)  # the forkserver's socket folder
    name = signal.Signals(signum).name
    done = f" after {_progress['done']} of {_progress['total']} scenarios" if _progress["total"] else ""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    sys.stderr.write(f"{PROG}: stopped by {name}{done} ({time.perf_counter() - _START:.1f} s); "
                     "no report written\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # skip atexit: multiprocessing's would wait on the killed children


def _start_forkserver() -> None:
    """Start the ranks' forkserver with SIGINT ignored (ranks inherit it): Ctrl-C in a terminal
    reaches the whole process group, and only this process should answer it."""
    from multiprocessing import forkserver

    from shardimpl import launch

    if launch._in_torchrun():
        return
    launch._context()  # the preload list
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


# --- the main job ---------------------------------------------------------------------------

_progress = {"done": 0, "total": 0}


def scenarios_for(args, budget):
    """Every (family, size, N, mode) without a limit (the scaling), then the largest size again
    under the budget (the OOM demonstration), ordered so that one world of ranks serves each
    (N, mode) in turn."""
    from bench.scenarios import Scenario

    out = [Scenario(fam, size * MiB, n, mode, device=args.device, step=not args.no_step)
           for n in args.ranks for mode in args.modes for fam in args.families for size in args.sizes]
    if budget:
        out += [Scenario(fam, max(args.sizes) * MiB, n, mode, device=args.device, budget_bytes=budget, step=False)
                for n in args.ranks for mode in args.modes for fam in args.families]
    return out


def _say(line) -> None:
    """Progress goes to stderr one whole line per write: rank output cannot split it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _progress_line(i, total, s, rows, seconds) -> str:
    from bench.report import MODE_NAMES

    statuses = {r["status"] for r in rows}
    status = ("OOM" if "oom" in statuses else "ok" if statuses == {"ok"}
              else "/".join(sorted(statuses - {"ok"})))
    limit = f"under {s.budget_bytes / MiB:g} MiB" if s.budget_bytes else ""
    width = len(str(total))
    return (f"[{i:>{width}}/{total}] {s.family:<11} {s.param_bytes // MiB:>5} MiB  N={s.ranks:<3} "
            f"{MODE_NAMES.get(s.mode, s.mode):<12} {limit:<16} {status:<7} {seconds:5.1f} s")


def collect_rows(args, budget):
    """Run every scenario of ``args``; (results.json rows, None). Ranks are reused across the
    scenarios of one (N, mode) (a fresh world for the budgeted ones) unless under torchrun."""
    from bench.scenarios import measure_rank, rows_for, run_scenario
    from shardimpl import launch

    scenarios = scenarios_for(args, budget)
    _progress.update(done=0, total=len(scenarios))
    if not args.quiet:
        limit = (f"; then {max(args.sizes)} MiB under a {budget / MiB:g} MiB per-rank budget" if budget else "")
        _say(f"{PROG}: {len(scenarios)} scenarios on {args.device}: {','.join(args.families)} x "
             f"{','.join(map(str, args.sizes))} MiB x N = {','.join(map(str, args.ranks))} x "
             f"{','.join(args.modes)}{limit} -> {args.out}/")
    torchrun = launch._in_torchrun()
    if not torchrun:
        _start_forkserver()
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
    return textwrap.fill(text, width=width, initial_indent=f"{label}: ",
                         subsequent_indent=" " * (len(label) + 2))


def write_all(args, rows, budget, extra=None) -> int:
    """results.json, the plots, report.md, report.html; the table and the verdicts on stdout.
    Exit status 1 if a rank errored or timed out."""
    from bench import html_report, report

    os.makedirs(args.out, exist_ok=True)
    meta = report.meta(device=args.device, budget_bytes=budget, extra={
        "wall_seconds": time.perf_counter() - _START,
        "command": " ".join([PROG] + [shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])]),
        "started": _STARTED, "load_average": list(os.getloadavg()), "load_average_start": _LOAD_START,
        **(extra or {})})
    path = os.path.join
    report.write_results(path(args.out, "results.json"), meta, rows)
    plots = report.plot_scaling(rows, args.out, budget)
    report.write_report(path(args.out, "report.md"), meta, rows, plots)
    html_report.write_html(path(args.out, "report.html"), meta, rows, plots)
    print(report.table(rows))
    print()
    for fam, text in report.verdicts(report.summarize(rows), budget).items():
        print(_wrap(fam, text))
    print(f"\nwrote {path(args.out, 'report.html')} (open it in a browser), report.md, results.json, "
          + ", ".join(os.path.basename(p) for p in plots))
    print(f"wall time {meta['wall_seconds']:.0f} s (load average {meta['load_average'][0]:.2f})")
    bad = [r for r in rows if r["status"] in ("error", "timeout")]
    if bad:
        print(f"{len(bad)} rank rows failed (error/timeout); see results.json", file=sys.stderr)
        return 1
    return 0


_STARTED = time.strftime("%Y-%m-%d %H:%M:%S %Z")
_LOAD_START = list(os.getloadavg())


def _torchrun_rank():
    """This process's rank when started by torchrun (the harness then runs on torchrun's ranks)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0"))


def run_main(argv) -> int:
    args = parse_args(argv)
    args.argv = list(argv)
    budget = _budget_bytes(args.budget, args.sizes)
    rank = _torchrun_rank()
    if rank is not None:
        args.ranks = (int(os.environ["WORLD_SIZE"]),)  # under torchrun the world is torchrun's
        args.quiet = args.quiet or rank != 0
    _prepare_process()
    rows, _ = collect_rows(args, budget)
    if rank is None:
        return write_all(args, rows, budget)
    status = write_all(args, rows, budget) if rank == 0 else int(
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
    from bench import gate

    p = _Parser(prog=f"{PROG} gate", description=gate.__doc__,
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


def peers_main(argv) -> int:
    """`python -m bench peers [options]`: unsharded, naive, keras-native and sharded in one report."""
    from bench import peers
    from bench.scenarios import Scenario

    p = _parser(f"{PROG} peers")
    p.description = peers.__doc__
    p.epilog = (f"example:\n  {PROG} peers --families mlp --sizes 16,64 --ranks 1,2\n"
                "(creates or reuses the keras-nightly virtualenv --venv for the keras-native rows)")
    p.add_argument("--venv", default=os.environ.get("SHARDIMPL_NIGHTLY_VENV", ".venv-nightly"),
                   help="the keras-nightly virtualenv to create or reuse (default: .venv-nightly)")
    args = parse_args(argv, parser=p, out_default=os.path.join("bench-results", "peers"),
                      modes_default=("unsharded", "naive", "sharded"), native_here=False)
    args.argv = ["peers"] + list(argv)
    args.modes = tuple(m for m in args.modes if m != "keras-native")
    budget = _budget_bytes(args.budget, args.sizes)
    _prepare_process()
    rows, _ = collect_rows(args, budget)
    scenarios = [Scenario(f, s * MiB, n, "keras-native", device=args.device, budget_bytes=budget,
                          step=not args.no_step)
                 for f in args.families for s in args.sizes for n in args.ranks]
    native_rows, native_meta = peers.run_keras_native(args, scenarios, args.venv)
    rows += native_rows
    extra = {"keras_native": {"venv": args.venv, "keras": (native_meta or {}).get("keras"),
                              "torch": (native_meta or {}).get("torch"),
                              "error": None if native_meta else native_rows[0]["error"] if native_rows else None}}
    return write_all(args, rows, budget, extra)


def _dispatch(argv) -> int:
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
    return run_main(argv)


def main(argv=None) -> int:
    """The command line. SIGINT exits 130 and SIGTERM 143, with one line and no process left."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _install_signal_handlers()
    try:
        return _dispatch(argv)
    except Stopped as stop:
        _exit_stopped(stop.signum)
    except KeyboardInterrupt:  # a SIGINT that came before the handler was installed
        _exit_stopped(signal.SIGINT)
    return 1


if __name__ == "__main__":
    sys.exit(main())
