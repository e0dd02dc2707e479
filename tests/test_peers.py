"""`python -m bench peers`: the peer registry, the rows peers return, the verdict beside them,
the exit status, the width-split maps, and one small real keras-jax run (skips with its reason
where the Keras-on-JAX virtualenv cannot be made)."""

from __future__ import annotations

import argparse
import os

import pytest

from _report_rows import MiB, job_rows
from bench.harness import families, peer_layouts
from bench.harness.scenarios import Scenario
from bench.report import peers as peer_report
from bench.report import plots
from bench.report import summary as report
from bench.tools import peers
from bench.tools.peers import keras_jax, keras_native
from bench.tools.peers.rows import failed_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_SECONDS = {"unsharded": {1: 0.10, 2: 0.21, 4: 0.40}, "sharded": {1: 0.11, 2: 0.16, 4: 0.20},
                "keras-jax": {1: 0.05, 2: 0.05, 4: 0.06}, "keras-native": {1: 0.12, 2: 0.30, 4: 0.50},
                "fsdp2": {1: 0.08, 2: 0.10, 4: 0.16}}


def _timed(row):
    return {"step_seconds": STEP_SECONDS[row["mode"]][row["ranks"]]} if row["phase"] == "step" else {}


def _peer_rows(mode, build, step, *, statuses=None, sources=None, **fields):
    """Rows of a peer at P = 64 MiB, N = 1, 2, 4: build(p, n) and step(p, n) bytes per rank."""
    p = 64 * MiB
    rows = []
    for n in (1, 2, 4):
        status = (statuses or {}).get(n, "ok")
        for rank in range(n):
            for phase, peak in (("build", build(p, n)), ("step", step(p, n))):
                row = {"family": "mlp", "param_bytes": p, "ranks": n, "rank": rank, "mode": mode, "device": "cpu",
                       "budget_bytes": None, "status": status, "oom": False,
                       "error": None if status == "ok" else f"{mode} {status}", "init_seconds": 0.1,
                       "gather_seconds": None, "local_bytes": p // n, "phase": phase,
                       "peak_bytes": peak if status == "ok" else None, "ideal_bytes": p / n, **fields}
                if phase == "step":
                    row["step_seconds"] = STEP_SECONDS[mode][n]
                if sources:
                    row["peak_source"] = sources[phase]
                rows.append(row)
    return rows


def _run_rows():
    """stock Keras and sharded (P/N + 1 MiB) as the main job; keras-jax builds exactly P/N;
    keras-native builds the whole model and times out at N = 4, on the width-split map."""
    rows = job_rows(families=("mlp",), sizes_mib=(16, 64), budget_mib=None, extra=_timed)
    rows += _peer_rows("keras-jax", lambda p, n: p // n, lambda p, n: 4 * p // n + 2 * MiB,
                       devices_per_process=4,
                       sources={"build": "live arrays at placement", "step": "XLA memory analysis"})
    rows += _peer_rows("keras-native", lambda p, n: p, lambda p, n: 4 * p // n, statuses={4: "timeout"},
                       layouts="width-split", family_map_error="x2=torch.Tensor(shape=[8, 16, 916])")
    return rows


def test_the_verdict_states_sharded_over_each_peer_at_the_largest_n_and_the_targets():
    text = report.verdicts(report.summarize(_run_rows()))["mlp vs peers"]
    # build: sharded 17 MiB at N = 4 over keras-jax's 16 MiB; keras-native (timed out at 4) at N = 2: 33 / 64.
    assert text.startswith("sharded at N = 4 (P = 64 MiB): build peak 1.06 x keras-jax, 0.52 x keras-native (N = 2); "
                           "step peak 0.97 x keras-jax, 1.00 x keras-native (N = 2); "
                           "step time 3.33 x keras-jax, 0.53 x keras-native (N = 2); "), text
    # step time at N = 4 over N = 1: sharded 0.20 / stock 0.10; keras-jax 0.06 / 0.05.
    assert "step time at N = 4 over its own at N = 1: sharded (over stock Keras) 2.00x, keras-jax 1.20x" in text
    assert "target build peak <= 1.05 x the best peer: missed at N = 4 (1.06 x keras-jax)" in text
    assert "target step-time scaling within 1.2 x keras-jax's: missed at N = 2, 4 (1.60x vs 1.00x, 2.00x vs 1.20x)" in text
    assert "keras-native failed: timeout at N = 4 (see the table)" in text
    assert "keras-native ran the previous width-split map (on the family's map: x2=torch.Tensor" in text
    assert ("keras-jax: build = live arrays at placement, step = XLA memory analysis; its N devices share one "
            "process, which flatters its step time") in text


