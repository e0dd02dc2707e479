"""The two scaling plots, drawn to be read without a legend.

* ``scaling_vs_ranks.png``: per-rank build peak against N, one panel per (family, model size).
* ``scaling_vs_size.png``: per-rank build peak against model size, one panel per (family, N).
* ``peers_vs_ranks.png`` (runs with peers): build peak, step peak and step time against N at the
  largest size, one row of three panels per family, every mode on each, against the rows' own
  ideal (P/N for the build, the model state S/N for the step); a hollow marker is a figure that
  is not an allocator's peak (keras-jax on CPU: sampled live arrays, XLA's plan).

Both: axes in MiB on log2 scales with plain-number ticks; each line labelled at its right end
(mode and last value) instead of a legend; the ideal P/N drawn as a wide grey band under the
lines; points that coincide (within 4 %) at one x are spread sideways so that every series
stays visible. The budget is drawn only where a run used it (the largest size), with its value
written on it; a budgeted run that ran out of memory is an X on the budget line (where it
stopped), one that fit a ring around its peak.
"""

from __future__ import annotations

import math
import os

__all__ = ["plot_scaling", "plot_peers", "spread_labels"]

MiB = float(1 << 20)
_STYLE = {  # mode: (name, colour, marker, line style)
    "unsharded": ("stock Keras", "#d62728", "s", "-"),
    "naive": ("naive", "#ff7f0e", "^", (0, (6, 3))),
    "keras-native": ("keras-native", "#2ca02c", "D", (0, (2, 2))),
    "keras-jax": ("keras-jax", "#9467bd", "P", (0, (5, 1, 1, 1))),
    "fsdp2": ("fsdp2", "#8c564b", "v", (0, (3, 1))),
    "sharded": ("sharded", "#1f77b4", "o", "-"),
}
_ORDER = ("unsharded", "naive", "keras-native", "keras-jax", "fsdp2", "sharded")
_IDEAL = "#b0b0b0"
_BUDGET = "#444444"


def _style(mode):
    return _STYLE.get(mode, (mode, "#7f7f7f", "v", "-"))


def _modes(keys):
    return sorted(keys, key=lambda m: _ORDER.index(m) if m in _ORDER else 99)


def _points(summary):
    """(measured, budgeted): unbudgeted build peaks per (family, P, N, mode), and the budgeted
    runs per (family, P, N, mode) -> (budget, status, peak)."""
    measured, budgeted = {}, {}
    for s in summary:
        key = (s["family"], s["param_bytes"], s["ranks"], s["mode"])
        if s["budget_bytes"]:
            budgeted[key] = (s["budget_bytes"], s["status"], s["build_peak_bytes"])
        elif s["build_peak_bytes"] is not None:
            measured[key] = s["build_peak_bytes"]
    return measured, budgeted


def spread_labels(ys, gap):
    """Positions for labels wanted at ``ys`` (log units), at least ``gap`` apart, each moved as
    little as possible; returned in the input order."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    pos = [ys[i] for i in order]
    for _ in range(100):  # pairwise pushes converge in a few rounds
        moved = False
        for k in range(1, len(pos)):
            overlap = gap - (pos[k] - pos[k - 1])
            if overlap > 1e-9:
                pos[k - 1] -= overlap / 2
                pos[k] += overlap / 2
                moved = True
        if not moved:
            break
    out = [0.0] * len(ys)
    for k, i in enumerate(order):
        out[i] = pos[k]
    return out


def _dodge(points, width):
    """points: {mode: y} at one x. Multiplicative x offsets (2**dx) for modes whose y coincide."""
    modes = _modes(points)
    offsets = {m: 0.0 for m in modes}
    clusters = []
    for m in sorted(modes, key=lambda m: points[m]):
        if clusters and abs(math.log2(points[m] / points[clusters[-1][-1]])) < 0.06:
            clusters[-1].append(m)
        else:
            clusters.append([m])
    for c in clusters:
        c = _modes(c)
        for k, m in enumerate(c):
            offsets[m] = (k - (len(c) - 1) / 2) * width
    return offsets


def _mib_ticks(ax, lo, hi, axis="y"):
    """Log2 axis from lo to hi (MiB) with ticks at powers of two (and 1.5 x between when sparse)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = [2.0 ** k for k in range(math.floor(math.log2(lo)) - 1, math.ceil(math.log2(hi)) + 2)]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) < 4:
        ticks = sorted(ticks + [1.5 * t for t in ticks if lo <= 1.5 * t <= hi])

    def fmt(v, _):
        return f"{v:g}" if v >= 1 else f"{v:.2g}"

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(fmt))
    target.set_minor_locator(NullLocator())


