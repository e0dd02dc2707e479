"""Results as data and as something a person reads in ten seconds.

* `summarize`: one line per scenario (family, size, N, mode, budget) from the per-rank,
  per-phase rows of results.json: the worst rank's figures, build and train step side by side.
* `verdicts`: per family, one headline sentence (sharded vs P/N, stock Keras per rank, who fits
  under the budget).
* `table` (aligned text for the terminal), `markdown_table`, `write_results`, `write_report`;
  `bench.report.html` writes the same report as one self-contained HTML file, `bench.report.plots` the plots.

Optional per-row fields (``host_peak_bytes``, ``step_seconds``, ``steps_per_second``) get a
column when some row has them and no column when none does.
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict

from bench.report.peers import PEER_MODES, peer_verdicts

__all__ = ["meta", "summarize", "verdicts", "columns", "table", "markdown_table", "write_results",
           "write_report", "DEFINITIONS", "PEER_DEFINITIONS", "definitions", "MODE_NAMES"]

MiB = float(1 << 20)

# What each mode is called where a person reads it.
MODE_NAMES = {"unsharded": "stock Keras", "sharded": "sharded", "naive": "naive",
              "keras-native": "keras-native", "keras-jax": "keras-jax", "fsdp2": "fsdp2"}
_MODE_ORDER = ("unsharded", "naive", "keras-native", "keras-jax", "fsdp2", "sharded")

DEFINITIONS = (
    "P = the model's parameter bytes (in the variables' dtype). Per-rank peak = the worst rank's peak "
    "of live bytes while building the model (build) or over the whole run, build and two train steps "
    "(step): PeakMeter counts tensor storage at the allocator (CPU) or reads the CUDA allocator's "
    "peak. x P/N = the build peak over the ideal share P/N. x S/N = the run's peak over the model "
    "state's ideal share S/N, S = weights + gradients + optimizer slots (16 bytes per parameter for "
    "AdamW in float32 or mixed_bfloat16, 12 for SGD with momentum, half that in bfloat16: ZeRO's "
    "model states); what is above 1 is activations and temporaries. train step = Keras' own "
    "compile + train_step with the optimizer, dtype policy, remat, sequence length and global batch "
    "given (column 'step'). Scenarios with a budget built "
    "the largest model again under that per-rank allocation limit; OOM = the allocator refused. "
    "Sharded builds carry a fixed extra of about 1 MiB per rank (one initializer tile), which is why "
    "the smallest models sit visibly above P/N. A '-' in the step columns: no step was measured there "
    "(the main job steps at its largest size only, unless --step-every-size). step s = the median of three "
    "unmetered train steps after the metered one, worst rank; steps/s = those three steps per second of "
    "their total time, in ranks that take large blocks from mmap (for the budgets: slower for both modes; "
    "python -m bench speed times steps as a plain process runs them). Stock Keras at N > 1 is N processes "
    "each stepping the whole model on the same cores."
)

PEER_DEFINITIONS = (
    "Peers: keras-native = keras-nightly's torch ModelParallel (N processes over gloo, measured as sharded is). "
    "keras-jax = Keras 3.15.1 on JAX with the same map and step, its N devices in one process (no "
    "inter-process transport: that flatters its step time). Its build figure is the largest sum of live JAX "
    "arrays on a device above the start, sampled each time Keras places a variable (the allocator's peak on "
    "GPU); its step figure is XLA's memory analysis of the compiled step (arguments + unaliased outputs + "
    "temporaries) less the device's variables, i.e. like the harness' figure the peak above the variables "
    "held at the step's start: XLA's plan, not a measurement. fsdp2 = torch's fully_shard (FSDP2) on the "
    "families as plain torch modules, fully_shard per block then the root, built on the meta device and "
    "initialized per shard, N processes over gloo, measured with the same meters: it keeps 1/N of the "
    "parameters, gradients and optimizer state and gathers a block's parameters whole while it runs, so every "
    "rank computes the whole batch through whole blocks (data parallelism), where sharded computes with 1/N of "
    "each kernel (tensor parallelism): build peaks compare like for like, step peaks and step times do not. "
    "Step time over its own N = 1: sharded over stock Keras (torch), a peer over itself."
)


def definitions(rows) -> str:
    """DEFINITIONS, and what the peers' figures are when the rows hold peers."""
    if any(r["mode"] in PEER_MODES for r in rows):
        return DEFINITIONS + " " + PEER_DEFINITIONS
    return DEFINITIONS


