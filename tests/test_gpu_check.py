"""bench/gpu_check.sh without CUDA: a clean, recorded skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs for real")
def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "CUDA is not available" in done.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["skipped"] == "CUDA not available" and data["rows"] == []
