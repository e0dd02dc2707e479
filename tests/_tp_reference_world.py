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