def test_fsdp2_is_in_the_verdict_table_and_plot_as_any_peer_with_its_note():
    """fsdp2's rows have the harness' shape: the report names it, with its own note, and nothing else."""
    from bench.tools.peers import fsdp2

    rows = job_rows(families=("mlp",), sizes_mib=(64,), budget_mib=None, extra=_timed)
    rows += _peer_rows("fsdp2", lambda p, n: p // n, lambda p, n: 5 * p // n, statuses={4: "error"},
                       layouts=fsdp2.LAYOUTS, peer_note=fsdp2.NOTE)
    text = report.verdicts(report.summarize(rows))["mlp vs peers"]
    # N = 4 failed: compared at N = 2, sharded 33 MiB over fsdp2's 32, 0.16 s over 0.10 s.
    assert text.startswith("sharded at N = 2 (P = 64 MiB): build peak 1.03 x fsdp2; step peak ") and \
        "step time 1.60 x fsdp2" in text, text
    assert "fsdp2 failed: error at N = 4 (see the table)" in text
    assert f"fsdp2: {fsdp2.NOTE}" in text
    assert "fsdp2" in report.table(rows) and "fsdp2 = torch's fully_shard" in report.definitions(rows)


def test_peer_failures_stay_out_of_the_harness_failure_count():
    verdicts = report.verdicts(report.summarize(_run_rows()))
    assert "failed" not in verdicts["mlp"]
    assert list(verdicts) == ["mlp", "mlp vs peers"]


def test_targets_met_are_said_so():
    rows = job_rows(families=("mlp",), sizes_mib=(64,), budget_mib=None, extra=_timed)
    rows += _peer_rows("keras-jax", lambda p, n: p // n + MiB, lambda p, n: 4 * p // n,
                       devices_per_process=4)
    for r in rows:
        if r["mode"] == "keras-jax" and r["phase"] == "step":
            r["step_seconds"] = 0.12 * r["ranks"] ** 0.5  # scaling 2.0x at N = 4: sharded's 2.0x is within 1.2x
    c = peer_report.compare(report.summarize(rows))["mlp"]
    assert c["targets"]["build"] == {1: (1.0, "keras-jax"), 2: (1.0, "keras-jax"), 4: (1.0, "keras-jax")}
    text = report.verdicts(report.summarize(rows))["mlp vs peers"]
    assert "target build peak <= 1.05 x the best peer: met at N = 1, 2, 4 (at most 1.00 x)" in text
    assert "target step-time scaling within 1.2 x keras-jax's: met at N = 2, 4" in text


