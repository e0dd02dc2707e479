"""The hand-written tensor-parallel reference of `python -m bench speed` computes what stock
Keras computes: same loss on the same weights, and the same after its updates, so that timing
shardimpl against it compares equal work."""

from __future__ import annotations

import pytest

import _tp_reference_world
from _rows import max_rel_diff, ok_values
from shardimpl import launch

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("family", ["mlp", "transformer"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_reference_step_equals_stock_keras_on_the_same_weights(family, ranks):
    rows = ok_values(launch.run(_tp_reference_world.reference_matches_stock_keras, ranks, family, 1 << 20, 3,
                                timeout=240))
    for r in rows:
        assert r["stock"][-1] != r["stock"][0]  # the updates change the loss: they are compared too
        assert max_rel_diff(r["reference"], r["stock"]) <= 1e-5, r


@pytest.mark.parametrize("family", ["mlp", "transformer"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_keras_with_megatrons_collectives_equals_stock_keras_and_issues_the_references_collectives(family, ranks):
    """`bench.tools.keras_megatron` (the speed tool's Keras floor with collectives): stock Keras
    layers on each rank's blocks, f and g put in by hand, train as the whole model does, and a step
    issues exactly the hand-written step's collectives."""
    rows = ok_values(launch.run(_tp_reference_world.keras_megatron_matches_stock_keras, ranks, family, 1 << 20, 3,
                                timeout=240))
    for r in rows:
        assert r["stock"][-1] != r["stock"][0]
        assert max_rel_diff(r["megatron"], r["stock"]) <= 1e-5, r
        assert r["collectives"] == r["reference_collectives"], r
        assert r["split"] == (ranks > 1)
    assert rows[0]["collectives"] > 0 if ranks > 1 else rows[0]["collectives"] == 0


def test_reference_refuses_a_split_the_ranks_do_not_divide():
    from bench.tools import tp_reference

    with pytest.raises(ValueError, match="evenly over the ranks"):
        tp_reference.ReferenceMLP(10, 4, 0, 3)
    dims = {"d_model": 8, "heads": 3, "kv_heads": 1, "head_dim": 2, "ffn": 8, "vocab": 8, "layers": 1}
    with pytest.raises(ValueError, match="heads=3"):
        tp_reference.ReferenceTransformer(dims, 0, 2)


def test_op_count_counts_aten_ops_and_dtensor_dispatches():
    r = ok_values(launch.run(_tp_reference_world.dtensor_ops_counted, 1, timeout=120))[0]
    assert r["plain"]["outer_ops"] == 1 and r["plain"]["dtensor_dispatches"] == 0
    assert r["plain"]["aten_ops"] >= 1 and r["plain"]["top_aten"][0][0] == "aten::add"
    assert r["dtensor"]["outer_ops"] == 1 and r["dtensor"]["dtensor_dispatches"] == 1
    assert r["dtensor"]["aten_ops"] >= r["plain"]["aten_ops"]  # the local add, under DTensor's dispatch


def test_bench_speed_times_stock_shardimpl_and_the_reference_and_counts_their_ops(tmp_path, capsys):
    import json

    from bench.tools import speed

    out = tmp_path / "speed.json"
    assert speed.main(["--families", "mlp", "--size-mib", "0.25", "--repeats", "1", "--steps", "2",
                       "--fit-batches", "1", "--floor", "--paired", "--keras-megatron", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["mlp"]
    assert set(runs) == {"stock", "sharded", "reference", speed.FLOOR, speed.PAIRED, speed.MEGATRON}
    paired = runs.pop(speed.PAIRED)[0]  # both steps timed in the same ranks, in turns
    for key in ("sharded_seconds", "reference_seconds", "sharded_cpu_seconds", "reference_cpu_seconds",
                "keras_megatron_seconds", "keras_megatron_cpu_seconds"):  # the third model in the turns
        assert len(paired[key]) == 2 and all(v > 0 for v in paired[key]), key
    for label, samples in runs.items():
        assert samples[0]["step_seconds"] > 0 and samples[0]["ops"]["aten_ops"] > 0 and samples[0]["load"] >= 0
        assert samples[0]["step_cpu_seconds"] > 0, label  # the step's work, measured in its own process
    # the mlp's sharded step runs all on local blocks: its collectives, and no DTensor dispatch at all
    # (the counter itself: test_op_count_counts_aten_ops_and_dtensor_dispatches above)
    assert runs["sharded"][0]["ops"]["collectives"] > 0 == runs["sharded"][0]["ops"]["dtensor_dispatches"]
    assert runs["reference"][0]["ops"]["dtensor_dispatches"] == 0
    printed = capsys.readouterr().out
    assert "vs reference: step" in printed and "ops per step, reference" in printed
    assert "CPU ms per step, sharded" in printed and "vs reference per round" in printed
    assert f"CPU ms per step, {speed.FLOOR}" in printed  # the floor, against the reference too
    assert "paired (same ranks, alternating steps)" in printed and "median of per-step ratios per round" in printed
    assert runs[speed.FLOOR][0]["ops"]["collectives"] == 0 == runs[speed.FLOOR][0]["ops"]["dtensor_dispatches"]
    # Keras with f and g by hand: the reference's communication, no DTensor
    assert runs[speed.MEGATRON][0]["ops"]["collectives"] == runs["reference"][0]["ops"]["collectives"]
    assert runs[speed.MEGATRON][0]["ops"]["dtensor_dispatches"] == 0
    assert f"{speed.MEGATRON}" in printed and f"CPU ms per step, {speed.MEGATRON}" in printed
    assert "sharded / Keras + f/g by hand (shardimpl's own)" in printed
    assert "Keras + f/g by hand / reference (Keras' own)" in printed


def test_step_phases_times_every_phase_of_each_variant_and_skips_only_the_collectives(capsys):
    from bench.tools import step_phases as sp

    assert sp.main(["--size-mib", "0.25", "--steps", "3", "--repeats", "1", "--skip-collectives"]) == 0
    results = sp.measure("mlp", 1 << 18, 2, 3, 1, skip=True)
    keras_variants = (sp.SHARDED, sp.SKIPPED, sp.FLOOR, sp.MEGATRON)
    for variant in keras_variants + (sp.REFERENCE, sp.REFERENCE_SKIPPED):
        phases = results[variant][0]["phases"]
        timed = ("forward", "backward", "optimizer") + (("loss", "metrics") if variant in keras_variants else ())
        for phase in timed:  # every timer is on the step's path: Keras and torch still call what it wraps
            assert phases[phase] > 0, (variant, phase, phases)
        assert phases["rest"] >= 0, (variant, phases)  # no phase nested in another (each step's CPU counted once)
    calls = {v: results[v][0]["all_reduces_per_step"] for v in results}
    # the mlp: two row-parallel outputs forward, one input gradient backward, in both tensor-parallel steps;
    # the diagnostics make the very same calls without communicating, the floor none
    assert calls[sp.SHARDED] == calls[sp.SKIPPED] == calls[sp.REFERENCE] == calls[sp.REFERENCE_SKIPPED] == 3
    assert calls[sp.MEGATRON] == 3  # Keras with f and g by hand: the same calls
    assert calls[sp.FLOOR] == 0
    printed = capsys.readouterr().out
    assert "main-thread CPU, ms" in printed and "all_reduce calls per step" in printed
    assert "CPU ms per step by thread" in printed


def test_step_phases_puts_keras_and_torch_back_as_they_were():
    import keras
    import torch

    from bench.tools import step_phases as sp

    call, backward = keras.layers.Layer.__call__, torch.Tensor.backward
    phases = sp._Phases()
    with sp._model_call_timed(object(), phases), sp._backward_timed(phases):
        assert keras.layers.Layer.__call__ is not call and torch.Tensor.backward is not backward
    assert keras.layers.Layer.__call__ is call and torch.Tensor.backward is backward
