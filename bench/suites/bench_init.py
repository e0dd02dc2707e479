"""asv suite: rank 0's share of shard-local initialization (`bench.tools.init_speed` has the CLI).

A row- or column-sharded 4096 x 4096 float32 kernel, drawn with `fill_local_shard` at rank 0's
offsets and sizes for an N-rank world: exactly the per-rank work of `distribute_variable`.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from bench.tools.init_speed import INITIALIZERS, LAYOUTS, RANKS, SHAPE, initializer_by_name, rank0_bounds  # noqa: E402


class ShardLocalInit:
    """asv: rank 0's shard of a 4096 x 4096 kernel, row or column sharded, N ranks."""

    params = (INITIALIZERS, list(LAYOUTS), RANKS)
    param_names = ["initializer", "layout", "ranks"]
    timeout = 120

    def setup(self, initializer, layout, ranks):
        import torch

        from shardimpl import initializers

        torch.set_num_threads(1)
        self.offsets, self.sizes = rank0_bounds(ranks, LAYOUTS[layout])
        self.spec = initializers.spec_frominitializer_by_name(initializer_by_name(initializer), SHAPE)

    def time_fill_local_shard(self, initializer, layout, ranks):
        import torch

        from shardimpl.initializers import fill_local_shard

        fill_local_shard(self.spec, SHAPE, self.offsets, self.sizes, dtype=torch.float32, device="cpu")