# Optional per-row fields: (field, column label, formatter kind, worst-rank reduction).
_OPTIONAL = (
    ("host_peak_bytes", "host MiB", "mib", max),
    ("step_seconds", "step s", "seconds", max),
    ("steps_per_second", "steps/s", "rate", min),
)


def meta(*, device: str, budget_bytes, extra=None) -> dict:
    """Versions, device, machine and budget (imports torch and keras: call after parsing)."""
    import keras
    import numpy
    import psutil
    import torch

    info = {
        "torch": torch.__version__, "keras": keras.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "device": device,
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_model": _cpu_model(), "cpus": os.cpu_count(),
                    "memory_bytes": psutil.virtual_memory().total},
        "budget_bytes": budget_bytes,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["machine"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {**info, **(extra or {})}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --- one line per scenario ---------------------------------------------------------------


def _worst(values, reduce=max):
    values = [v for v in values if v is not None]
    return reduce(values) if values else None


def _status(rs):
    if any(r.get("oom") for r in rs):
        return "OOM"
    bad = [r["status"] for r in rs if r["status"] != "ok"]
    return bad[0] if bad else "ok"


def summarize(rows) -> list[dict]:
    """One dict per scenario, sorted for reading: family, size, unbudgeted before budgeted,
    mode, N. Peaks are the worst rank's, and only for scenarios whose every rank finished."""
    groups = defaultdict(list)
    for r in rows:
        mode = r["mode"] if r.get("mesh", "1d") == "1d" else f"{r['mode']} {r['mesh']}"  # 2-D beside 1-D
        groups[(r["family"], r["param_bytes"], r["ranks"], mode, r.get("budget_bytes") or 0)].append(r)

    def order(key):
        mode = key[3]
        return (key[0], key[1], key[4], _MODE_ORDER.index(mode) if mode in _MODE_ORDER else 99, mode, key[2])

    out = []
    for key in sorted(groups, key=order):
        rs = groups[key]
        fam, p, n, mode, budget = key
        status = _status(rs)
        phases = {ph: [r for r in rs if r.get("phase", "build") == ph] for ph in ("build", "step")}
        first = rs[0]
        s = {"family": fam, "param_bytes": p, "ranks": n, "mode": mode, "budget_bytes": budget or None,
             "params": first.get("params"), "train": train_label(first),
             "status": status, "ranks_reported": len({r.get("rank") for r in rs}),
             "init_seconds": _worst(r.get("init_seconds") for r in rs),
             "gather_seconds": _worst(r.get("gather_seconds") for r in rs),
             "errors": sorted({r["error"] for r in rs if r.get("error") and r["status"] != "ok"}),
             "layouts": rs[0].get("layouts", "family"), "family_map_error": rs[0].get("family_map_error"),
             "peer_note": rs[0].get("peer_note"),
             "devices_per_process": max(r.get("devices_per_process") or 1 for r in rs)}
        for ph in ("build", "step"):
            prs = phases[ph]
            complete = prs and status == "ok" and all(r.get("peak_bytes") is not None for r in prs)
            s[f"{ph}_peak_bytes"] = max(r["peak_bytes"] for r in prs) if complete else None
            s[f"{ph}_ideal_bytes"] = _ideal(prs, ph, p, n) if prs else None
            s[f"{ph}_ratio"] = (s[f"{ph}_peak_bytes"] / s[f"{ph}_ideal_bytes"]
                                if s[f"{ph}_peak_bytes"] is not None else None)
            s[f"has_{ph}"] = bool(prs)
            s[f"{ph}_peak_source"] = next((r["peak_source"] for r in prs if r.get("peak_source")), None)
            for field, _, _, reduce in _OPTIONAL:
                s[f"{ph}_{field}"] = _worst((r.get(field) for r in prs), reduce)
        out.append(s)
    return out


def _ideal(phase_rows, phase, p, n):
    """The phase's ideal share per rank: P/N for the build; for the step the rows' own (the
    model state S/N of their optimizer and precision), else 2P/N (rows of older runs: SGD's
    gradients + momentum above the weights)."""
    given = [r["ideal_bytes"] for r in phase_rows if r.get("ideal_bytes")]
    if given:
        return max(given)
    return (1 if phase == "build" else 2) * p / n


_SHORT_PRECISION = {"float32": "f32", "mixed_bfloat16": "mixed bf16", "bfloat16": "bf16"}


def train_label(row) -> str:
    """The train step of a row in a few characters: "adamw f32 8x128" (+ " remat")."""
    if not row.get("optimizer"):
        return "-"
    label = (f"{row['optimizer']} {_SHORT_PRECISION.get(row['precision'], row['precision'])} "
             f"{row['batch']}x{row['seq']}")
    return label + (" remat" if row.get("remat") == "full" else "")


def count_text(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# --- the headline ------------------------------------------------------------------------


def _mib_text(x) -> str:
    v = x / MiB
    return f"{v:.0f} MiB" if v >= 10 or v == int(v) else f"{v:.1f} MiB"


def _ns(ns) -> str:
    return ", ".join(str(n) for n in sorted(ns))


def _fit_clause(name, fits, ooms, failed, all_ns) -> str:
    """'stock Keras OOMs at every N', 'sharded fits at N >= 2', ... for one mode under the budget."""
    if ooms and not fits and not failed:
        return f"{name} OOMs at every N" if len(ooms) > 1 else f"{name} OOMs at N = {_ns(ooms)}"
    if fits and not ooms and not failed:
        return f"{name} fits at every N" if len(fits) > 1 else f"{name} fits at N = {_ns(fits)}"
    parts = []
    if fits:
        lo = min(fits)
        upper = [n for n in all_ns if n >= lo]
        parts.append(f"fits at N >= {lo}" if sorted(fits) == upper and len(upper) > 1 else f"fits at N = {_ns(fits)}")
    if ooms:
        parts.append(f"OOM at N = {_ns(ooms)}")
    if failed:
        parts.append(f"failed (error/timeout) at N = {_ns(failed)}")
    return f"{name} " + ", ".join(parts)


def _speed_clause(at_p) -> str | None:
    """Sharded train-step time at N (2 first) beside stock Keras' at N = 1 and at N, this run.

    Stock Keras at N = 1 is one process with the whole machine; at N, N processes step
    the whole model each on the same cores the sharded ranks share.
    """
    def secs(mode, n):
        s = at_p.get((mode, n))
        return s.get("step_step_seconds") if s else None

    timed = [n for (m, n) in at_p if m == "sharded" and n > 1 and secs("sharded", n)]
    if not timed:
        return None
    n = 2 if 2 in timed else min(timed)
    sh = secs("sharded", n)
    stock = [f"{secs('unsharded', k):.2f} s at N = {k}" for k in sorted({1, n}) if secs("unsharded", k)]
    if not stock:
        return None
    return f"train step {sh:.2f} s sharded at N = {n}, stock Keras " + ", ".join(stock)


def verdicts(summary, budget_bytes=None) -> dict[str, str]:
    """Per family, one sentence: sharded vs P/N, stock Keras per rank, who fits under the budget.

    e.g. "sharded per-rank build peak = 1.01 x P/N at N = 4 (P = 256 MiB); stock Keras 384 MiB
    per rank whatever N; under a 192 MiB per-rank budget stock Keras OOMs at every N, sharded
    fits at N >= 2".
    """
    out = {}
    for fam in sorted({s["family"] for s in summary}):
        fs = [s for s in summary if s["family"] == fam]
        free = [s for s in fs if not s["budget_bytes"]]
        clauses = []
        sizes = sorted({s["param_bytes"] for s in free if s["build_peak_bytes"] is not None})
        if sizes:
            p = sizes[-1]
            at_p = {(s["mode"], s["ranks"]): s for s in free if s["param_bytes"] == p and s["build_peak_bytes"]}
            sharded_ns = sorted(n for m, n in at_p if m == "sharded")
            if sharded_ns:
                n = sharded_ns[-1]
                s = at_p[("sharded", n)]
                clause = (f"sharded per-rank build peak = {s['build_ratio']:.2f} x P/N at N = {n} "
                          f"(P = {_mib_text(p)}: {_mib_text(s['build_peak_bytes'])} per rank)")
                if s["step_ratio"] is not None:
                    clause += (f", train run peak ({s['train']}) {s['step_ratio']:.2f} x S/N "
                               f"(S = weights + gradients + optimizer slots)")
                clauses.append(clause)
            for mode in ("unsharded", "naive", "keras-native"):
                ns = sorted(n for m, n in at_p if m == mode)
                if not ns:
                    continue
                peaks = [at_p[(mode, n)]["build_peak_bytes"] for n in ns]
                name = MODE_NAMES[mode]
                if len(ns) > 1 and max(peaks) <= 1.03 * min(peaks):
                    clauses.append(f"{name} {_mib_text(max(peaks))} per rank whatever N "
                                   f"({max(peaks) / p:.2f} x P)")
                elif len(ns) == 1:
                    clauses.append(f"{name} {_mib_text(peaks[0])} per rank at N = {ns[0]}")
                else:
                    clauses.append(f"{name} " + ", ".join(_mib_text(x).replace(" MiB", "") for x in peaks)
                                   + f" MiB per rank at N = {_ns(ns)}")
            speed = _speed_clause(at_p)
            if speed:
                clauses.append(speed)
        budgeted = [s for s in fs if s["budget_bytes"]]
        if budgeted:
            b = budgeted[0]["budget_bytes"]
            all_ns = sorted({s["ranks"] for s in budgeted})
            parts = []
            modes = sorted({s["mode"] for s in budgeted},
                           key=lambda m: _MODE_ORDER.index(m) if m in _MODE_ORDER else 99)
            for mode in modes:
                ms = [s for s in budgeted if s["mode"] == mode]
                fits = [s["ranks"] for s in ms if s["status"] == "ok"]
                ooms = [s["ranks"] for s in ms if s["status"] == "OOM"]
                failed = [s["ranks"] for s in ms if s["status"] not in ("ok", "OOM")]
                parts.append(_fit_clause(MODE_NAMES.get(mode, mode), fits, ooms, failed, all_ns))
            clauses.append(f"under a {_mib_text(b)} per-rank budget " + ", ".join(parts))
        failed = [s for s in fs if s["status"] not in ("ok", "OOM") and s["mode"] not in PEER_MODES]
        if failed:
            clauses.append(f"{len(failed)} scenario(s) failed (error/timeout): see the table")
        out[fam] = "; ".join(clauses) if clauses else "no scenario finished"
    out.update(peer_verdicts(summary))  # peers' failures are said there, not counted above
    return out


# --- the table ---------------------------------------------------------------------------


def _fmt(kind, x) -> str:
    if kind == "count":
        return count_text(x)
    if x is None:
        return "-"
    if kind == "mib":
        return f"{x / MiB:.1f}"
    if kind == "ratio":
        return f"{x:.2f}"
    if kind == "seconds":
        return f"{x:.2f}"
    if kind == "rate":
        return f"{x:.1f}"
    return str(x)


def columns(summary):
    """(header, key, kind) for every column this summary needs; optional ones only when present."""
    has_step = any(s["has_step"] for s in summary)
    cols = [("family", "family", "text"), ("params", "params", "count"), ("P MiB", "param_bytes", "mib"),
            ("N", "ranks", "text"), ("mode", "mode", "mode"), ("budget MiB", "budget_bytes", "mib"),
            ("build MiB/rank", "build_peak_bytes", "mib"), ("x P/N", "build_ratio", "ratio")]
    if has_step:
        cols += [("step", "train", "text"), ("run MiB/rank", "step_peak_bytes", "mib"),
                 ("x S/N", "step_ratio", "ratio")]
    for field, label, kind, _ in _OPTIONAL:
        phases = [ph for ph in ("build", "step") if any(s.get(f"{ph}_{field}") is not None for s in summary)]
        for ph in phases:
            cols.append((f"{ph} {label}" if len(phases) > 1 else label, f"{ph}_{field}", kind))
    cols += [("init s", "init_seconds", "seconds"), ("gather s", "gather_seconds", "seconds"),
             ("status", "status", "text")]
    return cols


def cells(summary):
    """(headers, rows of strings, right-aligned flags) for the renderers."""
    cols = columns(summary)
    body = []
    for s in summary:
        row = []
        for _, key, kind in cols:
            if kind == "mode":
                row.append(MODE_NAMES.get(s[key], s[key]))
            elif kind == "text":
                row.append(str(s[key]))
            else:
                row.append(_fmt(kind, s[key]))
        body.append(row)
    right = [kind not in ("text", "mode") or key == "ranks" for _, key, kind in cols]
    return [c[0] for c in cols], body, right


def _widths(headers, body):
    return [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]


def table(rows) -> str:
    """The scenario table as aligned text, a blank line between (family, size) groups."""
    summary = summarize(rows)
    headers, body, right = cells(summary)
    w = _widths(headers, body)

    def line(vals):
        return "  ".join(v.rjust(w[i]) if right[i] else v.ljust(w[i]) for i, v in enumerate(vals)).rstrip()

    out = [line(headers), "  ".join("-" * x for x in w)]
    prev = None
    for s, vals in zip(summary, body):
        group = (s["family"], s["param_bytes"], bool(s["budget_bytes"]))
        if prev is not None and group != prev:
            out.append("")
        prev = group
        out.append(line(vals))
    return "\n".join(out)


def markdown_table(rows) -> str:
    """The scenario table in Markdown, padded so that it is aligned as plain text too."""
    headers, body, right = cells(summarize(rows))
    w = [max(3, x) for x in _widths(headers, body)]  # a delimiter cell needs a dash besides its colon

    def line(vals):
        return "| " + " | ".join(v.rjust(w[i]) if right[i] else v.ljust(w[i]) for i, v in enumerate(vals)) + " |"

    rule = "| " + " | ".join(("-" * (w[i] - 1) + ":") if right[i] else "-" * w[i] for i in range(len(w))) + " |"
    return "\n".join([line(headers), rule] + [line(v) for v in body])


# --- files -------------------------------------------------------------------------------


def write_results(path, meta_: dict, rows) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta_, "rows": rows}, f, indent=1, default=str)


