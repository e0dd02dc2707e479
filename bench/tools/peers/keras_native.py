"""The keras-native peer: keras-nightly's own torch ModelParallel, as shipped, in its own virtualenv.

keras-nightly builds each full variable, then scatters it with DTensor. It cannot share an
environment with keras 3.15, so its scenarios run as ``python -m bench --modes keras-native``
in the keras-nightly virtualenv (``--venv``, default ``.venv-nightly``, created on first use),
whose results.json rows come back here.

Each family runs on its own LayoutMap first. keras-nightly cannot run every map shardimpl can:
a family with a scenario that errors there (the transformer's vocabulary-split map with
replicated row-layer outputs: keras-nightly mixes a plain tensor with a DTensor in the step)
runs again, whole, on the families' previous width-split map
(`bench.harness.peer_layouts.width_split_map`), and those rows replace its rows. Each of them
carries ``layouts: "width-split"`` and ``family_map_error``, the error on the family's map, which
the report states beside keras-native's figures.
"""

from __future__ import annotations

from bench.cli import train_flags

import json
import os
import subprocess
import sys
import tempfile

from bench.tools.peers.rows import failed_rows
from bench.tools.peers.venvs import VenvSpec, ensure_venv

__all__ = ["NAME", "SPEC", "run"]

NAME = "keras-native"
SPEC = VenvSpec(
    name="keras-nightly",
    installs=(("torch==2.13.0",), ("keras-nightly", "numpy", "psutil", "h5py", "matplotlib")),
    check="import keras; print(keras.__version__)", expect=".dev", env={"KERAS_BACKEND": "torch"},
    editable=True)


def _command(python, args, families, layouts, out) -> list[str]:
    cmd = [python, "-m", "bench", "--modes", NAME, "--families", ",".join(families),
           "--sizes", ",".join(map(str, args.sizes)), "--ranks", ",".join(map(str, args.ranks)),
           "--budget", str(args.budget), "--device", args.device, "--timeout", str(args.timeout),
           "--layouts", layouts, "--out", out, *train_flags(args.train)]
    if args.no_step:
        cmd.append("--no-step")
    if getattr(args, "step_every_size", False):
        cmd.append("--step-every-size")
    return cmd


def _run_in_venv(python, args, families, layouts, n_scenarios, log):
    """(rows, meta) of one keras-nightly run, or (None, why) when it wrote no results."""
    out = tempfile.mkdtemp(prefix="shardimpl-peers-native-")
    print(f"peers: keras-native on the {layouts} maps: {','.join(families)}", file=log, flush=True)
    try:
        done = subprocess.run(_command(python, args, families, layouts, out), stdout=subprocess.DEVNULL,
                              stderr=log, text=True, env={**os.environ, "KERAS_BACKEND": "torch"},
                              timeout=args.timeout * max(1, n_scenarios) + 600)
    except subprocess.TimeoutExpired:
        return None, "keras-native run did not finish in time"
    results = os.path.join(out, "results.json")
    if not os.path.exists(results):
        return None, f"keras-native run wrote no results (exit {done.returncode})"
    with open(results) as f:
        data = json.load(f)
    return data["rows"], data["meta"]


def _map_failures(rows) -> dict[str, str]:
    """{family: first error} for families with a scenario that errored (a timeout is not the map's fault)."""
    out = {}
    for r in rows:
        if r["status"] == "error" and r["family"] not in out:
            out[r["family"]] = (r.get("error") or "error").strip().splitlines()[-1].lstrip("•* ")[:300]
    return out


def run(args, scenarios, *, venv=None, log=sys.stderr):
    """keras-native's rows for ``scenarios`` (and its budgeted runs), measured in the keras-nightly
    virtualenv; error rows when that cannot be installed or run."""
    venv = venv or getattr(args, "venv", None) or ".venv-nightly"
    try:
        python = ensure_venv(venv, SPEC, log=log)
    except Exception as exc:  # reported in the results, never hidden
        return failed_rows(scenarios, f"keras-nightly environment unavailable: {exc}"), {"venv": venv}
    families = list(dict.fromkeys(s.family for s in scenarios))
    rows, meta = _run_in_venv(python, args, families, "family", len(scenarios), log)
    if rows is None:
        return failed_rows(scenarios, meta), {"venv": venv}
    failures = _map_failures(rows)
    for fam, err in failures.items():
        print(f"peers: keras-native cannot run the {fam} family's map ({err}); running {fam} again on the "
              "previous width-split map, whose rows replace these", file=log, flush=True)
    if failures:
        again, _ = _run_in_venv(python, args, list(failures), "width-split",
                                sum(s.family in failures for s in scenarios), log)
        if again is not None:
            rows = [r for r in rows if r["family"] not in failures]
            rows += [{**r, "family_map_error": failures[r["family"]]} for r in again]
    info = {"venv": venv, "keras": meta.get("keras"), "torch": meta.get("torch")}
    if failures:
        info["width-split"] = ", ".join(sorted(failures))
    return rows, info
