"""The fsdp2 peer of `python -m bench peers` (`bench.tools.peers.fsdp2`): its plain-torch families
have the Keras families' parameters, each rank builds only its shards (build peak near P/N), its
sharded step computes what a single-process step of the same module computes, and the command
writes fsdp2 rows and an "x fsdp2" verdict; what it cannot run or finish is rows that say so. About
35 s on 2 cores (two rank worlds, one timed-out start, one command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import _fsdp2_world
from _rows import max_rel_diff, ok_values
from bench.harness import families
from bench.harness.scenarios import Scenario
from bench.harness.training import TrainConfig
from bench.tools.peers import fsdp2
from bench.tools.peers.torch_families import build_torch_model, count_params, family_loss
from shardimpl import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


@pytest.mark.parametrize("family", ["mlp", "transformer"])
@pytest.mark.parametrize("size_mib", [1, 8, 64])
def test_the_plain_torch_families_have_the_keras_families_parameters(family, size_mib):
    import torch

    with torch.device("meta"):
        model = build_torch_model(family, size_mib * MiB)
    assert count_params(model) == families.param_count(family, size_mib * MiB)
    # fully_shard's units: the mlp's layers; the transformer's embedding, blocks and LM head.
    units = families.DEPTH if family == "mlp" else families.dims_for(family, size_mib * MiB)["layers"] + 2
    assert len(model.units()) == units


def test_a_family_without_a_plain_torch_module_is_said_so():
    with pytest.raises(ValueError, match="keras-hub family 'gemma' has none"):
        build_torch_model("gemma", MiB)
    why = fsdp2._unsupported(Scenario("gemma", MiB, 2, "fsdp2"))
    assert why.startswith("fsdp2: the gemma family is a keras-hub backbone, with no plain-torch module here")
    assert fsdp2._unsupported(Scenario("transformer", MiB, 2, "fsdp2")) is None


def _single_process_losses(scenario, full, steps):
    """The same module, whole in this process, the same weights, optimizer, batch and loss."""
    model = build_torch_model(scenario.family, scenario.param_bytes)
    model.load_state_dict(full)
    optimizer = fsdp2.torch_optimizer(model.parameters(), scenario.train)
    data = fsdp2.batch_for(scenario, "cpu")
    return [fsdp2.train_step(model, optimizer, data, family_loss(scenario.family)) for _ in range(steps)]


@pytest.mark.distributed
def test_two_ranks_build_half_the_model_each_and_step_as_one_process_does():
    import torch

    measured = Scenario("mlp", 4 * MiB, 2, "fsdp2")
    trained = Scenario("transformer", 2 * MiB, 2, "fsdp2", train=TrainConfig(seq=16))
    torch.manual_seed(0)
    full = build_torch_model(trained.family, trained.param_bytes).state_dict()
    arrays = {k: v.numpy().copy() for k, v in full.items()}  # numpy: torch tensors would travel as shared memory
    steps = 3
    values = ok_values(launch.run(_fsdp2_world.measured_and_trained, 2, measured, trained, arrays, steps,
                                 timeout=240))
    p = families.exact_param_bytes("mlp", measured.param_bytes)
    for v in values:
        m = v["measured"]
        assert m["model_bytes"] == p
        # Each rank holds and allocated its half: the whole model made on a rank would be 2.0 x P/N.
        assert m["local_bytes"] == p // 2
        assert 0.99 <= m["build_peak_bytes"] / (p / 2) <= 1.10, m["build_peak_bytes"] / (p / 2)
        # AdamW f32: weights, gradients and two moments, each 1/N, and the run's peak holds them.
        assert m["model_state_bytes"] == 4 * m["local_bytes"]
        assert m["step_peak_bytes"] >= m["model_state_bytes"] and m["step_seconds"] > 0
    expected = _single_process_losses(trained, full, steps)
    for v in values:
        assert expected[-1] != expected[0]  # the updates change the loss: they are compared too
        assert max_rel_diff(v["losses"], expected) <= 1e-5, (v["losses"], expected)


@pytest.mark.distributed
def test_bench_peers_fsdp2_writes_fsdp2_rows_and_a_verdict_against_it(tmp_path):
    out = tmp_path / "peers"
    cmd = [sys.executable, "-m", "bench", "peers", "--peers", "fsdp2", "--modes", "sharded", "--families", "mlp",
           "--sizes", "2", "--ranks", "2", "--budget", "none", "--quiet", "--timeout", "180", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    rows = [r for r in data["rows"] if r["mode"] == "fsdp2"]
    assert {(r["rank"], r["phase"], r["status"]) for r in rows} == {
        (rank, phase, "ok") for rank in (0, 1) for phase in ("build", "step")}
    assert all(r["layouts"] == fsdp2.LAYOUTS and r["peak_bytes"] > 0 for r in rows)
    assert {"sharded", "fsdp2"} <= {r["mode"] for r in data["rows"]}
    assert data["meta"]["peers"]["fsdp2"]["torch"]
    said = " ".join(done.stdout.split())  # the verdict, unwrapped
    assert "mlp vs peers: sharded at N = 2 (P = 2 MiB): build peak " in said and " x fsdp2" in said
    assert (out / "peers_vs_ranks.png").exists()


@pytest.mark.distributed
def test_a_family_it_cannot_express_and_ranks_past_their_deadline_are_rows_that_say_so():
    """Nothing raises and nothing hangs: a keras-hub family is error rows naming why, a scenario
    whose ranks miss --timeout is timeout rows, returned within seconds of it."""
    import argparse
    import time

    # 64 MiB: a build and AdamW step that take seconds, so that 0.5 s is missed even by a warm
    # world (a 1 MiB mlp in a reused world finished within 1 s on a clean CI machine).
    scenarios = [Scenario("gemma", MiB, 2, "fsdp2"), Scenario("mlp", 64 * MiB, 2, "fsdp2")]
    start = time.monotonic()
    with open(os.devnull, "w") as quiet:
        rows, meta = fsdp2.run(argparse.Namespace(timeout=0.5), scenarios, log=quiet)
    assert time.monotonic() - start < 30
    by_family = {f: {(r["rank"], r["phase"], r["status"]) for r in rows if r["family"] == f} for f in ("gemma", "mlp")}
    assert by_family == {f: {(rank, phase, status) for rank in (0, 1) for phase in ("build", "step")}
                         for f, status in (("gemma", "error"), ("mlp", "timeout"))}
    gemma = next(r for r in rows if r["family"] == "gemma")
    assert "keras-hub backbone, with no plain-torch module" in gemma["error"] and gemma["mode"] == "fsdp2"
    assert meta["torch"]