def _label_lines(ax, labels, x, lo, hi, fontsize=8):
    """Direct labels: labels = [(y, text, colour)] for lines ending at x, written to the right
    of x and spread so that none overlap."""
    if not labels:
        return
    span = math.log2(hi / lo)
    ys = spread_labels([math.log2(y) for y, _, _ in labels], gap=span * 0.075)
    for (y, text, color), ly in zip(labels, ys):
        ax.annotate(text, xy=(x * 1.08, y), xytext=(x * 1.4, 2.0 ** ly), color=color, fontsize=fontsize,
                    va="center", ha="left", fontweight="bold",
                    arrowprops=dict(arrowstyle="-", color=color, lw=0.6, alpha=0.6,
                                    shrinkA=0, shrinkB=3))


def _budget_marks(ax, x, entries, budget, width, left=False):
    """entries: {mode: (status, peak)} of the budgeted runs at x; X at the budget for OOMs
    (side by side, centred on x, or all left of it where the line labels start right of x),
    a ring around the peak for runs that fit."""
    oom = [m for m, (st, _) in entries.items() if st == "OOM"]
    fit = {m: pk for m, (st, pk) in entries.items() if st == "ok" and pk}
    shift = -(len(oom) + 1) / 2 if left else 0.0
    offsets = {m: (k - (len(oom) - 1) / 2 + shift) * width for k, m in enumerate(_modes(oom))}
    for m in oom:
        _, color, _, _ = _style(m)
        ax.plot([x * 2 ** offsets[m]], [budget / MiB], marker="X", color=color, markersize=11,
                markeredgecolor="white", markeredgewidth=1.0, linestyle="none", zorder=6)
    if oom:
        # Below the crosses; right-aligned when they sit left of x, clear of a ring at x.
        at = max(offsets.values()) if left else 0.0  # the rightmost cross, or the centre
        ax.annotate("OOM", xy=(x * 2 ** at, budget / MiB),
                    xytext=(4 if left else 0, -9), textcoords="offset points", ha="right" if left else "center",
                    va="top", fontsize=7, color=_BUDGET, fontweight="bold")
    for m, pk in fit.items():
        _, color, _, _ = _style(m)
        ax.plot([x], [pk / MiB], marker="o", markersize=15, markerfacecolor="none", markeredgecolor=color,
                markeredgewidth=1.5, linestyle="none", zorder=6)


def _budget_line(ax, budget, x0, x1):
    """The budget as a dashed segment from x0 to x1; its label goes with the line labels."""
    ax.plot([x0, x1], [budget / MiB] * 2, color=_BUDGET, linestyle=(0, (4, 2)), lw=1.3, zorder=3)
    return (budget / MiB, f"budget {budget / MiB:g} MiB", _BUDGET)


