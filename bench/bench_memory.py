"""asv suites: per-rank peak memory of model builds, and distribute/gather times.

Per-rank figures come from the launched ranks (their PeakMeter), never from the
asv process's own RSS, hence `track_*` with ``unit = "bytes"`` rather than
asv's ``peakmem_``.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

FAMILIES = ["mlp", "transformer"]
SIZES_MIB = [16, 64]
RANKS = [1, 2, 4]
MiB = 1 << 20


def _worst(rows, phase):
    peaks = [r["peak_bytes"] for r in rows if r["phase"] == phase and r["peak_bytes"] is not None]
    if len(peaks) != len([r for r in rows if r["phase"] == phase]):
        return float("nan")  # a rank OOMed or failed: asv records it as a failed point
    return max(peaks)


class ModelBuildMemory:
    """Per-rank build and train-step peaks for each family x size x N, both modes."""

    params = (FAMILIES, SIZES_MIB, RANKS)
    param_names = ["family", "size_mib", "ranks"]
    timeout = 900

    def setup_cache(self):
        from bench.scenarios import Scenario, rows_for, run_scenario

        cache = {}
        for family in FAMILIES:
            for size in SIZES_MIB:
                for n in RANKS:
                    for mode in ("sharded", "unsharded"):
                        s = Scenario(family, size * MiB, n, mode)
                        rows = rows_for(s, run_scenario(s, timeout=300))
                        cache[(family, size, n, mode)] = {
                            "build": _worst(rows, "build"), "step": _worst(rows, "step"),
                            "ideal": rows[0]["ideal_bytes"],
                        }
        return cache

    def track_sharded_build_peak(self, cache, family, size_mib, ranks):
        return cache[(family, size_mib, ranks, "sharded")]["build"]

    track_sharded_build_peak.unit = "bytes"

    def track_unsharded_build_peak(self, cache, family, size_mib, ranks):
        return cache[(family, size_mib, ranks, "unsharded")]["build"]

    track_unsharded_build_peak.unit = "bytes"

    def track_sharded_step_peak(self, cache, family, size_mib, ranks):
        return cache[(family, size_mib, ranks, "sharded")]["step"]

    track_sharded_step_peak.unit = "bytes"

    def track_sharded_build_ratio_to_ideal(self, cache, family, size_mib, ranks):
        entry = cache[(family, size_mib, ranks, "sharded")]
        return entry["build"] / entry["ideal"]

    track_sharded_build_ratio_to_ideal.unit = "ratio"


class DistributeGather:
    """Wall time of a sharded GlorotUniform kernel's creation and of its gather to rank 0.

    The ranks live in a `launch.World` started in setup, so the timed call is
    the ranks' work plus a queue round trip, not process start-up.
    """

    params = ([16, 64], RANKS)
    param_names = ["size_mib", "ranks"]
    timeout = 300
    number = 1
    repeat = (1, 5, 30.0)

    def setup(self, size_mib, ranks):
        from bench import ops
        from shardimpl import launch

        self.world = launch.World(ranks, timeout=120).start()
        rows = self.world.run(ops.distribute_once, size_mib)  # warm-up, and the variable to gather
        if any(r.status != "ok" for r in rows):
            raise NotImplementedError(f"ranks failed: {[r.error for r in rows if r.error]}")

    def teardown(self, size_mib, ranks):
        self.world.close()

    def time_distribute(self, size_mib, ranks):
        from bench import ops

        self.world.run(ops.distribute_once, size_mib)

    def time_gather_to_rank0(self, size_mib, ranks):
        from bench import ops

        self.world.run(ops.gather_once, size_mib)

    def track_distribute_peak(self, size_mib, ranks):
        from bench import ops

        return max(r.value["peak_bytes"] for r in self.world.run(ops.distribute_once, size_mib))

    track_distribute_peak.unit = "bytes"
