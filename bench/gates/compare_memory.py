"""Gate memory between two pytest-benchmark JSON files (compare-fail only sees times).

`python -m bench compare-memory BASELINE.json CURRENT.json` exits 1 when, for a
benchmark of the baseline,

* its torch-allocator peak (``extra_info.max_peak_bytes``: exact to the byte,
  the same in every run of unchanged code) grew by more than ``--factor``
  (default 1.10) over the baseline;
* its host peak (``extra_info.max_host_peak_bytes``: the whole process, torch
  or not; page-granular and within about 1 MiB from run to run) grew by more
  than ``--factor`` plus ``--host-slack-mib`` (default: the gate's host
  allowance, 3 MiB, see `bench.gates.memory`);
* it is missing from the current run.

A baseline without host figures (made before they existed) is compared on the
torch figure only.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["peaks_by_name", "compare_peaks", "main"]

MiB = 1 << 20


def peaks_by_name(path, key: str = "max_peak_bytes") -> dict[str, int]:
    """{benchmark full name: extra_info[key]} for every benchmark of the file that has it."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data.get("benchmarks", []):
        peak = (b.get("extra_info") or {}).get(key)
        if peak is not None:
            out[b.get("fullname") or b["name"]] = int(peak)
    return out


def compare_peaks(baseline: dict, current: dict, factor: float, *, slack_bytes: int = 0,
                  what: str = "peak") -> list[str]:
    """Violations: each benchmark whose peak exceeds factor x its baseline + slack, or that vanished."""
    problems = []
    for name, base in sorted(baseline.items()):
        if name not in current:
            problems.append(f"{name}: in the baseline but not in the current run")
        elif current[name] > factor * base + slack_bytes:
            bound = f"{factor} x baseline {base} bytes" + (f" + {slack_bytes} bytes" if slack_bytes else "")
            problems.append(f"{name}: {what} {current[name]} bytes > {bound} "
                            f"({current[name] / max(base, 1):.3f}x)")
    return problems


def main(argv=None) -> int:
    from bench.gates.memory import HOST_ALLOWANCE_BYTES

    p = argparse.ArgumentParser(prog="python -m bench compare-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline")
    p.add_argument("current")
    p.add_argument("--factor", type=float, default=1.10)
    p.add_argument("--host-slack-mib", type=float, default=HOST_ALLOWANCE_BYTES / MiB,
                   help="absolute allowance on the host figure (default: %(default)s)")
    args = p.parse_args(argv)
    base, cur = peaks_by_name(args.baseline), peaks_by_name(args.current)
    if not base:
        print(f"{args.baseline}: no benchmark with extra_info.max_peak_bytes")
        return 1
    problems = compare_peaks(base, cur, args.factor, what="torch-allocator peak")
    base_host = peaks_by_name(args.baseline, "max_host_peak_bytes")
    cur_host = peaks_by_name(args.current, "max_host_peak_bytes")
    slack = int(args.host_slack_mib * MiB)
    present = {name: base_host[name] for name in base_host if name in cur}  # missing: said once
    problems += compare_peaks(present, cur_host, args.factor, slack_bytes=slack, what="host peak")
    for line in problems:
        print("MEMORY REGRESSION:", line)
    checked = "torch-allocator and host peaks" if base_host else "torch-allocator peaks (no host figures in the baseline)"
    print(f"compared {len(base)} benchmarks ({checked}): "
          + ("ok" if not problems else f"{len(problems)} regressed"))
    return 1 if problems else 0
