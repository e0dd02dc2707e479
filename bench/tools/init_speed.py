"""Per-rank cost of shard-local initialization, before and after the counter-based generator.

For rank 0 of an N-rank world, a row- (``Shard(0)``) or column-sharded (``Shard(1)``)
4096 x 4096 float32 kernel is drawn with `fill_local_shard` at rank 0's offsets and
sizes: exactly the per-rank work of `distribute_variable` (which adds no collective).
Three implementations are timed on the same shard, interleaved repeat by repeat:

* ``before``: `shardimpl/initializers.py` at git revision ``--before`` (default
  ``16a650c``, the fixed tile grid), loaded into a temporary module;
* ``after``: the working tree's `shardimpl.initializers`;
* ``uniform_``: a bare ``torch.empty(shard).uniform_()``, the floor a draw is compared with.

Run from the repository root (about a minute on 2 cores)::

    PYTHONPATH=. KERAS_BACKEND=torch python -m bench init-speed
    PYTHONPATH=. KERAS_BACKEND=torch python -m bench init-speed --ranks 1,16,256,1024 \\
        --repeats 9 --threads 1 --json bench-results/init.json

It prints a Markdown table (min and median ms over the repeats, after / uniform_ and
before / after from the same run) and optionally writes it as JSON with versions
and hardware. ``--threads`` defaults to 1: a rank of a multi-rank world on a small
host gets one intra-op thread (`shardimpl.launch` sets cpu_count // N).

asv runs `bench/suites/bench_init.py::ShardLocalInit` (the ``after`` column only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

SHAPE = (4096, 4096)
RANKS = [1, 16, 256, 1024]
LAYOUTS = {"row": 0, "col": 1}
INITIALIZERS = ["GlorotUniform", "TruncatedNormal"]
BEFORE_REV = "16a650c"


def rank0_bounds(n: int, dim: int, shape=SHAPE):
    """Offsets and sizes of rank 0's shard when ``dim`` is split over ``n`` ranks."""
    from torch.distributed.tensor import Shard

    from shardimpl.layout import local_shard_bounds

    return local_shard_bounds(shape, (n,), (Shard(dim),), (0,))


def load_module_at(rev: str, path: str = "shardimpl/initializers.py", name: str = "_initializers_before"):
    """``path`` as it was at git revision ``rev``, imported as a fresh module."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = subprocess.run(["git", "-C", root, "show", f"{rev}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    tmp = tempfile.NamedTemporaryFile("w", suffix=".py", prefix=name, delete=False)
    with tmp:
        tmp.write(source)
    spec = importlib.util.spec_from_file_location(name, tmp.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        os.unlink(tmp.name)
    return module


def initializer_by_name(name: str):
    from keras import initializers

    return getattr(initializers, name)(seed=1)


def make_cases(ranks, impls: dict):
    """[(case key, impl name, thunk)]: each thunk draws rank 0's shard once."""
    import torch

    cases = []
    for n in ranks:
        for layout, dim in LAYOUTS.items():
            offsets, sizes = rank0_bounds(n, dim)
            for init_name in INITIALIZERS:
                key = (init_name, layout, n)
                for impl_name, module in impls.items():
                    spec = module.spec_frominitializer_by_name(initializer_by_name(init_name), SHAPE)
                    cases.append((key, impl_name, _thunk(module, spec, offsets, sizes)))
                limit = 1.0

                def bare(sizes=sizes):
                    return torch.empty(sizes).uniform_(-limit, limit)

                cases.append((key, "uniform_", bare))
    return cases


def _thunk(module, spec, offsets, sizes):
    import torch

    def draw():
        return module.fill_local_shard(spec, SHAPE, offsets, sizes, dtype=torch.float32, device="cpu")

    return draw


def run(ranks=RANKS, repeats=9, before=BEFORE_REV) -> dict:
    """Time every case ``repeats`` times, interleaved; {key: {impl: [seconds]}}."""
    import shardimpl.initializers as after

    impls = {}
    if before:
        impls["before"] = load_module_at(before)
    impls["after"] = after
    cases = make_cases(ranks, impls)
    times: dict = {}
    for _, _, thunk in cases:  # warm-up: first-touch pages, lazy imports
        thunk()
    for rep in range(repeats):
        # Rotate the order each repeat so no implementation always follows another.
        shift = rep % len(cases)
        for key, impl, thunk in cases[shift:] + cases[:shift]:
            start = time.perf_counter()
            out = thunk()
            elapsed = time.perf_counter() - start
            del out
            times.setdefault(key, {}).setdefault(impl, []).append(elapsed)
    return times


def summarize(times: dict) -> list[dict]:
    rows = []
    for (init_name, layout, n), by_impl in times.items():
        row = {"initializer": init_name, "layout": layout, "ranks": n}
        for impl, ts in by_impl.items():
            row[f"{impl}_min_ms"] = 1e3 * min(ts)
            row[f"{impl}_median_ms"] = 1e3 * statistics.median(ts)
        row["after_over_uniform_"] = row["after_median_ms"] / row["uniform__median_ms"]
        if "before_median_ms" in row:
            row["before_over_after"] = row["before_median_ms"] / row["after_median_ms"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    has_before = "before_min_ms" in rows[0]
    head = ["initializer", "layout", "N"]
    head += ["before min / med ms"] if has_before else []
    head += ["after min / med ms", "uniform_ min / med ms", "after / uniform_"]
    head += ["before / after"] if has_before else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["initializer"], r["layout"], str(r["ranks"])]
        if has_before:
            cells.append(f"{r['before_min_ms']:.3f} / {r['before_median_ms']:.3f}")
        cells.append(f"{r['after_min_ms']:.3f} / {r['after_median_ms']:.3f}")
        cells.append(f"{r['uniform__min_ms']:.3f} / {r['uniform__median_ms']:.3f}")
        cells.append(f"{r['after_over_uniform_']:.2f}")
        if has_before:
            cells.append(f"{r['before_over_after']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench init-speed", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=BEFORE_REV, help="git revision of the baseline ('' to skip)")
    parser.add_argument("--json", default=None, help="write the rows and metadata here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = [int(x) for x in args.ranks.split(",")]
    rows = summarize(run(ranks, args.repeats, args.before))
    meta = {
        "shape": SHAPE, "dtype": "float32", "repeats": args.repeats, "threads": args.threads,
        "before": args.before, "torch": torch.__version__, "python": sys.version.split()[0],
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print(f"rank 0's shard of a {SHAPE[0]}x{SHAPE[1]} float32 kernel; {args.repeats} interleaved repeats, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(markdown(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
