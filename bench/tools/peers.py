"""Peers measured in the same run (`python -m bench peers`).

* ``naive`` (a harness mode, `bench.harness.naive`): each full variable built on the host,
  then sliced.
* ``keras-native`` — keras-nightly 3.16's torch ModelParallel as shipped (it
  builds each full variable, then scatters it with DTensor). keras-nightly and
  keras cannot share an environment: `run_keras_native` runs the same
  scenarios in a separate virtualenv (created on first use) and returns its
  rows; a failure to install or run comes back as error rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

__all__ = ["ensure_nightly_venv", "run_keras_native"]

NIGHTLY_PACKAGES = ["keras-nightly", "numpy", "psutil", "h5py", "matplotlib"]


def ensure_nightly_venv(path: str, *, log=sys.stderr) -> str:
    """Create (or reuse) a virtualenv with torch==2.13.0, keras-nightly and this project; its python."""
    python = os.path.join(path, "bin", "python")
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    steps = []
    if not os.path.exists(python):
        steps.append([sys.executable, "-m", "venv", path])
        steps.append([python, "-m", "pip", "install", "-q", "torch==2.13.0"])
        steps.append([python, "-m", "pip", "install", "-q", *NIGHTLY_PACKAGES])
    steps.append([python, "-m", "pip", "install", "-q", "--no-deps", "-e", project])
    for cmd in steps:
        print("peers: " + " ".join(cmd[-3:]), file=log, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    check = subprocess.run([python, "-c", "import keras; print(keras.__version__)"], capture_output=True,
                           text=True, env={**os.environ, "KERAS_BACKEND": "torch"})
    if check.returncode != 0 or ".dev" not in check.stdout:
        raise RuntimeError(f"{path} does not hold keras-nightly: {check.stdout} {check.stderr[-500:]}")
    return python


def _error_rows(scenarios, message):
    from bench.harness.families import exact_param_bytes

    rows = []
    for s in scenarios:
        p = exact_param_bytes(s.family, s.param_bytes)
        for rank in range(s.ranks):
            for phase in ("build", "step"):
                rows.append({"family": s.family, "param_bytes": p, "ranks": s.ranks, "rank": rank,
                             "mode": "keras-native", "device": s.device, "budget_bytes": s.budget_bytes,
                             "status": "error", "oom": False, "error": message, "init_seconds": None,
                             "gather_seconds": None, "local_bytes": None, "phase": phase,
                             "peak_bytes": None, "ideal_bytes": p / s.ranks * (2 if phase == "step" else 1)})
    return rows


def run_keras_native(args, scenarios, venv: str, *, log=sys.stderr):
    """Rows of the keras-native mode, measured in the nightly virtualenv (or error rows)."""
    try:
        python = ensure_nightly_venv(venv, log=log)
    except Exception as exc:  # reported in the results, never hidden
        return _error_rows(scenarios, f"keras-nightly environment unavailable: {exc}"), None
    out = tempfile.mkdtemp(prefix="shardimpl-peers-")
    cmd = [python, "-m", "bench", "--modes", "keras-native",
           "--families", ",".join(args.families), "--sizes", ",".join(map(str, args.sizes)),
           "--ranks", ",".join(map(str, args.ranks)), "--budget", str(args.budget),
           "--device", args.device, "--timeout", str(args.timeout), "--out", out]
    if args.no_step:
        cmd.append("--no-step")
    if getattr(args, "step_every_size", False):
        cmd.append("--step-every-size")
    print("peers: keras-native in " + venv, file=log, flush=True)
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                          timeout=args.timeout * max(1, len(scenarios)) + 600)
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        return _error_rows(scenarios, f"keras-native run failed (exit {done.returncode})"), None
    with open(results) as f:
        data = json.load(f)
    return data["rows"], data["meta"]
