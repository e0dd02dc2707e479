"""Run under torchrun: keras.distribution.initialize() + ModelParallel + launch.run on torchrun's ranks."""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402

import shardimpl  # noqa: E402
from shardimpl import launch  # noqa: E402


def rank_of():
    return dist.get_rank()


def main(out):
    shardimpl.install()
    keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[".*kernel"] = (None, "model")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 8), "float32")
    loss = float(model.train_on_batch(x, np.zeros((8, 2), "float32")))
    rows = launch.run(rank_of, dist.get_world_size())
    local = tuple(model.weights[0].value.to_local().shape)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"devices": devices, "loss": loss, "rows": [r.as_dict() for r in rows],
                       "local": local}, f)
    dist.barrier()
    dist.destroy_process_group()  # a live gloo group at interpreter exit can abort the process


if __name__ == "__main__":
    main(sys.argv[1])
