"""Rank-side check of the hand-written tensor-parallel reference (`bench.tools.tp_reference`)
against stock Keras on the same weights."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")


def reference_matches_stock_keras(family, size, steps):
    """Stock Keras (whole model, in this rank) and the reference (this rank's blocks of the same
    weights), both SGD with momentum and MSE against zeros: the loss of each of ``steps`` steps."""
    import keras
    import numpy as np
    import torch

    from bench.harness.families import build_model, sample_batch
    from bench.tools import tp_reference

    keras.utils.set_random_seed(1)
    model = build_model(family, size)
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss="mse")
    weights = {v.path: torch.as_tensor(np.array(v.numpy())) for v in model.weights}
    reference = tp_reference.build_reference(family, size)
    tp_reference.load_keras_weights(reference, weights)
    optimizer = tp_reference.make_optimizer(reference)
    x = sample_batch(family, size)
    y = np.zeros(model.compute_output_shape(tuple(x.shape)), "float32")
    stock = [float(model.train_on_batch(x.numpy(), y)) for _ in range(steps)]
    ours = [tp_reference.reference_step(reference, optimizer, x) for _ in range(steps)]
    return {"stock": stock, "reference": ours}


def dtensor_ops_counted():
    """`count_ops` on one DTensor add (a 1-D mesh over this world) and on one plain add."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from bench.tools.op_count import count_ops

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    a = distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])
    plain = torch.ones(4, 4)
    return {"dtensor": count_ops(lambda: a + a), "plain": count_ops(lambda: plain + plain)}


def keras_megatron_matches_stock_keras(family, size, steps):
    """Stock Keras (whole model, in this rank) and `bench.tools.keras_megatron`'s model (this
    rank's blocks of the same weights, the reference's collectives), both SGD with momentum and
    the reference's loss: each step's loss, and the collectives a step issues."""
    import keras
    import numpy as np
    import torch

    from bench.harness.families import build_model, layout_map, model_mesh, sample_batch
    from bench.tools.keras_megatron import load_blocks, megatron_loss, megatron_model
    from bench.tools.op_count import count_ops

    keras.utils.set_random_seed(1)
    model = build_model(family, size)
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss="mse")
    weights = {v.path: np.array(v.numpy()) for v in model.weights}
    local = megatron_model(family, size)
    lm = layout_map(family, model_mesh(family, keras.distribution.list_devices()), size)
    load_blocks(local, weights, lm)
    local.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss=megatron_loss(family))
    x = sample_batch(family, size).numpy()
    y = np.zeros(model.compute_output_shape(x.shape), "float32")
    y_local = np.zeros(local.compute_output_shape(x.shape), "float32")
    stock = [float(model.train_on_batch(x, y)) for _ in range(steps)]
    ours = [float(local.train_on_batch(x, y_local)) for _ in range(steps)]
    ops = count_ops(lambda: local.train_on_batch(x, y_local))
    from bench.tools import tp_reference

    reference = tp_reference.build_reference(family, size)
    optimizer = tp_reference.make_optimizer(reference)
    xt = torch.as_tensor(x)
    reference_ops = count_ops(lambda: tp_reference.reference_step(reference, optimizer, xt))
    return {"stock": stock, "megatron": ours, "collectives": ops["collectives"],
            "reference_collectives": reference_ops["collectives"],
            "split": [tuple(v.shape) for v in local.weights] != [tuple(v.shape) for v in model.weights]}
