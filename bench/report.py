"""Results as data: results.json, a Markdown report, the table on stdout, and two plots."""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict

__all__ = ["meta", "table", "write_results", "write_report", "plot_scaling"]

MiB = float(1 << 20)


def meta(*, device: str, budget_bytes, extra=None) -> dict:
    import keras
    import numpy
    import psutil
    import torch

    info = {
        "torch": torch.__version__, "keras": keras.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "device": device,
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total},
        "budget_bytes": budget_bytes,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["machine"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {**info, **(extra or {})}


def _mib(x):
    return "-" if x is None else f"{x / MiB:.1f}"


def _summary(rows):
    """One line per (family, size, ranks, mode, phase, budget): the worst rank."""
    groups = defaultdict(list)
    for r in rows:
        mode = r["mode"] if r.get("mesh", "1d") == "1d" else f"{r['mode']} {r['mesh']}"  # 2-D beside 1-D
        groups[(r["family"], r["param_bytes"], r["ranks"], mode, r["phase"],
                r.get("budget_bytes") or 0)].append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[5], k[4], k[3], k[2])):
        rs = groups[key]
        peaks = [r["peak_bytes"] for r in rs if r["peak_bytes"] is not None]
        status = "OOM" if any(r["oom"] for r in rs) else ("ok" if all(r["status"] == "ok" for r in rs)
                                                          else next(r["status"] for r in rs if r["status"] != "ok"))
        peak = max(peaks) if peaks and status == "ok" else None
        ideal = rs[0]["ideal_bytes"]
        init = [r["init_seconds"] for r in rs if r["init_seconds"] is not None]
        gather = [r["gather_seconds"] for r in rs if r["gather_seconds"] is not None]
        out.append({
            "family": key[0], "param_bytes": key[1], "ranks": key[2], "mode": key[3], "phase": key[4],
            "budget_bytes": key[5] or None, "peak_bytes": peak, "ideal_bytes": ideal, "ratio": None if peak is None else peak / ideal,
            "status": status, "init_seconds": max(init) if init else None,
            "gather_seconds": max(gather) if gather else None,
        })
    return out


def table(rows) -> str:
    """The scaling table: per-rank peak (worst rank), its ratio to the ideal, times, status."""
    head = ("family", "params MiB", "N", "mode", "phase", "budget MiB", "peak/rank MiB", "ideal MiB",
            "ratio", "init s", "gather s", "status")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for s in _summary(rows):
        lines.append(" | ".join([
            s["family"], _mib(s["param_bytes"]), str(s["ranks"]), s["mode"], s["phase"],
            _mib(s["budget_bytes"]), _mib(s["peak_bytes"]), _mib(s["ideal_bytes"]),
            "-" if s["ratio"] is None else f"{s['ratio']:.3f}",
            "-" if s["init_seconds"] is None else f"{s['init_seconds']:.2f}",
            "-" if s["gather_seconds"] is None else f"{s['gather_seconds']:.2f}",
            s["status"],
        ]))
    return "\n".join(lines)


def write_results(path, meta_: dict, rows) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta_, "rows": rows}, f, indent=1, default=str)


def write_report(path, meta_: dict, rows, plots=()) -> None:
    budget = meta_.get("budget_bytes")
    lines = [
        "# shardimpl scaling report", "",
        f"torch {meta_['torch']}, keras {meta_['keras']}, device {meta_['device']}, "
        f"{meta_['machine']['cpus']} CPUs, per-rank budget "
        f"{'none' if not budget else _mib(budget) + ' MiB'}.", "",
        "Per-rank peak = the worst rank's peak of live bytes (PeakMeter: CPU allocator-level "
        "tracker, or CUDA allocator peak). Ideal = P/N for a build, 2P/N (gradients + momentum) "
        "for a train step. Rows with a budget ran under that per-rank allocation limit; OOM = the "
        "allocator refused under it. Plots draw unbudgeted peaks and budgeted OOMs (at y = P).", "",
        table(rows), "",
    ]
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


_STYLE = {"sharded": ("tab:blue", "o"), "unsharded": ("tab:red", "s"),
          "naive": ("tab:orange", "^"), "keras-native": ("tab:green", "D")}
# Peers often coincide (naive and keras-native both build each variable whole): dashes keep
# every line visible where they overlap.
_LINE = {"naive": (0, (6, 3)), "keras-native": (0, (1, 2))}


