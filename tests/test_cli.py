"""The command line a user meets: fast help naming every subcommand, one-line errors before any
rank starts, and Ctrl-C / SIGTERM that stop everything promptly with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": ROOT}


def _bench(*args, timeout=60):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)
    return done, time.perf_counter() - start


def test_help_is_fast_and_names_every_subcommand_with_an_example():
    done, seconds = min((_bench("--help") for _ in range(3)), key=lambda d: d[1])
    assert done.returncode == 0, done.stderr
    assert seconds < 1.0, seconds
    for sub in ("run", "peers", "plan", "gate", "compare-memory"):
        assert f"\n  {sub} " in done.stdout, sub
        assert f"python -m bench {sub}" in done.stdout or sub == "run", sub
    assert "python -m bench --quick" in done.stdout and "--budget" in done.stdout


def test_parsing_imports_neither_torch_nor_keras():
    code = ("import runpy, sys\nsys.argv = ['bench', '--help']\ntry:\n"
            "    runpy.run_module('bench', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV,
                         timeout=60).stdout
    assert out.strip().endswith("[]"), out[-500:]


@pytest.mark.parametrize("sub", ["gate", "peers"])
def test_subcommand_help_is_fast_with_an_example(sub):
    done, seconds = _bench(sub, "--help")
    assert done.returncode == 0 and seconds < 2.0, (done.stderr, seconds)
    assert f"python -m bench {sub}" in done.stdout.split("example")[-1]


@pytest.mark.parametrize("args, fragment", [
    (["--sizes", "abc"], "--sizes: expected sizes in MiB: positive whole numbers separated by commas"),
    (["--sizes", "16,-4"], "Received: '16,-4'"),
    (["--ranks", "0"], "--ranks: expected world sizes"),
    (["--budget", "-5"], "--budget: expected 'auto', 'none' or a positive number of MiB per rank"),
    (["--budget", "abc"], "Received: 'abc'"),
    (["--timeout", "0"], "--timeout: expected a positive number of seconds"),
    (["--out", "/proc/forbidden/x"], "--out: cannot create or write to the folder '/proc/forbidden/x'"),
    (["--families", "mlp,cnn"], "unknown family 'cnn'; choose from mlp, transformer"),
    (["--modes", "sharded,fast"], "unknown mode 'fast'; choose from unsharded, sharded, naive, keras-native"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["peers", "--sizes", "abc"], "python -m bench peers: error: argument --sizes"),
    (["peers", "--peers", "keras-jax,fsdp3"], "unknown peer 'fsdp3'; choose from keras-jax, keras-native"),
    (["--layouts", "width-split", "--mesh", "2x2"], "--layouts width-split: the previous width-split maps exist"),
    (["gate", "--device", "tpu"], "python -m bench gate: error: argument --device"),
    (["plan", "--json", "/proc/forbidden/plan.json"], "python -m bench plan: error: --json: cannot create"),
])
def test_bad_options_fail_in_one_line_before_any_rank_starts(args, fragment, tmp_path):
    done, seconds = _bench(*args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr
    assert "(see python -m bench" in lines[0] and done.stdout == ""
    assert seconds < 5.0, seconds  # no rank, no torch


def test_keras_native_without_keras_nightly_is_refused_up_front():
    from importlib import metadata

    try:
        if ".dev" in metadata.version("keras"):
            pytest.skip("this environment has a keras dev build: keras-native can run here")
    except metadata.PackageNotFoundError:
        pass
    done, _ = _bench("--modes", "keras-native")
    assert done.returncode == 2 and "needs keras-nightly" in done.stderr and len(done.stderr.splitlines()) == 1


def test_out_must_be_a_writable_folder(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    done, _ = _bench("--out", str(a_file / "sub"))
    assert done.returncode == 2 and "--out: cannot create or write" in done.stderr


def test_the_main_job_steps_at_its_largest_size_and_builds_again_under_the_budget(tmp_path):
    from bench import cli
    from bench.__main__ import scenarios_for

    args = cli.parse_args(["--out", str(tmp_path)])
    scenarios = scenarios_for(args, cli.budget_bytes(args.budget, args.sizes))
    assert len(scenarios) == 2 * 3 * 3 * 2 + 2 * 3 * 2
    largest = max(args.sizes) << 20
    assert {s.param_bytes for s in scenarios if s.step} == {largest}
    assert sum(s.step for s in scenarios) == 2 * 3 * 2  # every family, N and mode at the largest size
    budgeted = [s for s in scenarios if s.budget_bytes]
    assert {s.param_bytes for s in budgeted} == {largest} and not any(s.step for s in budgeted)
    assert all(s.budget_bytes == int(0.75 * largest) for s in budgeted)
    every = cli.parse_args(["--step-every-size", "--out", str(tmp_path)])
    assert all(s.step for s in scenarios_for(every, None))
    quick = cli.parse_args(["--quick", "--out", str(tmp_path)])
    assert quick.sizes == cli.QUICK_SIZES_MIB and not any(s.step for s in scenarios_for(quick, None))


# --- stopping ---------------------------------------------------------------------------


def _start_long_run(tmp_path):
    """A main job that runs for a while; returns it once its ranks are up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--families", "mlp", "--sizes", "64,128,256", "--ranks", "2",
         "--quiet", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: a terminal's Ctrl-C reaches all of it
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 90
    seen = {}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            for p in me.children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
        if len(seen) >= 4:  # forkserver, resource tracker, two ranks
            break
        time.sleep(0.2)
    assert len(seen) >= 4, (proc.poll(), seen)
    time.sleep(1.0)
    return proc, list(seen.values())


def _gone(p):
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.distributed
@pytest.mark.parametrize("signum, code, to_group", [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)])
def test_a_signal_stops_the_whole_run_with_one_line(tmp_path, signum, code, to_group):
    proc, children = _start_long_run(tmp_path)
    start = time.monotonic()
    if to_group:
        os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal does
    else:
        proc.send_signal(signum)  # `kill PID`: the main process only
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - start < 10
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {signal.Signals(signum).name}" in lines[0], err[-2000:]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(_gone(p) for p in children):
        time.sleep(0.1)
    assert all(_gone(p) for p in children), [p.pid for p in children if not _gone(p)]
