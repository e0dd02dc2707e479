"""One rank of a two-"node" torchrun world on one machine (--nnodes=2 --nproc-per-node=1).

Run as ``_two_nodes_script.py SHARED LOCAL OUT``: SHARED is a folder both nodes see, LOCAL a
path that each node resolves to its own folder (a separate mount namespace per node, or a
relative path with a working directory per node), OUT a shared folder for the results
(OUT/rank{R}.json).

1. ``keras.distribution.initialize()`` before ``shardimpl.install()``, then a ModelParallel model.
2. save_sharded to SHARED works; to LOCAL (node-local disks) it fails on every rank, naming a
   shared filesystem, and LOCAL keeps the previous checkpoint on both nodes, no partial left.
3. ``launch.run`` with ``fn`` raising on rank 1 while rank 0 waits in an all-reduce: both
   ranks return within seconds, with rank 1's message.
4. The next ``launch.run`` joins a fresh process group and works.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")


def fail_on_rank_1():
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(0.5)  # rank 0 is inside the all-reduce by then
        raise ValueError("rank 1 broke on purpose (the caller must read this)")
    t = torch.ones(8)
    dist.all_reduce(t)
    return float(t.sum())


def rank_sum():
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return float(t.item())


def _model():
    import keras

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[".*kernel"] = (None, "model")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss="mse")
    import numpy as np

    model.train_on_batch(np.ones((8, 8), "float32"), np.zeros((8, 4), "float32"))
    return model


def _versions(folder):
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if n.startswith(".")]


def checkpoints(model, shared, local, rank, local_rank):
    import torch.distributed as dist

    import shardimpl

    out = {}
    good = os.path.join(shared, "ckpt")
    shardimpl.save_sharded(model, good)
    out["shared_saved"] = sorted(os.listdir(os.path.realpath(good)))
    os.makedirs(local, exist_ok=True)
    if local_rank == 0:  # each node gets a copy of that checkpoint: the previous one at LOCAL
        version = os.path.realpath(good)
        shutil.copytree(version, os.path.join(local, os.path.basename(version)))
        os.symlink(os.path.basename(version), os.path.join(local, "ckpt"))
    dist.barrier()
    previous = os.path.realpath(os.path.join(local, "ckpt"))
    model.set_weights([w + 1.0 for w in model.get_weights()])
    try:
        shardimpl.save_sharded(model, os.path.join(local, "ckpt"))
        out["local_error"] = None
    except Exception as exc:
        out["local_error"] = f"{type(exc).__name__}: {exc}"
    out["local_kept_previous"] = os.path.realpath(os.path.join(local, "ckpt")) == previous
    out["local_names_after"] = _versions(local)
    return out


def main(shared, local, results):
    import keras
    import torch.distributed as dist

    import shardimpl
    from shardimpl import launch

    keras.distribution.initialize()  # before install: the order a torchrun script takes
    shardimpl.install()
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    out = {"rank": rank, "group_rank": int(os.environ["GROUP_RANK"]), "world": dist.get_world_size()}
    model = _model()
    out.update(checkpoints(model, shared, local, rank, local_rank))
    begin = time.monotonic()
    rows = launch.run(fail_on_rank_1, dist.get_world_size(), timeout=120)
    out["failed_seconds"] = time.monotonic() - begin
    out["failed_rows"] = [r.as_dict() for r in rows]
    out["group_after_failure"] = dist.is_initialized()
    again = launch.run(rank_sum, 2, timeout=120)
    out["again_rows"] = [r.as_dict() for r in again]
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the first world's gloo objects outlive their destroyed group: skip their exit abort


if __name__ == "__main__":
    main(*sys.argv[1:4])
