"""The keras-jax peer: Keras 3.15.1 on JAX with the same families, LayoutMaps and train step.

What a Keras user who wants model parallelism picks today: ``ModelParallel`` with the family's
LayoutMap on N JAX devices. It runs in its own virtualenv (``--jax-venv``, default
``.venv-jax``, ``.venv-jax-cuda`` with ``--device cuda``: keras==3.15.1 and jax from PyPI, no
torch; created on first use), one process
per scenario (`bench.tools.peers.jax_rank`), which returns one JSON result; its rows here have
the harness' shape, one per device per phase.

On CPU the N devices are ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in that one
process: they share its memory and threads, and moving data between them is a copy within
one process, where shardimpl's ranks are N processes talking over gloo. That flatters keras-jax's
step time; the report says so beside its figures. With ``--device cuda`` it uses N GPUs of one
process (the virtualenv then gets ``jax[cuda12]``).

Its figures, per device (a row's ``peak_source`` names which):
* build: the allocator's peak where JAX reports one (GPU), else the largest sum of live JAX
  arrays on the device, sampled each time Keras places a variable; ``local_bytes`` is the
  bytes of the variables' shards the device holds after the build;
* step: XLA's memory analysis of the compiled step (arguments + outputs not aliased to donated
  arguments + temporaries: what XLA plans to have live at once, a plan, not a measurement),
  less the device's variables, so that like the harness' step figure it is the peak above the
  variables held at the step's start (the harness' step makes its momentum slots; here they
  are arguments, and counted); its parts are the row's ``xla_*_bytes``;
* step time: the median of three steps after a warm-up, as the harness times its own.
There is no budgeted run: JAX has no per-device allocation limit to set on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from bench.tools.peers.rows import failed_rows
from bench.tools.peers.venvs import PROJECT, VenvSpec, ensure_venv

__all__ = ["NAME", "spec", "run", "rows_from_result"]

NAME = "keras-jax"
KERAS_VERSION = "3.15.1"
RESULT_TAG = "JAX_PEER_RESULT "


def spec(device: str = "cpu") -> VenvSpec:
    """The keras-jax virtualenv for ``device``: jax for CPU, jax[cuda12] for CUDA (checked to see a GPU)."""
    cuda = device == "cuda"
    return VenvSpec(
        name="keras-jax (CUDA)" if cuda else "keras-jax",
        installs=((f"keras=={KERAS_VERSION}", "jax[cuda12]" if cuda else "jax", "numpy", "h5py"),),
        check="import jax, keras; print(keras.__version__, jax.__version__, jax.default_backend())",
        expect=" gpu" if cuda else f"{KERAS_VERSION} ", env={"KERAS_BACKEND": "jax", **_platform_env(device, 1)})


def _platform_env(device: str, ranks: int) -> dict:
    if device == "cuda":
        return {"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    return {"JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={ranks}".strip()}


def _save_batch(scenario, folder) -> str:
    """The harness' batch for ``scenario`` (`bench.harness.training.train_data`: inputs under their
    names, or "x", and the targets as "y") as .npz."""
    import numpy as np

    from bench.harness.training import train_data

    batch, targets = train_data(scenario.family, scenario.param_bytes, scenario.train)
    arrays = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else {"x": batch.numpy()}
    arrays["y"] = targets.numpy()
    path = os.path.join(folder, f"batch-{scenario.family}-{scenario.param_bytes}.npz")
    np.savez(path, **arrays)
    return path


def _command(python, scenario, batch) -> list[str]:
    from bench.cli import train_flags

    cmd = [python, "-m", "bench.tools.peers.jax_rank", "--family", scenario.family,
           "--param-bytes", str(scenario.param_bytes), "--ranks", str(scenario.ranks), "--device", scenario.device,
           *train_flags(scenario.train)]
    return cmd + (["--data", batch] if batch else [])


def _parse(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def rows_from_result(scenario, result: dict) -> list[dict]:
    """One row per device per phase from a `jax_rank` result, in the harness' row shape."""
    from bench.harness.families import param_count
    from bench.harness.training import state_bytes_per_param, variable_itemsize

    params = param_count(scenario.family, scenario.param_bytes)
    p = params * variable_itemsize(scenario.train)
    n = scenario.ranks
    base = {"family": scenario.family, "param_bytes": p, "params": params, **scenario.train.as_row(),
            "ranks": n, "mode": scenario.mode,
            "device": scenario.device, "mesh": "1d", "layouts": "family", "budget_bytes": None,
            "status": "ok", "oom": False, "error": None, "init_seconds": result["init_seconds"],
            "gather_seconds": None, "host_peak_bytes": None, "devices_per_process": n,
            "jax_platform": result.get("platform")}
    alloc = result.get("build_allocator_peak_bytes")
    rows = []
    for i in range(n):
        rows.append({**base, "rank": i, "phase": "build", "local_bytes": result["variable_bytes"][i],
                     "peak_bytes": alloc[i] if alloc else result["build_live_peak_bytes"][i],
                     "peak_source": "allocator peak" if alloc else "live arrays at placement",
                     "ideal_bytes": p / n})
    step = result.get("step")
    if scenario.step and step:
        xla = step.get("xla") or {}
        for i in range(n):
            held = result["variable_bytes"][i]
            # As the harness' step figure (the run's peak, weights and optimizer slots included):
            # the compiled step's arguments + outputs not aliased + temporaries.
            rows.append({**base, "rank": i, "phase": "step", "local_bytes": held, "peak_bytes": xla.get("step_bytes"),
                         "peak_source": "XLA memory analysis",
                         "step_seconds": step["step_seconds"], "steps_per_second": step["steps_per_second"],
                         "compile_seconds": step["compile_seconds"],
                         "ideal_bytes": params * state_bytes_per_param(scenario.train) / n,
                         **{f"xla_{k}": v for k, v in xla.items()}})
    return rows