def _panel(ax, xs_by_mode, ideal, lo, hi, xlo, xhi, dodge_width, extra_labels=()):
    """One panel: ideal band, a line per mode (dodged where points coincide), direct labels."""
    ax.plot(ideal[0], ideal[1], color=_IDEAL, lw=7, alpha=0.45, solid_capstyle="round", zorder=1)
    by_x = {}
    for mode, pts in xs_by_mode.items():
        for x, y in pts:
            by_x.setdefault(x, {})[mode] = y
    offsets = {x: _dodge(v, dodge_width) for x, v in by_x.items()}
    labels = [(ideal[1][-1], "ideal P/N", "#808080"), *extra_labels]
    for mode in _modes(xs_by_mode):
        pts = xs_by_mode[mode]
        name, color, marker, ls = _style(mode)
        xs = [x * 2 ** offsets[x][mode] for x, _ in pts]
        ys = [y for _, y in pts]
        ax.plot(xs, ys, color=color, marker=marker, linestyle=ls, lw=2, markersize=6, zorder=4)
        labels.append((ys[-1], f"{name} {ys[-1]:.0f}" if ys[-1] >= 10 else f"{name} {ys[-1]:.1f}", color))
    _label_lines(ax, labels, xhi, lo, hi)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_ylim(lo, hi)
    ax.set_xlim(xlo, xhi * 4.2)  # room on the right for the labels
    ax.grid(True, which="major", alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _ylim(values):
    return min(values) / 1.45, max(values) * 1.45


def plot_scaling(rows, out_dir, budget_bytes=None) -> list[str]:
    """Write scaling_vs_ranks.png and scaling_vs_size.png to out_dir; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report.summary import summarize

    summary = summarize(rows)
    measured, budgeted = _points(summary)
    sampled = sorted({s["mode"] for s in summary if s.get("build_peak_source") not in (None, "allocator peak")})
    note = (f"{', '.join(sampled)}: not an allocator's peak (live arrays sampled at each variable's placement; "
            "its devices share one process)." if sampled else None)
    keys = set(measured) | set(budgeted)
    families = sorted({k[0] for k in keys})
    if not families:
        return []
    paths = []

    # --- per-rank peak vs N, one panel per (family, size) -------------------------------
    sizes = {f: sorted({k[1] for k in keys if k[0] == f}) for f in families}
    ncols = max(len(v) for v in sizes.values())
    fig, axes = plt.subplots(len(families), ncols, figsize=(max(7.5, 4.6 * ncols), 3.9 * len(families)),
                             squeeze=False)
    for i, fam in enumerate(families):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(sizes[fam]):
                ax.set_visible(False)
                continue
            p = sizes[fam][j]
            ns = sorted({k[2] for k in keys if k[:2] == (fam, p)})
            lines = {}
            for mode in {k[3] for k in measured if k[:2] == (fam, p)}:
                lines[mode] = [(n, measured[(fam, p, n, mode)] / MiB) for n in ns if (fam, p, n, mode) in measured]
            here = {k: v for k, v in budgeted.items() if k[:2] == (fam, p)}
            values = [y for pts in lines.values() for _, y in pts] + [p / n / MiB for n in ns]
            values += [b / MiB for b, _, _ in here.values()]
            lo, hi = _ylim(values)
            extra = []
            if here:
                budget = next(iter(here.values()))[0]
                extra.append(_budget_line(ax, budget, ns[0] / 1.3, ns[-1] * 1.15))
                for n in ns:
                    _budget_marks(ax, n, {k[3]: (st, pk) for k, (_, st, pk) in here.items() if k[2] == n},
                                  budget, 0.16, left=n == ns[-1] and n != ns[0])
            _panel(ax, lines, (ns, [p / n / MiB for n in ns]), lo, hi, ns[0] / 1.3, ns[-1], 0.09, extra)
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            _mib_ticks(ax, lo, hi)
            ax.set_title(f"{fam}, P = {p / MiB:.0f} MiB" + (" (ran under the budget too)" if here else ""),
                         fontsize=10)
            ax.set_xlabel("ranks N")
            if j == 0:
                ax.set_ylabel("per-rank build peak (MiB)")
    paths.append(_save(fig, out_dir, "scaling_vs_ranks.png", budgeted,
                       "Per-rank build peak vs ranks: sharded follows P/N, stock Keras stays flat", note=note))

    # --- per-rank peak vs model size, one panel per (family, N) -------------------------
    ranks = {f: sorted({k[2] for k in keys if k[0] == f}) for f in families}
    ncols = max(len(v) for v in ranks.values())
    fig, axes = plt.subplots(len(families), ncols, figsize=(max(7.5, 4.6 * ncols), 3.9 * len(families)),
                             squeeze=False)
    for i, fam in enumerate(families):
        row_values = [v / MiB for k, v in measured.items() if k[0] == fam]
        row_values += [k[1] / k[2] / MiB for k in keys if k[0] == fam]
        row_values += [b / MiB for k, (b, _, _) in budgeted.items() if k[0] == fam]
        lo, hi = _ylim(row_values)  # one y range per family: panels compare across N
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(ranks[fam]):
                ax.set_visible(False)
                continue
            n = ranks[fam][j]
            ps = sorted({k[1] for k in keys if k[0] == fam and k[2] == n})
            xs = [p / MiB for p in ps]
            lines = {}
            for mode in {k[3] for k in measured if k[0] == fam and k[2] == n}:
                lines[mode] = [(p / MiB, measured[(fam, p, n, mode)] / MiB) for p in ps
                               if (fam, p, n, mode) in measured]
            here = {k: v for k, v in budgeted.items() if k[0] == fam and k[2] == n}
            extra = []
            if here:
                budget = next(iter(here.values()))[0]
                p_b = sorted({k[1] for k in here})[-1] / MiB
                extra.append(_budget_line(ax, budget, p_b / 2.2, p_b * 1.1))
                _budget_marks(ax, p_b, {k[3]: (st, pk) for k, (_, st, pk) in here.items()}, budget, 0.2,
                              left=p_b == xs[-1] and len(xs) > 1)
            _panel(ax, lines, (xs, [x / n for x in xs]), lo, hi, xs[0] / 1.5, xs[-1], 0.12, extra)
            ax.set_xticks(xs, [f"{x:.0f}" for x in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            _mib_ticks(ax, lo, hi)
            ax.set_title(f"{fam}, N = {n}", fontsize=10)
            ax.set_xlabel("model parameters P (MiB)")
            if j == 0:
                ax.set_ylabel("per-rank build peak (MiB)")
    paths.append(_save(fig, out_dir, "scaling_vs_size.png", budgeted,
                       "Per-rank build peak vs model size: the budget only applies at the largest size", note=note))
    return paths


def _save(fig, out_dir, name, budgeted, title, note=None) -> str:
    """Title on top and the key to the marks at the bottom, both wrapped to the figure's width."""
    import textwrap

    import matplotlib.pyplot as plt

    note = "Grey band: the ideal P/N." + (f"  {note}" if note else "")
    if budgeted:
        note += ("  Dashed line: the per-rank budget, drawn at the size that ran under it.  X on it: that "
                 "run ran out of memory there (OOM).  Ring: that run fit under the budget.")
    width_in, height_in = fig.get_size_inches()
    note = textwrap.fill(note, int(width_in * 16))  # characters of 8 pt text per line
    title = textwrap.fill(title, int(width_in * 10))  # of 12 pt text
    fig.text(0.01, 0.005, note, fontsize=8, color="#444444", ha="left", va="bottom")
    fig.suptitle(title, fontsize=12)
    bottom = (0.15 * (note.count("\n") + 1) + 0.05) / height_in
    top = 1 - (0.22 * (title.count("\n") + 1) + 0.1) / height_in
    fig.tight_layout(rect=(0, bottom, 1, top))
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- peers: build peak, step peak, step time against N ------------------------------------

_PEER_FIGURES = (("build_peak_bytes", "per-rank build peak (MiB)", "ideal P/N"),
                 ("step_peak_bytes", "per-rank step peak (MiB)", "ideal S/N"),
                 ("step_step_seconds", "train step time (s)", None))


def _peer_ideal(summary, fam, p, key, ns):
    """The rows' own ideal share per rank at each N (build: P/N; step: the model state S/N of the
    run's optimizer and precision), from sharded's scenarios (any mode's where sharded has none)."""
    phase = key.split("_", 1)[0]
    at = {}
    for s in summary:
        if s["family"] == fam and s["param_bytes"] == p and not s["budget_bytes"] and s.get(f"{phase}_ideal_bytes"):
            if s["mode"] == "sharded" or s["ranks"] not in at:
                at[s["ranks"]] = s[f"{phase}_ideal_bytes"] / MiB
    return [at[n] for n in ns] if all(n in at for n in ns) else None


def _peer_points(summary, fam, key):
    """{mode: [(N, y, measured)]} at the family's largest size with a sharded figure (or any)."""
    free = [s for s in summary if s["family"] == fam and not s["budget_bytes"] and s.get(key) is not None]
    sizes = sorted({s["param_bytes"] for s in free if s["mode"] == "sharded"}) or sorted({s["param_bytes"] for s in free})
    if not sizes:
        return None, {}
    p = sizes[-1]
    lines = {}
    phase = key.split("_", 1)[0]
    for s in sorted((s for s in free if s["param_bytes"] == p), key=lambda s: s["ranks"]):
        y = s[key] / MiB if key.endswith("bytes") else s[key]
        measured = key.endswith("seconds") or s.get(f"{phase}_peak_source") in (None, "allocator peak")
        lines.setdefault(s["mode"], []).append((s["ranks"], y, measured))
    return p, lines


def _peer_panel(ax, lines, ideal, ylabel, seconds):
    import matplotlib

    ns = sorted({n for pts in lines.values() for n, _, _ in pts})
    values = [y for pts in lines.values() for _, y, _ in pts] + (ideal[1] if ideal else [])
    lo, hi = _ylim(values)
    labels = []
    if ideal:
        ax.plot(ideal[0], ideal[1], color=_IDEAL, lw=7, alpha=0.45, solid_capstyle="round", zorder=1)
        labels.append((ideal[1][-1], ideal[2], "#808080"))
    offsets = {n: _dodge({m: y for m, pts in lines.items() for k, y, _ in pts if k == n}, 0.09) for n in ns}
    for mode in _modes(lines):
        name, color, marker, ls = _style(mode)
        pts = lines[mode]
        xs = [n * 2 ** offsets[n][mode] for n, _, _ in pts]
        ys = [y for _, y, _ in pts]
        ax.plot(xs, ys, color=color, linestyle=ls, lw=2, zorder=4)
        for x, (_, y, measured) in zip(xs, pts):
            ax.plot([x], [y], marker=marker, markersize=7, color=color, zorder=5, linestyle="none",
                    markerfacecolor=color if measured else "white", markeredgewidth=1.5)
        last = f"{ys[-1]:.2f} s" if seconds else (f"{ys[-1]:.0f}" if ys[-1] >= 10 else f"{ys[-1]:.1f}")
        labels.append((ys[-1], f"{name} {last}", color))
    _label_lines(ax, labels, ns[-1], lo, hi)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_ylim(lo, hi)
    ax.set_xlim(ns[0] / 1.3, ns[-1] * 4.2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if seconds:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        _mib_ticks(ax, lo, hi)
    ax.grid(True, which="major", alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("ranks N (keras-jax: devices)")
    ax.set_ylabel(ylabel)


def plot_peers(rows, out_dir) -> list[str]:
    """Write peers_vs_ranks.png to out_dir (one row of build peak, step peak, step time per
    family, at its largest size); its path, or none when no panel has two modes to compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report.summary import summarize

    summary = summarize(rows)
    families = sorted({s["family"] for s in summary})
    panels = {(f, key): _peer_points(summary, f, key) for f in families for key, *_ in _PEER_FIGURES}
    families = [f for f in families if any(len(panels[(f, k)][1]) > 1 for k, *_ in _PEER_FIGURES)]
    if not families:
        return []
    fig, axes = plt.subplots(len(families), 3, figsize=(17, 4.3 * len(families)), squeeze=False)
    for i, fam in enumerate(families):
        for j, (key, ylabel, ideal_name) in enumerate(_PEER_FIGURES):
            ax = axes[i][j]
            p, lines = panels[(fam, key)]
            if not lines:
                ax.set_visible(False)
                continue
            ns = sorted({n for pts in lines.values() for n, _, _ in pts})
            values = _peer_ideal(summary, fam, p, key, ns) if ideal_name else None
            ideal = (ns, values, ideal_name) if values else None
            _peer_panel(ax, lines, ideal, ylabel, key.endswith("seconds"))
            ax.set_title(f"{fam}, P = {p / MiB:.0f} MiB: {ylabel.split(' (')[0]}", fontsize=10)
    note = ("In the step-peak panels it is the model state S/N (weights + gradients + optimizer slots).  "
            "Filled marker: measured (allocator peak; step time as timed). Hollow marker: not an allocator's "
            "peak (keras-jax on CPU: build = live JAX arrays sampled at each variable's placement; step = XLA's "
            "memory analysis of the compiled step less the variables). keras-jax's N devices share one process.")
    return [_save(fig, out_dir, "peers_vs_ranks.png", {}, "shardimpl and its peers against N, at the largest "
                  "size: build peak, step peak, step time", note=note)]
