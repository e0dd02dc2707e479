"""Rank-side checks of the core with Keras not importable (run by test_package_structure)."""

from __future__ import annotations

import os
import tempfile


def core_without_keras(folder):
    import numpy as np
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    import shardimpl

    out = {}
    try:
        import keras  # noqa: F401

        out["keras_importable"] = True
    except ImportError:
        out["keras_importable"] = False
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    rows = shardimpl.TorchLayout(mesh, (Shard(0),))
    full = np.arange(35, dtype=np.float32).reshape(7, 5)
    a = shardimpl.distribute_variable(full, rows, name="from_numpy")
    b = shardimpl.distribute_variable(torch.as_tensor(full), shardimpl.TorchLayout(mesh, (Shard(1),)))
    c = shardimpl.distribute_variable(shardimpl.InitSpec("normal", 0.0, 0.02, seed=5), rows,
                                      shape=(64, 16), dtype="float32", name="drawn")
    d = shardimpl.distribute_variable(lambda shape, dtype: torch.ones(shape, dtype=dtype),
                                      shardimpl.TorchLayout(mesh, (Replicate(),)), shape=(3, 3),
                                      dtype=torch.float32, name="callable")
    out["gathered_equal"] = bool(np.array_equal(shardimpl.gather_variable(a).numpy(), full)
                                 and np.array_equal(shardimpl.all_gather_variable(b).numpy(), full))
    out["drawn_std"] = float(shardimpl.gather_variable(c).std())
    out["callable_sum"] = float(shardimpl.gather_variable(d).sum())
    out["local_rows"] = tuple(a.to_local().shape)
    try:
        shardimpl.distribute_variable("glorot_uniform", rows, shape=(4, 4), dtype="float32")
        out["keras_name_error"] = None
    except TypeError as exc:
        out["keras_name_error"] = str(exc)
    state = {"w": c, "bias": torch.arange(4.0)}
    path = os.path.join(folder, "ckpt")
    shardimpl.save_sharded(state, path)
    target = {"w": shardimpl.distribute_variable(torch.zeros(64, 16), shardimpl.TorchLayout(mesh, (Shard(1),))),
              "bias": torch.zeros(4)}
    shardimpl.load_sharded(target, path)
    out["checkpoint_equal"] = bool(torch.equal(shardimpl.gather_variable(target["w"]), shardimpl.gather_variable(c))
                                   and torch.equal(target["bias"], torch.arange(4.0)))
    return out


def main():
    from shardimpl import launch

    with tempfile.TemporaryDirectory() as folder:
        rows = launch.run(core_without_keras, 2, folder, timeout=120)
    import json

    print(json.dumps([{"status": r.status, "error": r.error, "value": r.value} for r in rows]))


if __name__ == "__main__":
    main()