def _plot_points(summary):
    """(measured, ooms): per (family, size, N, mode) the build peak measured without a budget
    (a budgeted run where there is no other), and the keys whose budgeted run ran out of memory."""
    measured, ooms = {}, set()
    for s in summary:
        key = (s["family"], s["param_bytes"], s["ranks"], s["mode"])
        if s["status"] == "OOM":
            ooms.add(key)
        elif s["peak_bytes"] is not None and (key not in measured or not s["budget_bytes"]):
            measured[key] = s["peak_bytes"]
    return measured, ooms


def _oom_marks(ax, xs, ys, color, alpha, label):
    if xs:
        ax.plot(xs, ys, marker="x", color=color, alpha=alpha, markersize=12, mew=3, linestyle="none",
                label=label)


def plot_scaling(rows, out_dir, budget_bytes=None) -> list[str]:
    """scaling_vs_ranks.png (log-log, with ideal P/N) and scaling_vs_size.png (with the budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured, ooms = _plot_points([s for s in _summary(rows) if s["phase"] == "build"])
    keys = set(measured) | ooms
    families = sorted({k[0] for k in keys})
    paths = []

    fig, axes = plt.subplots(1, len(families), figsize=(7 * len(families), 6.5), squeeze=False)
    for ax, fam in zip(axes[0], families):
        sizes = sorted({k[1] for k in keys if k[0] == fam})
        all_ranks = sorted({k[2] for k in keys if k[0] == fam})
        for j, size in enumerate(sizes):
            alpha = 0.4 + 0.6 * (j + 1) / len(sizes)
            ranks = sorted({k[2] for k in keys if k[:2] == (fam, size)})
            ax.plot(ranks, [size / n / MiB for n in ranks], "k--", alpha=alpha, lw=1,
                    label="ideal P/N" if j == len(sizes) - 1 else None)
            for mode in sorted({k[3] for k in keys if k[:2] == (fam, size)}):
                color, marker = _STYLE.get(mode, ("gray", "x"))
                ok = [(n, measured[(fam, size, n, mode)] / MiB) for n in ranks if (fam, size, n, mode) in measured]
                if ok:
                    ax.plot(*zip(*ok), marker=marker, color=color, alpha=alpha, linestyle=_LINE.get(mode, "-"),
                            label=f"{mode} {size / MiB:.0f} MiB")
                oom = [n for n in ranks if (fam, size, n, mode) in ooms]
                _oom_marks(ax, oom, [size / MiB] * len(oom), color, alpha,
                           f"{mode} {size / MiB:.0f} MiB: OOM under budget")
        _finish_axes(ax, budget_bytes, "ranks N", f"{fam}: per-rank build peak vs N")
        ax.set_xticks(all_ranks, [str(n) for n in all_ranks])
    paths.append(_save(fig, out_dir, "scaling_vs_ranks.png"))

    fig, axes = plt.subplots(1, len(families), figsize=(7 * len(families), 6.5), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for mode in sorted({k[3] for k in keys if k[0] == fam}):
            color, marker = _STYLE.get(mode, ("gray", "x"))
            for j, n in enumerate(sorted({k[2] for k in keys if k[0] == fam and k[3] == mode})):
                alpha = 1.0 - 0.25 * j
                sizes = sorted({k[1] for k in keys if k[0] == fam and k[2] == n and k[3] == mode})
                ok = [(p / MiB, measured[(fam, p, n, mode)] / MiB) for p in sizes if (fam, p, n, mode) in measured]
                if ok:
                    ax.plot(*zip(*ok), marker=marker, color=color, alpha=alpha, linestyle=_LINE.get(mode, "-"),
                            label=f"{mode} N={n}")
                oom = [p / MiB for p in sizes if (fam, p, n, mode) in ooms]
                _oom_marks(ax, oom, oom, color, alpha, f"{mode} N={n}: OOM under budget")
        _finish_axes(ax, budget_bytes, "model parameters (MiB)", f"{fam}: per-rank build peak vs model size")
    paths.append(_save(fig, out_dir, "scaling_vs_size.png"))
    return paths


def _finish_axes(ax, budget_bytes, xlabel, title):
    if budget_bytes:
        ax.axhline(budget_bytes / MiB, color="gray", linestyle=":", label="per-rank budget")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("per-rank build peak (MiB)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def _save(fig, out_dir, name) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
