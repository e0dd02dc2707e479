"""The benchmark harness: parameter counts, the memory compare, the main job end to end
(the report's pure parts: tests/test_report.py; the command line: tests/test_cli.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench.gates import compare_memory as compare
from bench.harness import families

HAS_HUB = importlib.util.find_spec("keras_hub") is not None
NEEDS_HUB = pytest.mark.skipif(not HAS_HUB, reason="keras-hub is not installed")


@pytest.mark.parametrize("family", [f for f in families.FAMILIES if f not in families.HUB]
                         + [pytest.param(f, marks=NEEDS_HUB) for f in families.HUB])
@pytest.mark.parametrize("size_mib", [1, 16])
def test_exact_param_bytes_equals_the_built_model(family, size_mib):
    model = families.build_model(family, size_mib << 20)
    built = sum(int(v.value.numel()) * 4 for v in model.weights)
    assert families.exact_param_bytes(family, size_mib << 20) == built
    assert 0.8 < built / (size_mib << 20) < 1.25


def test_transformer_is_llama_shaped_rmsnorm_gqa_swiglu_untied_head_no_biases():
    import keras

    model = families.build_model("transformer", 4 << 20, seq=16)
    dims = families.dims_for("transformer", 4 << 20)
    sizes = sorted(((v.value.numel(), v.path) for v in model.weights), reverse=True)
    assert {sizes[0][1], sizes[1][1]} == {"token_embedding/embeddings", "lm_head/kernel"}  # untied
    blocks = [layer for layer in model.layers if layer.name.startswith("block")]
    assert len(blocks) == dims["layers"] >= 2
    attn = blocks[0].attn
    assert isinstance(attn, keras.layers.GroupQueryAttention)
    assert attn.num_key_value_heads < attn.num_query_heads == dims["heads"]
    assert isinstance(blocks[0].norm1, keras.layers.RMSNormalization)
    assert blocks[0].mlp_gate.activation is keras.activations.silu and blocks[0].mlp_up.units == dims["ffn"]
    assert not any(v.path.endswith("bias") for v in model.weights)
    assert tuple(model.output.shape) == (8, 16, dims["vocab"])


@pytest.mark.parametrize("params, shape, billions", [
    (8e9, dict(d_model=4096, layers=32, ffn=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256), 8.03),
    (70e9, dict(d_model=8192, layers=80, ffn=28672, heads=64, kv_heads=8, head_dim=128, vocab=128256), 70.55),
])
def test_transformer_has_llama3_published_shapes_at_8b_and_70b(params, shape, billions):
    assert families.dims_for("transformer", params * 4) == shape
    assert round(families.param_count("transformer", params * 4) / 1e9, 2) == billions


def test_smaller_transformers_keep_llama3_8b_proportions_and_grow_in_depth():
    dims = [families.dims_for("transformer", mib << 20) for mib in (16, 128, 1024, 8192)]
    assert [d["layers"] for d in dims] == sorted(d["layers"] for d in dims) and dims[-1]["layers"] > dims[0]["layers"]
    for d in dims:
        assert d["ffn"] == 3.5 * d["d_model"] and abs(d["vocab"] / d["d_model"] - 128256 / 4096) < 0.1
        assert d["heads"] % d["kv_heads"] == 0 and d["kv_heads"] < d["heads"] and d["heads"] >= 8


def test_layout_maps_shard_every_large_variable():

    for family in [f for f in families.FAMILIES if HAS_HUB or f not in families.HUB]:
        mesh = families.model_mesh(family, ["cpu:0"])
        model = families.build_model(family, 4 << 20)
        lm = families.layout_map(family, mesh)
        total = sum(v.value.numel() for v in model.weights)
        for v in model.weights:
            if v.value.numel() > 0.01 * total:
                assert lm[v.path] is not None and "model" in lm[v.path].axes, v.path


def _bench_json(path, peaks):
    path.write_text(json.dumps({"benchmarks": [
        {"name": n, "fullname": n, "extra_info": {"max_peak_bytes": p}} for n, p in peaks.items()]}))
    return str(path)


def test_compare_memory_flags_growth_beyond_factor_and_missing_benchmarks(tmp_path):
    base = _bench_json(tmp_path / "a.json", {"t[16-2]": 1000, "t[64-2]": 4000, "gone": 10})
    cur = _bench_json(tmp_path / "b.json", {"t[16-2]": 1050, "t[64-2]": 4500})
    problems = compare.compare_peaks(compare.peaks_by_name(base), compare.peaks_by_name(cur), 1.10)
    assert len(problems) == 2
    assert any("t[64-2]" in p and "1.125x" in p for p in problems)
    assert any("gone" in p and "not in the current run" in p for p in problems)
    assert compare.main([base, base]) == 0
    assert compare.main([base, cur]) == 1


def test_compare_memory_gates_the_host_figure_with_factor_and_slack(tmp_path, capsys):
    MiB = 1 << 20

    def write(name, host):
        path = tmp_path / name
        path.write_text(json.dumps({"benchmarks": [
            {"name": n, "fullname": f"bench/suites/test_bench_pt.py::{n}",
             "extra_info": {"max_peak_bytes": 8 * MiB, "max_host_peak_bytes": h}} for n, h in host.items()]}))
        return str(path)

    base = write("a.json", {"t[16-2]": 10 * MiB, "t[64-2]": 40 * MiB})
    noisy = write("b.json", {"t[16-2]": 12 * MiB, "t[64-2]": 43 * MiB})  # within 1.1 x + 3 MiB
    grown = write("c.json", {"t[16-2]": 10 * MiB, "t[64-2]": 72 * MiB})  # a full-size host copy
    assert compare.main([base, noisy]) == 0
    assert compare.main([base, grown]) == 1
    out = capsys.readouterr().out
    assert "host peak" in out and "t[64-2]" in out and "1 regressed" in out
    assert compare.main([base, grown, "--host-slack-mib", "40"]) == 0


def test_asv_discovers_only_the_suites_and_every_benchmark_name_there_is_meant():
    """asv imports every module under its benchmark_dir and runs any module-level
    time_/track_/mem_/peakmem_ function as a benchmark: it must point at bench/suites (the
    harness, tools and report are no benchmarks), and there only classes may carry such names
    (a module-level helper so named fails every `asv run`, exit 2)."""
    import importlib
    import json
    import os
    import pkgutil

    from bench import suites

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "asv.conf.json")) as f:
        assert json.load(f)["benchmark_dir"] == "bench/suites"
    prefixes = ("time_", "track_", "mem_", "peakmem_")
    stray, classes = [], []
    for info in pkgutil.iter_modules(suites.__path__):
        module = importlib.import_module(f"bench.suites.{info.name}")
        stray += [f"{info.name}.{name}" for name, value in vars(module).items()
                  if name.startswith(prefixes) and callable(value)]
        classes += [name for name, value in vars(module).items() if isinstance(value, type)
                    and any(a.startswith(prefixes) for a in vars(value))]
    assert not stray, f"asv would run these as benchmarks: {stray}"
    assert "ShardLocalInit" in classes and len(classes) >= 3, classes


@pytest.mark.distributed
def test_main_job_writes_results_report_and_both_plots(tmp_path):
    import os
    import re
    import subprocess
    import sys

    out = tmp_path / "results"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--families", "mlp", "--sizes", "8,32", "--ranks", "1,2",
         "--budget", "24", "--no-step", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "KERAS_BACKEND": "torch"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "build MiB/rank" in done.stdout and "x P/N" in done.stdout
    assert re.search(r"^mlp: sharded per-rank build peak = 1\.\d\d x P/N at N = 2", done.stdout, re.M)
    assert "stock Keras OOMs at every N, sharded fits at N = 2, OOM at N = 1" in " ".join(done.stdout.split())
    # Progress: one whole line per scenario, nothing from the ranks inside it.
    progress = [ln for ln in done.stderr.splitlines() if ln.startswith("[")]
    assert len(progress) == 2 * 2 * 2 + 2 * 2, done.stderr
    assert all(re.fullmatch(r"\[\s*\d+/12\] mlp .* (ok|OOM)\s+\d+\.\d s", ln) for ln in progress), progress
    assert "alltoall" not in done.stderr
    data = json.loads((out / "results.json").read_text())
    assert {"torch", "keras", "device", "machine", "budget_bytes", "wall_seconds", "command"} <= set(data["meta"])
    budgeted = [r for r in data["rows"] if r["budget_bytes"]]
    assert all(r["oom"] for r in budgeted if r["mode"] == "unsharded")  # a 32 MiB stock build > 24 MiB
    assert not any(r["oom"] for r in budgeted if r["mode"] == "sharded" and r["ranks"] == 2)
    for name in ("scaling_vs_ranks.png", "scaling_vs_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scaling_vs_size.png" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "stock Keras OOMs at every N" in html


@pytest.mark.distributed
def test_sp_losses_compares_both_maps_with_stock_keras(capsys):
    from bench.tools import sp_losses

    assert sp_losses.main(["--family", "transformer", "--size", "1", "--seq", "16", "--batch", "4",
                           "--ranks", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    for label, _ in sp_losses.MAPS:
        assert f"N=2 {label}: sharded [" in out and f"{label}: largest relative loss difference" in out


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_the_one_rank_model_has_the_sharded_models_local_block_shapes(family):
    """`python -m bench speed --floor`'s model: each variable is the block one of 2 ranks holds
    under the speed tool's LayoutMap (every dim mapped to "model" halved), nothing else."""
    from bench.harness.rank_local import rank_local_batch, rank_local_model

    size = 4 << 20
    whole = families.build_model(family, size)
    lm = families.layout_map(family, families.model_mesh(family, ["cpu:0", "cpu:1"]), size)
    local = {v.path.split("/", 1)[1]: tuple(v.shape) for v in rank_local_model(family, size, 2).weights}
    expected = {}
    for v in whole.weights:
        layout = lm[v.path]
        axes = layout.axes if layout is not None else (None,) * len(v.shape)
        expected[v.path.split("/", 1)[1]] = tuple(d // 2 if a == "model" else d for d, a in zip(v.shape, axes))
    assert local == expected
    assert any(local[k] != tuple(v.shape) for k, v in zip(local, whole.weights))  # something is split
    ids = rank_local_batch(family, size, 2)
    if family == "transformer":
        assert int(ids.max()) < families.dims_for(family, size)["vocab"] // 2
