"""The report a person reads: verdicts, aligned tables, optional columns, plots, the HTML file
(in a real headless browser when chromium is installed). Synthetic rows, no ranks."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from _report_rows import MiB, job_rows, meta
from bench.report import html as html_report
from bench.report import plots
from bench.report import summary as report


def test_verdict_is_the_headline_of_each_family():
    rows = job_rows(families=("mlp", "transformer"))
    verdicts = report.verdicts(report.summarize(rows), 48 * MiB)
    assert list(verdicts) == ["mlp", "transformer"]
    # P = 64 MiB; sharded N = 4: 16 MiB + 1 MiB = 1.06 x P/N; stock Keras 1.5 x P = 96 MiB at every N;
    # under 48 MiB stock Keras never fits, sharded needs 65, 33, 17 MiB at N = 1, 2, 4.
    assert verdicts["mlp"] == (
        "sharded per-rank build peak = 1.06 x P/N at N = 4 (P = 64 MiB: 17 MiB per rank), train run peak "
        "(adamw f32 8x128) 1.00 x S/N (S = weights + gradients + optimizer slots); stock Keras 96 MiB per "
        "rank whatever N (1.50 x P); under a 48 MiB per-rank budget "
        "stock Keras OOMs at every N, sharded fits at N >= 2, OOM at N = 1")


def test_verdict_names_failures_and_partial_fits():
    rows = job_rows(ranks=(1, 2), budget_mib=40, step=False)
    for r in rows:
        if r["mode"] == "sharded" and r["ranks"] == 2 and not r["budget_bytes"] and r["param_bytes"] == 16 * MiB:
            r.update(status="timeout", peak_bytes=None)
    text = report.verdicts(report.summarize(rows), 40 * MiB)["mlp"]
    assert "sharded fits at N = 2, OOM at N = 1" in text
    assert "1 scenario(s) failed (error/timeout)" in text
    assert "train step" not in text


def test_verdict_puts_the_sharded_step_time_beside_stock_keras_from_the_same_run():
    def timed(row):
        if row["phase"] != "step":
            return {}
        per_mode = {"unsharded": 0.1, "sharded": 0.06}[row["mode"]]
        return {"step_seconds": per_mode * row["ranks"] + 0.01 * row["rank"]}  # worst rank counts

    verdicts = report.verdicts(report.summarize(job_rows(extra=timed)), 48 * MiB)
    # sharded N = 2: 0.12 + 0.01 (rank 1); stock Keras N = 1: 0.10, N = 2: 0.21.
    assert "train step 0.13 s sharded at N = 2, stock Keras 0.10 s at N = 1, 0.21 s at N = 2" in verdicts["mlp"]
    untimed = report.verdicts(report.summarize(job_rows()), 48 * MiB)["mlp"]
    assert "sharded at N" not in untimed


def _columns_of(text):
    """Column spans from the dashes under the header."""
    lines = text.splitlines()
    return lines, [(m.start(), m.end()) for m in re.finditer(r"-+", lines[1])]


def test_terminal_table_is_aligned_one_line_per_scenario():
    rows = job_rows()
    text = report.table(rows)
    lines, spans = _columns_of(text)
    body = [ln for ln in lines[2:] if ln.strip()]
    assert len(body) == len(report.summarize(rows)) == 2 * 3 * 2 + 3 * 2  # build and step on one line
    for line in [lines[0]] + body:
        padded = line.ljust(spans[-1][1])
        for (a, b), (c, _) in zip(spans, spans[1:] + [(len(padded), 0)]):
            assert padded[b:c].strip() == "", (line, a, b)  # nothing between the columns
            assert padded[a:b].strip(), (line, a, b)  # every cell filled ("-" when absent)
    head = lines[0].split()
    assert head[:5] == ["family", "params", "P", "MiB", "N"] and "x" in head and "status" in head


def test_markdown_table_is_padded_and_valid():
    text = report.markdown_table(job_rows())
    lines = text.splitlines()
    assert len({len(ln) for ln in lines}) == 1  # aligned as plain text too
    assert len({ln.count("|") for ln in lines}) == 1
    assert all(re.fullmatch(r"-+:?", c.strip()) for c in lines[1].strip("|").split("|"))


def test_table_reports_the_worst_rank_and_oom():
    rows = []
    for rank, peak in enumerate([100, 120]):
        rows.append({"family": "mlp", "param_bytes": 200, "ranks": 2, "rank": rank, "mode": "sharded",
                     "phase": "build", "peak_bytes": peak, "ideal_bytes": 100.0, "oom": False,
                     "status": "ok", "init_seconds": 0.5, "gather_seconds": 0.1})
    rows.append({"family": "mlp", "param_bytes": 200, "ranks": 1, "rank": 0, "mode": "unsharded",
                 "phase": "build", "peak_bytes": None, "ideal_bytes": 200.0, "oom": True,
                 "status": "oom", "init_seconds": None, "gather_seconds": None})
    text = report.table(rows)
    assert re.search(r"\b1\.20\b", text)  # 120 / 100: the worst rank counts
    assert "OOM" in text and "step" not in text  # no step rows: no step columns


def test_optional_columns_appear_only_when_rows_carry_them():
    plain = report.table(job_rows())
    for label in ("host MiB", "step s", "steps/s"):
        assert label not in plain

    def future(row):
        out = {"host_peak_bytes": None if row["oom"] else row["peak_bytes"] + 3 * MiB}
        if row["phase"] == "step" and row["ranks"] > 1:  # present on some rows only
            out.update(step_seconds=0.25 * row["rank"] + 0.5, steps_per_second=2.0 - row["rank"] * 0.5)
        return out

    rows = job_rows(extra=future)
    headers, body, _ = report.cells(report.summarize(rows))
    assert {"build host MiB", "step host MiB", "step s", "steps/s"} <= set(headers)
    text = report.table(rows)
    lines, _ = _columns_of(text)
    row = next(s for s in report.summarize(rows) if s["ranks"] == 4 and s["mode"] == "sharded")
    assert row["step_step_seconds"] == 0.5 + 0.25 * 3 and row["step_steps_per_second"] == 0.5  # worst rank
    assert "-" in body[0][headers.index("step s")]  # N = 1 rows have none: shown as "-"
    html = html_report.render(meta(), rows)
    assert "steps/s" in html and "build host MiB" in html


def test_spread_labels_keeps_a_gap_and_moves_little():
    ys = [5.0, 5.01, 5.02, 9.0]
    out = plots.spread_labels(ys, gap=0.5)
    ordered = sorted(out)
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(ordered, ordered[1:]))
    assert out[3] == 9.0 and abs(sum(out[:3]) / 3 - 5.01) < 1e-6  # the cluster spreads around its centre


def test_coinciding_points_are_spread_sideways():
    offsets = plots._dodge({"unsharded": 96.0, "naive": 96.5, "sharded": 17.0}, 0.1)
    assert offsets["sharded"] == 0.0
    assert offsets["unsharded"] != offsets["naive"]


def test_plots_are_written_with_peers_and_without_a_budget(tmp_path):
    rows = job_rows(families=("mlp", "transformer"))
    for r in list(rows):  # naive coincides with stock Keras: both must stay visible
        if r["mode"] == "unsharded":
            rows.append({**r, "mode": "naive"})
    paths = plots.plot_scaling(rows, str(tmp_path), 48 * MiB)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["scaling_vs_ranks.png", "scaling_vs_size.png"]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "nobudget").mkdir()
    assert len(plots.plot_scaling(job_rows(budget_mib=None), str(tmp_path / "nobudget"))) == 2


def test_report_md_and_html_carry_verdicts_table_plots_and_meta(tmp_path):
    rows = job_rows()
    paths = plots.plot_scaling(rows, str(tmp_path), 48 * MiB)
    report.write_report(str(tmp_path / "report.md"), meta(), rows, paths)
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# shardimpl scaling report\n\n- **mlp**: sharded per-rank build peak")
    assert "![scaling_vs_ranks.png](scaling_vs_ranks.png)" in md and "| family" in md
    html_report.write_html(str(tmp_path / "report.html"), meta(), rows, paths)
    html = (tmp_path / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=['"]?(https?:|//|/|file:)""", html)  # nothing to fetch
    assert "<script" not in html
    for text in ("stock Keras OOMs at every N", "torch 2.13.0+cpu", "python -m bench --quick", "wall time",
                 "12 s", "test CPU", "x P/N"):
        assert text in html, text
    assert re.search(r"<td class='OOM' title='[^']*can&#x27;t allocate memory[^']*'>OOM</td>", html)


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install -y chromium)")
def test_html_report_renders_in_a_headless_browser(tmp_path):
    import matplotlib.image

    rows = job_rows(families=("mlp", "transformer"))
    paths = plots.plot_scaling(rows, str(tmp_path), 48 * MiB)
    page = tmp_path / "report.html"
    html_report.write_html(str(page), meta(), rows, paths)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"]
    done = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(str(shot))[:, :, :3]
    assert pixels.shape[:2] == (1600, 1280)

    def has(rgb):
        target = [c / 255 for c in rgb]
        return bool((abs(pixels - target).max(axis=2) < 0.03).sum() > 50)

    assert has((214, 39, 40)), "no stock-Keras red: the embedded plot did not render"
    assert has((31, 119, 180)), "no sharded blue"
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "stock Keras OOMs at every N" in dom and dom.count("<tr") > 10
