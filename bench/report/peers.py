"""shardimpl beside its peers: the ratios, the targets and one verdict line per family.

Reads the summary (`bench.report.summary.summarize`) of a run that holds peer rows (modes in
`PEER_MODES`) and says, per family, at the largest model size:

* shardimpl's (mode ``sharded``) ratio to each peer at the largest N both have figures for:
  build peak, step peak and step time, e.g. "build peak 1.00 x keras-jax, 0.27 x keras-native";
* step-time scaling, each against its own N = 1: sharded over stock Keras (torch) at N = 1,
  a peer over itself at N = 1;
* the two targets (reported, not gates): shardimpl's per-rank build peak <= 1.05 x the best
  peer's at every N, and its step-time scaling within 1.2 x keras-jax's;
* what makes a peer's figures differ in kind: keras-jax's N devices share one process, and its
  figures are sampled live arrays (build) and XLA's plan (step), not an allocator's peak;
  keras-native on another map where it could not run the family's; a peer's own ``peer_note``
  (fsdp2: another parallelism); peers that failed, and where.
"""

from __future__ import annotations

__all__ = ["PEER_MODES", "PEER_NAMES", "BUILD_TARGET", "SCALING_TARGET", "compare", "peer_verdicts"]

PEER_MODES = ("keras-jax", "keras-native", "fsdp2")  # the order the verdict names them in
PEER_NAMES = {"keras-native": "keras-native", "keras-jax": "keras-jax", "fsdp2": "fsdp2"}
BUILD_TARGET = 1.05  # shardimpl's build peak over the best peer's, at every N
SCALING_TARGET = 1.2  # shardimpl's step-time scaling over keras-jax's

_MiB = float(1 << 20)


def _ok(s) -> bool:
    return s is not None and s["status"] == "ok"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _scaling(at, mode, base_mode, n):
    """Step time at N over ``base_mode``'s at N = 1, or None."""
    s, b = at.get((mode, n)), at.get((base_mode, 1))
    if not (_ok(s) and _ok(b)):
        return None
    return _ratio(s.get("step_step_seconds"), b.get("step_step_seconds"))


def compare(summary) -> dict:
    """Per family with peer rows: {"p", "n", "ratios": {peer: {build, step, time}}, "scaling":
    {mode: {N: x}}, "targets": {...}, "failed": {peer: {status: [N]}}, "notes": [...]}."""
    out = {}
    for fam in sorted({s["family"] for s in summary}):
        free = [s for s in summary if s["family"] == fam and not s["budget_bytes"]]
        peers = [m for m in PEER_MODES if any(s["mode"] == m for s in free)]
        if not peers:
            continue
        sizes = sorted({s["param_bytes"] for s in free if s["mode"] == "sharded" and _ok(s)})
        if not sizes:
            out[fam] = {"p": None, "peers": peers, "failed": _failures(free, peers), "notes": _notes(free, peers)}
            continue
        p = sizes[-1]
        at = {(s["mode"], s["ranks"]): s for s in free if s["param_bytes"] == p}
        out[fam] = {"p": p, "peers": peers, "ratios": _ratios(at, peers), "scaling": _scalings(at, peers),
                    "targets": _targets(at, peers), "failed": _failures(
                        [s for s in free if s["param_bytes"] == p], peers), "notes": _notes(free, peers)}
    return out


def _ratios(at, peers) -> dict:
    """{peer: {"n", "build", "step", "time"}} at the largest N where both have figures."""
    out = {}
    for peer in peers:
        ns = sorted(n for (m, n) in at if m == peer and _ok(at[(m, n)]) and _ok(at.get(("sharded", n))))
        if not ns:
            continue
        n = ns[-1]
        sh, pe = at[("sharded", n)], at[(peer, n)]
        out[peer] = {"n": n, "build": _ratio(sh["build_peak_bytes"], pe["build_peak_bytes"]),
                     "step": _ratio(sh["step_peak_bytes"], pe["step_peak_bytes"]),
                     "time": _ratio(sh.get("step_step_seconds"), pe.get("step_step_seconds"))}
    return out


def _scalings(at, peers) -> dict:
    """{mode: {N: step time at N over its own at N = 1}} for sharded (over stock Keras) and peers."""
    ns = sorted({n for (_, n) in at if n > 1})
    out = {}
    for mode, base in [("sharded", "unsharded")] + [(p, p) for p in peers]:
        values = {n: _scaling(at, mode, base, n) for n in ns}
        values = {n: v for n, v in values.items() if v is not None}
        if values:
            out[mode] = values
    return out


def _targets(at, peers) -> dict:
    """{"build": {N: (ratio to the best peer, best peer)}, "scaling": {N: (sharded, keras-jax)}}."""
    build = {}
    for n in sorted({n for (m, n) in at if m == "sharded" and _ok(at[(m, n)])}):
        best = [(at[(p, n)]["build_peak_bytes"], p) for p in peers if _ok(at.get((p, n)))
                and at[(p, n)]["build_peak_bytes"]]
        if best:
            peak, peer = min(best)
            build[n] = (at[("sharded", n)]["build_peak_bytes"] / peak, peer)
    scaling = {}
    sh, jx = _scalings(at, peers).get("sharded", {}), _scalings(at, peers).get("keras-jax", {})
    for n in sorted(set(sh) & set(jx)):
        scaling[n] = (sh[n], jx[n])
    return {"build": build, "scaling": scaling}