def _run_one(python, scenario, folder, timeout, log) -> list[dict]:
    batch = _save_batch(scenario, folder) if scenario.step else None
    env = {**os.environ, "KERAS_BACKEND": "jax", **_platform_env(scenario.device, scenario.ranks),
           "PYTHONPATH": os.pathsep.join(p for p in (PROJECT, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run(_command(python, scenario, batch), capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return failed_rows([scenario], f"keras-jax: no result within {timeout:g} s", status="timeout"), None
    result = _parse(done.stdout)
    if done.returncode != 0 or result is None:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
        print(f"peers: keras-jax {scenario.family} N={scenario.ranks} failed:\n{done.stderr[-3000:]}",
              file=log, flush=True)
        return failed_rows([scenario], f"keras-jax: {last}"), None
    return rows_from_result(scenario, result), {k: result.get(k) for k in ("keras", "jax")}


def run(args, scenarios, *, venv=None, log=sys.stderr):
    """keras-jax's rows for ``scenarios`` (unbudgeted), one JAX process per scenario."""
    venv = venv or getattr(args, "jax_venv", None) or (".venv-jax-cuda" if args.device == "cuda" else ".venv-jax")
    try:
        python = ensure_venv(venv, spec(args.device), log=log)
    except Exception as exc:  # reported in the results, never hidden
        return failed_rows(scenarios, f"keras-jax environment unavailable: {exc}"), {"venv": venv}
    rows, versions = [], {}
    with tempfile.TemporaryDirectory(prefix="shardimpl-peers-jax-") as folder:
        for i, s in enumerate(scenarios, 1):
            new, found = _run_one(python, s, folder, args.timeout, log)
            versions = versions or found or {}
            status = new[0]["status"] if new else "?"
            print(f"peers: keras-jax [{i}/{len(scenarios)}] {s.family} {s.param_bytes >> 20} MiB N={s.ranks} "
                  f"{status}", file=log, flush=True)
            rows += new
    return rows, {"venv": venv, "keras": versions.get("keras"), "jax": versions.get("jax")}
