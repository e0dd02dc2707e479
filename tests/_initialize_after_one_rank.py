"""Item 6 of issue #13, one process of two: a one-rank mesh first, then a real 2-process world.

Run as ``python _initialize_after_one_rank.py RANK PORT_A PORT_B``. Prints one JSON line.
1. A one-device mesh is converted with no process group: it must not create one.
2. ``keras.distribution.initialize`` for 2 processes must give a world of 2 (not 1),
   and a variable sharded on it must gather exactly.
3. After tearing that world down, the same with ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")


def one_rank_variable():
    import keras
    import torch

    import shardimpl

    mesh = keras.distribution.DeviceMesh((1,), ["model"], ["cpu:0"])
    layout = keras.distribution.TensorLayout((None, "model"), mesh)
    v = shardimpl.distribute_variable(torch.ones(2, 4), layout, name="w1")
    return bool(torch.equal(shardimpl.gather_variable(v), torch.ones(2, 4)))


def two_rank_variable():
    import keras
    import torch
    import torch.distributed as dist

    import shardimpl

    n = dist.get_world_size()
    mesh = keras.distribution.DeviceMesh((n,), ["model"], [f"cpu:{i}" for i in range(n)])
    layout = keras.distribution.TensorLayout((None, "model"), mesh)
    full = torch.arange(8.0).reshape(2, 4)
    v = shardimpl.distribute_variable(full, layout, name="w2")
    return tuple(v.to_local().shape), bool(torch.equal(shardimpl.gather_variable(v), full))


def main():
    rank, port_a, port_b = (int(a) for a in sys.argv[1:4])
    import keras
    import torch.distributed as dist

    import shardimpl

    out = {}
    shardimpl.install()
    out["one_rank_ok"] = one_rank_variable()
    out["group_after_one_rank_mesh"] = dist.is_initialized()
    keras.distribution.initialize(f"127.0.0.1:{port_a}", num_processes=2, process_id=rank)
    out["world_after_initialize"] = dist.get_world_size()
    out["sharded_after_initialize"] = two_rank_variable()
    dist.destroy_process_group()
    out["one_rank_again_ok"] = one_rank_variable()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port_b}", rank=rank, world_size=2)
    out["world_after_init_process_group"] = dist.get_world_size()
    out["sharded_after_init_process_group"] = two_rank_variable()
    dist.destroy_process_group()
    out["group_at_exit"] = dist.is_initialized()
    shardimpl.uninstall()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
