"""Gate memory between two pytest-benchmark JSON files (compare-fail only sees times).

`python -m bench compare-memory BASELINE.json CURRENT.json --factor 1.10` fails
(exit 1) when a benchmark's ``extra_info.max_peak_bytes`` grew by more than
``factor`` over the baseline, or when a baseline benchmark is missing.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["peaks_by_name", "compare_peaks", "main"]


def peaks_by_name(path) -> dict[str, int]:
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data.get("benchmarks", []):
        peak = (b.get("extra_info") or {}).get("max_peak_bytes")
        if peak is not None:
            out[b.get("fullname") or b["name"]] = int(peak)
    return out


def compare_peaks(baseline: dict, current: dict, factor: float) -> list[str]:
    """Violations: each benchmark whose peak exceeds factor x its baseline, or that vanished."""
    problems = []
    for name, base in sorted(baseline.items()):
        if name not in current:
            problems.append(f"{name}: in the baseline but not in the current run")
        elif current[name] > factor * base:
            problems.append(f"{name}: peak {current[name]} bytes > {factor} x baseline {base} bytes "
                            f"({current[name] / base:.3f}x)")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compare-memory", description=__doc__)
    p.add_argument("baseline")
    p.add_argument("current")
    p.add_argument("--factor", type=float, default=1.10)
    args = p.parse_args(argv)
    base, cur = peaks_by_name(args.baseline), peaks_by_name(args.current)
    if not base:
        print(f"{args.baseline}: no benchmark with extra_info.max_peak_bytes")
        return 1
    problems = compare_peaks(base, cur, args.factor)
    for line in problems:
        print("MEMORY REGRESSION:", line)
    print(f"compared {len(base)} benchmarks: " + ("ok" if not problems else f"{len(problems)} regressed"))
    return 1 if problems else 0
