"""Under torchrun: Keras' initialize() joins torchrun's world, and launch.run uses its ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(os.path.abspath(__file__))


def _env(tmp_path):
    """torchrun's agent writes a log folder under TMPDIR and keeps it: keep it in tmp_path."""
    return {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}


def test_keras_initialize_and_launcher_use_torchruns_ranks(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "_torchrun_script.py"), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["devices"] == ["cpu:0", "cpu:1"]
    assert [(r["rank"], r["status"], r["value"]) for r in data["rows"]] == [(0, "ok", 0), (1, "ok", 1)]
    assert data["local"] == [8, 8]  # the (8, 16) kernel split over torchrun's two ranks


def test_the_scaling_harness_runs_on_torchruns_ranks(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bench",
           "--families", "mlp", "--sizes", "32", "--no-step", "--budget", "24", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=os.path.dirname(HERE),
                          env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["ranks"] for r in rows} == {2} and {r["rank"] for r in rows} == {0, 1}
    budgeted = {(r["mode"], r["rank"]): r for r in rows if r["budget_bytes"]}
    assert budgeted[("unsharded", 0)]["oom"] and budgeted[("unsharded", 1)]["oom"]
    assert budgeted[("sharded", 0)]["status"] == "ok" and budgeted[("sharded", 0)]["peak_bytes"] < 24 << 20