def test_one_table_holds_every_mode_and_the_peers_plot_has_three_figures(tmp_path):
    rows = _run_rows()
    table = report.table(rows)
    for name in ("stock Keras", "keras-jax", "keras-native", "sharded"):
        assert name in table
    assert "timeout" in table
    assert "keras-jax" in report.definitions(rows) and "keras-jax" not in report.definitions(job_rows())
    paths = plots.plot_peers(rows, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["peers_vs_ranks.png"]
    assert open(paths[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    alone = [r for r in job_rows(families=("mlp",), sizes_mib=(64,), budget_mib=None) if r["mode"] == "sharded"]
    assert plots.plot_peers(alone, str(tmp_path)) == []  # one mode per panel: nothing to compare


def _args(tmp_path, **kw):
    fields = dict(out=str(tmp_path), argv=["peers"], families=("mlp",), sizes=(8,), ranks=(1, 2), device="cpu",
                  timeout=60.0, no_step=False, budget="none")
    return argparse.Namespace(**{**fields, **kw})


def test_exit_status_counts_the_harness_rows_not_the_peers(tmp_path, capsys, monkeypatch):
    from bench.__main__ import write_all

    drawn = []
    monkeypatch.setattr(plots, "plot_scaling", lambda *a, **k: [])  # drawn in the test above; the status here
    monkeypatch.setattr(plots, "plot_peers", lambda *a, **k: drawn.append(1) or [])
    rows = _run_rows()
    assert write_all(_args(tmp_path), rows, None, peers=("keras-jax", "keras-native")) == 0
    out = capsys.readouterr()
    assert "peer rows failed" in out.err and "mlp vs peers: " in out.out
    assert drawn and "mlp vs peers" in (tmp_path / "report.md").read_text()
    broken = rows + [{**rows[0], "mode": "sharded", "status": "error", "error": "boom", "peak_bytes": None}]
    assert write_all(_args(tmp_path), broken, None, peers=("keras-jax", "keras-native")) == 1
    assert write_all(_args(tmp_path), rows, None) == 1  # without peers (the main job) every row counts


def test_a_peer_that_raises_becomes_error_rows(monkeypatch):
    def broken(args, scenarios, *, log):
        raise RuntimeError("no such thing")

    monkeypatch.setitem(peers.PEERS, "keras-jax", peers.Peer("keras-jax", "test", broken))
    scen = [Scenario("mlp", 8 * MiB, n, "keras-jax", step=True) for n in (1, 2)]
    rows, metas = peers.run_peers(None, lambda name: scen, ["keras-jax"])
    assert len(rows) == (1 + 2) * 2 and {r["status"] for r in rows} == {"error"}
    assert rows[0]["error"] == "keras-jax runner failed: RuntimeError: no such thing"
    assert rows[0]["param_bytes"] == families.exact_param_bytes("mlp", 8 * MiB)
    assert metas == {"keras-jax": {"what": "test"}}


def test_failed_rows_have_the_harness_shape_per_rank_and_phase():
    rows = failed_rows([Scenario("transformer", 8 * MiB, 2, "keras-native", step=False)], "gone", status="timeout")
    assert [(r["rank"], r["phase"], r["status"]) for r in rows] == [(0, "build", "timeout"), (1, "build", "timeout")]
    assert report.summarize(rows)[0]["status"] == "timeout"


def test_keras_native_runs_a_family_again_on_the_width_split_map_where_its_map_fails(monkeypatch, tmp_path):
    calls = []

    def fake_run(python, args, fams, layouts, n, log):
        calls.append((tuple(fams), layouts))
        rows = []
        for fam in fams:
            broken = fam == "transformer" and layouts == "family"
            rows += [{"family": fam, "ranks": 2, "rank": 0, "mode": "keras-native", "layouts": layouts,
                      "status": "error" if broken else "ok",
                      "error": "RuntimeError: mixed\n  • x2=torch.Tensor(shape=[8, 16, 916])" if broken else None}]
        return rows, {"keras": "3.16.0.dev", "torch": "2.13.0"}

    monkeypatch.setattr(keras_native, "ensure_venv", lambda path, spec, log: "python")
    monkeypatch.setattr(keras_native, "_run_in_venv", fake_run)
    scen = [Scenario(f, 8 * MiB, 2, "keras-native") for f in ("mlp", "transformer")]
    rows, meta = keras_native.run(_args(tmp_path, venv=".venv-x"), scen)
    assert calls == [(("mlp", "transformer"), "family"), (("transformer",), "width-split")]
    by_family = {r["family"]: r for r in rows}
    assert by_family["mlp"]["layouts"] == "family" and "family_map_error" not in by_family["mlp"]
    assert by_family["transformer"]["layouts"] == "width-split" and by_family["transformer"]["status"] == "ok"
    assert by_family["transformer"]["family_map_error"] == "x2=torch.Tensor(shape=[8, 16, 916])"
    assert meta["width-split"] == "transformer"


def test_an_unusable_peer_virtualenv_is_error_rows_that_say_so(monkeypatch, tmp_path):
    def refuse(path, spec, log):
        raise RuntimeError("pip: no network")

    monkeypatch.setattr(keras_jax, "ensure_venv", refuse)
    rows, meta = keras_jax.run(_args(tmp_path, jax_venv=str(tmp_path / "v")), [Scenario("mlp", 8 * MiB, 1, "keras-jax")])
    assert {r["status"] for r in rows} == {"error"}
    assert rows[0]["error"] == "keras-jax environment unavailable: pip: no network"


def test_keras_jax_rows_are_per_device_and_its_step_figure_is_the_compiled_steps_whole_footprint():
    """As the harness' run peak: arguments (weights, optimizer slots, batch) + outputs not written
    into donated arguments + temporaries, against the model state S/N."""
    s = Scenario("mlp", 8 * MiB, 2, "keras-jax", step=True)
    result = {"init_seconds": 1.5, "platform": "cpu", "variable_bytes": [100, 120],
              "build_live_peak_bytes": [300, 120], "build_allocator_peak_bytes": None,
              "step": {"step_seconds": 0.2, "steps_per_second": 5.0, "compile_seconds": 3.0,
                       "xla": {"argument_bytes": 210, "output_bytes": 205, "alias_bytes": 200, "temp_bytes": 50,
                               "step_bytes": 265}}}
    rows = keras_jax.rows_from_result(s, result)
    assert [(r["rank"], r["phase"], r["peak_bytes"], r["local_bytes"]) for r in rows] == [
        (0, "build", 300, 100), (1, "build", 120, 120), (0, "step", 265, 100), (1, "step", 265, 120)]
    assert rows[2]["ideal_bytes"] == rows[2]["params"] * 16 / 2 and rows[2]["optimizer"] == "adamw"
    assert rows[2]["peak_source"] == "XLA memory analysis" and rows[2]["xla_temp_bytes"] == 50
    assert rows[0]["devices_per_process"] == 2 and rows[0]["peak_source"] == "live arrays at placement"


def _mesh(n):
    import keras

    return keras.distribution.DeviceMesh((n,), ["model"], [f"cpu:{i}" for i in range(n)])


@pytest.mark.parametrize("names", ["current", "llama"])
def test_width_split_maps_match_todays_and_the_llama_shaped_layer_names(names):
    lm = peer_layouts.width_split_map("transformer", _mesh(2), None)
    paths = {"current": {"token_embedding/embeddings": (None, "model"),
                         "block0_attn/query/kernel": ("model", None, None),
                         "block1_attn/attention_output/kernel": (None, None, "model"),
                         "block0_mlp_up/kernel": (None, "model"), "block0_mlp_down/kernel": ("model", None),
                         "block0_ln1/gamma": None},
             "llama": {"block0_mlp_gate/kernel": (None, "model"), "block3_attn/key/kernel": ("model", None, None),
                       "lm_head/kernel": (None, "model"), "block0_norm1/scale": None, "final_norm/scale": None}}
    for path, axes in paths[names].items():
        layout = lm[path]
        assert (None if layout is None else tuple(layout.axes)) == axes, path
    assert lm["block0_attn/output"] is None  # no activation layouts: the backend chooses


def test_width_split_splits_attention_by_heads_where_they_divide_and_refuses_other_families():
    heads = families.dims_for("transformer", 8 * MiB)["heads"]
    lm = peer_layouts.width_split_map("transformer", _mesh(2), 8 * MiB)
    assert heads % 2 == 0 and tuple(lm["block0_attn/value/kernel"].axes) == (None, "model", None)
    assert tuple(peer_layouts.width_split_map("mlp", _mesh(2))["dense_1/kernel"].axes) == (None, "model")
    with pytest.raises(ValueError, match="width-split maps exist for the families mlp and transformer"):
        peer_layouts.width_split_map("gemma", _mesh(2))
    with pytest.raises(ValueError, match="layouts must be one of family, whole-stream, width-split"):
        peer_layouts.peer_layout_map("columns", "mlp", _mesh(2))


JAX_VENV = os.environ.get("SHARDIMPL_JAX_VENV", os.path.join(ROOT, ".venv-jax"))


def test_keras_jax_measures_the_mlp_on_two_devices(tmp_path):
    """A real run: Keras 3.15.1 on JAX (CPU) in its virtualenv, made here when missing (about
    40 s from a package index), then 2 MiB of mlp on 2 devices with a step (about 15 s)."""
    p = 2 * MiB
    scen = [Scenario("mlp", p, 2, "keras-jax", step=True)]
    with open(os.devnull, "w") as quiet:
        rows, meta = keras_jax.run(_args(tmp_path, jax_venv=JAX_VENV, timeout=240.0), scen, log=quiet)
    if "environment unavailable" in (rows[0].get("error") or ""):  # no index reachable, no wheel here
        pytest.skip(f"the keras-jax virtualenv cannot be made here: {rows[0]['error'][:300]}")
    assert {r["status"] for r in rows} == {"ok"}, rows[0].get("error")
    assert meta["keras"] == "3.15.1" and meta["jax"]
    exact = families.exact_param_bytes("mlp", p)
    width = families.dims_for("mlp", p)["width"]
    replicated = 2 * width * 4  # the biases of the two row-split layers (dense_1, dense_3)
    build = {(r["ranks"], r["rank"]): r for r in rows if r["phase"] == "build"}
    assert len(rows) == 2 * 2
    for rank in (0, 1):  # each device holds its half of the split variables and all of the replicated ones
        assert build[(2, rank)]["local_bytes"] == (exact - replicated) // 2 + replicated
        assert build[(2, rank)]["peak_bytes"] >= build[(2, rank)]["local_bytes"]
    for r in rows:
        if r["phase"] == "step":
            assert r["xla_argument_bytes"] >= 3 * r["local_bytes"]  # the variables and AdamW's two moments
            assert r["peak_bytes"] == r["xla_step_bytes"] > 3 * r["local_bytes"]
            assert r["step_seconds"] > 0
