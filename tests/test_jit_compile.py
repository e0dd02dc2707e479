"""``model.compile(jit_compile=True)`` under a distribution: the steps run eagerly, with one warning
that names the model and what to pass instead (torch.compile cannot trace the sharded step)."""

from __future__ import annotations

import pytest

import _jit_compile_world
from _rows import ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


def test_jit_compile_true_trains_evaluates_and_predicts_eagerly_with_a_warning():
    for r in ok_values(launch.run(_jit_compile_world.jit_compile_runs_eagerly, 2, timeout=180)):
        assert r["same_losses"] and r["same_predictions"], r
        assert not r["compiled"], r
        assert r["jit_compile_kept"] is True, r  # the user's setting stays; only the steps run eagerly
        assert r["warnings_without_jit"] == [], r
        assert len(r["warnings"]) == 1, r  # once per model, though fit, evaluate and predict each asked
        assert all("'jit_True'" in w and "jit_compile=False" in w for w in r["warnings"]), r