def meta_lines(meta_: dict) -> list[tuple[str, str]]:
    """(label, value) pairs describing the run, for report.md and report.html."""
    m = meta_.get("machine", {})
    budget = meta_.get("budget_bytes")
    out = [("versions", f"torch {meta_.get('torch')}, keras {meta_.get('keras')}, "
                        f"numpy {meta_.get('numpy')}, python {meta_.get('python')}"),
           ("device", str(meta_.get("device")) + (f" ({', '.join(m['gpus'])})" if m.get("gpus") else "")),
           ("machine", f"{m.get('cpus')} CPUs ({m.get('cpu_model') or m.get('processor')}), "
                       f"{(m.get('memory_bytes') or 0) / (1 << 30):.1f} GiB, {m.get('platform')}"),
           ("per-rank budget", "none" if not budget else _mib_text(budget))]
    if meta_.get("train_step"):
        t = meta_["train_step"]
        out.append(("train step", f"Keras' compile + train_step: optimizer {t['optimizer']}, dtype policy "
                                  f"{t['precision']}, remat {t['remat']}, sequence {t['seq']} tokens, "
                                  f"global batch {t['batch']}"))
    if meta_.get("command"):
        out.append(("command", meta_["command"]))
    if meta_.get("wall_seconds") is not None:
        start, end = meta_.get("load_average_start"), meta_.get("load_average")
        loads = ([f"{start[0]:.2f} at the start"] if start else []) + ([f"{end[0]:.2f} at the end"] if end else [])
        out.append(("wall time", f"{meta_['wall_seconds']:.0f} s"
                    + (f" (1-minute load average {', '.join(loads)})" if loads else "")))
    if meta_.get("started"):
        out.append(("started", meta_["started"]))
    for key, value in meta_.items():
        if key == "keras_native" and isinstance(value, dict):
            out.append(("keras-native", ", ".join(f"{k} {v}" for k, v in value.items() if v)))
        if key == "peers" and isinstance(value, dict):
            for name, info in value.items():
                info = dict(info or {})
                rest = "; ".join(f"{k}: {v}" for k, v in info.items() if v and k != "what")
                out.append((name, (info.get("what") or name) + (f" ({rest})" if rest else "")))
    return out


def write_report(path, meta_: dict, rows, plots=()) -> None:
    """report.md: the verdicts, what the run was, the plots and the aligned table."""
    summary = summarize(rows)
    lines = ["# shardimpl scaling report", ""]
    for fam, text in verdicts(summary, meta_.get("budget_bytes")).items():
        lines += [f"- **{fam}**: {text}."]
    lines += [""]
    lines += [f"- {label}: {value}" for label, value in meta_lines(meta_)]
    lines += ["", definitions(rows), ""]
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    lines += [markdown_table(rows), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