def _failures(summaries, peers) -> dict:
    """{peer: {status: sorted N}} for the peer scenarios that did not finish."""
    out = {}
    for s in summaries:
        if s["mode"] in peers and s["status"] not in ("ok", "OOM"):
            out.setdefault(s["mode"], {}).setdefault(s["status"], set()).add(s["ranks"])
    return {p: {st: sorted(ns) for st, ns in v.items()} for p, v in out.items()}


def _notes(free, peers) -> list[str]:
    """What differs in kind: another map, figures that are not an allocator's peak, one process."""
    notes = []
    for peer in peers:
        rows = [s for s in free if s["mode"] == peer]
        if any(s.get("layouts") == "width-split" for s in rows):
            err = next((s.get("family_map_error") for s in rows if s.get("family_map_error")), None)
            notes.append(f"{PEER_NAMES[peer]} ran the previous width-split map"
                         + (f" (on the family's map: {err})" if err else ""))
        said = sorted({s["peer_note"] for s in rows if s.get("peer_note")})
        notes += [f"{PEER_NAMES[peer]}: {note}" for note in said]
        sources = {s.get(f"{ph}_peak_source") for s in rows for ph in ("build", "step")} - {None}
        if peer == "keras-jax" or sources:
            what = []
            builds = {s.get("build_peak_source") for s in rows} - {None}
            steps = {s.get("step_peak_source") for s in rows} - {None}
            if builds:
                what.append("build = " + " / ".join(sorted(builds)))
            if steps:
                what.append("step = " + " / ".join(sorted(steps)))
            one = any(s.get("devices_per_process", 1) > 1 for s in rows)
            text = f"{PEER_NAMES[peer]}: " + ", ".join(what) if what else PEER_NAMES[peer]
            if one:
                text += "; its N devices share one process, which flatters its step time"
            notes.append(text)
    return notes


def _x(v) -> str:
    return f"{v:.2f}" if v is not None else "-"


def _ns(ns) -> str:
    return ", ".join(str(n) for n in ns)


def peer_verdicts(summary) -> dict[str, str]:
    """{"<family> vs peers": one sentence} for each family with peer rows."""
    out = {}
    for fam, c in compare(summary).items():
        clauses = []
        ratios = c.get("ratios") or {}
        for kind, label in (("build", "build peak"), ("step", "step peak"), ("time", "step time")):
            parts = [f"{_x(r[kind])} x {PEER_NAMES[p]}" + (f" (N = {r['n']})" if r["n"] != _top(ratios) else "")
                     for p, r in ratios.items() if r[kind] is not None]
            if parts:
                clauses.append(f"{label} " + ", ".join(parts))
        if clauses:
            p_mib = c["p"] / _MiB
            clauses[0] = f"sharded at N = {_top(ratios)} (P = {p_mib:.0f} MiB): " + clauses[0]
        scaling = c.get("scaling") or {}
        if scaling:
            n = max(n for v in scaling.values() for n in v)
            parts = [f"{'sharded (over stock Keras)' if m == 'sharded' else PEER_NAMES[m]} {v[n]:.2f}x"
                     for m, v in scaling.items() if n in v]
            clauses.append(f"step time at N = {n} over its own at N = 1: " + ", ".join(parts))
        clauses += _target_clauses(c.get("targets") or {})
        for peer, statuses in (c.get("failed") or {}).items():
            clauses.append(f"{PEER_NAMES[peer]} failed: " + ", ".join(
                f"{st} at N = {_ns(ns)}" for st, ns in sorted(statuses.items())) + " (see the table)")
        clauses += c.get("notes") or []
        out[f"{fam} vs peers"] = "; ".join(clauses) if clauses else "no peer scenario finished"
    return out


def _top(ratios):
    return max((r["n"] for r in ratios.values()), default=None)


def _target_clauses(targets) -> list[str]:
    out = []
    build = targets.get("build") or {}
    if build:
        missed = {n: v for n, v in build.items() if v[0] > BUILD_TARGET}
        worst = max(build.items(), key=lambda kv: kv[1][0])
        if missed:
            out.append(f"target build peak <= {BUILD_TARGET:.2f} x the best peer: missed at N = {_ns(missed)} ("
                       + ", ".join(f"{v[0]:.2f} x {PEER_NAMES[v[1]]}" for v in missed.values()) + ")")
        else:
            out.append(f"target build peak <= {BUILD_TARGET:.2f} x the best peer: met at N = {_ns(build)} "
                       f"(at most {worst[1][0]:.2f} x)")
    scaling = targets.get("scaling") or {}
    if scaling:
        missed = {n: v for n, v in scaling.items() if v[0] > SCALING_TARGET * v[1]}
        if missed:
            out.append(f"target step-time scaling within {SCALING_TARGET:g} x keras-jax's: missed at N = "
                       f"{_ns(missed)} (" + ", ".join(f"{a:.2f}x vs {b:.2f}x" for a, b in missed.values()) + ")")
        else:
            out.append(f"target step-time scaling within {SCALING_TARGET:g} x keras-jax's: met at N = {_ns(scaling)}")
    return out
