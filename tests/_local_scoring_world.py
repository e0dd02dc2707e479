"""Rank-side checks of scoring on local tensors (`shardimpl.keras.local_scoring`, the vocabulary-split
mean errors of `shardimpl.keras.losses`) and of the local ``repeat`` (`shardimpl.keras.ops`)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

FEATURES, HIDDEN, OUT, BATCH = 6, 8, 10, 4


def _data():
    rs = np.random.RandomState(11)
    return rs.randn(BATCH, FEATURES).astype("float32"), rs.randn(BATCH, OUT).astype("float32")


def build(last_layout):
    """Dense(HIDDEN) column-split, then Dense(OUT): row-split (``"row"``: its output summed and
    replicated) or column-split (``"column"``: its output split along the last dim)."""
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(HIDDEN, activation="tanh", name="first")(inputs)
    out = keras.layers.Dense(OUT, name="last")(h)
    return keras.Model(inputs, out)


def _distribute(last_layout):
    import keras

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[r".*first/kernel"] = (None, "model")
    lm[r".*first/bias"] = ("model",)
    if last_layout == "row":
        lm[r".*last/kernel"] = ("model", None)
    else:
        lm[r".*last/kernel"] = (None, "model")
        lm[r".*last/bias"] = ("model",)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))


def train(last_layout, loss, sharded, initial=None):
    """Two train_on_batch steps and an evaluate with ``loss`` and the "mae" metric; with
    ``sharded``, the types the loss saw and the DTensor dispatches of each step's loss."""
    import keras
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    if sharded:
        _distribute(last_layout)
    model = build(last_layout)
    if initial is not None:
        model.set_weights(initial)
    seen, dispatches = [], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, DTensor) for a in tree_flatten((args, kwargs or {}))[0]):
                dispatches[-1] += 1
            return func(*args, **(kwargs or {}))

    own_compute_loss = model.compute_loss

    def compute_loss(*args, **kwargs):
        y_pred = kwargs.get("y_pred", args[2] if len(args) > 2 else None)
        if y_pred.device.type == "meta":  # Keras' symbolic build: shapes only
            return own_compute_loss(*args, **kwargs)
        seen.append(type(y_pred).__name__)
        dispatches.append(0)
        with Count():
            return own_compute_loss(*args, **kwargs)

    model.compute_loss = compute_loss
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, metrics=["mae"])
    x, y = _data()
    start = model.get_weights()
    logs = [model.train_on_batch(x, y, return_dict=True) for _ in range(2)]
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    return {"initial": start, "losses": [float(l["loss"]) for l in logs], "mae": [float(l["mae"]) for l in logs],
            "evaluate": {k: float(v) for k, v in evaluated.items()}, "weights": model.get_weights(),
            "loss_saw": sorted(set(seen)), "loss_dtensor_dispatches": dispatches}


def repeat_matches_keras():
    """``keras.ops.repeat`` of heads-split, replicated and unevenly split DTensors: values and
    gradients equal Keras' repeat of the whole tensor, layout kept where the block is repeated."""
    import keras
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import shardimpl

    shardimpl.install()
    dispatches = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, DTensor) for a in tree_flatten((args, kwargs or {}))[0]):
                dispatches[0] += 1
            return func(*args, **(kwargs or {}))

    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for name, shape, placements in (("heads_split", (2, 3, 4, 5), [Shard(2)]), ("replicated", (2, 3, 4, 5), [Replicate()]),
                                    ("other_dim_split", (2, 4, 4, 5), [Shard(1)])):
        whole = torch.arange(float(np.prod(shape))).reshape(shape)
        x = distribute_tensor(whole, mesh, placements).requires_grad_()
        dispatches[0] = 0
        with Count():
            y = keras.ops.repeat(x, 3, axis=2)
        weights = torch.arange(float(y.numel())).reshape(y.shape)
        (y.full_tensor() * weights).sum().backward()
        w = whole.clone().requires_grad_()
        expected = torch.repeat_interleave(w, 3, dim=2)
        (expected * weights).sum().backward()
        out[name] = {"values": bool(torch.equal(y.full_tensor(), expected.detach())),
                     "gradients": bool(torch.equal(x.grad.full_tensor(), w.grad)),
                     "placements": [str(p) for p in y.placements], "dtensor_dispatches": dispatches[0]}
    partial = DTensor.from_local(torch.ones(2, 3, 4), mesh, [Partial()], run_check=False)
    dispatches[0] = 0
    with Count():
        y = keras.ops.repeat(partial, 2, axis=1)
    out["partial"] = {"values": bool(torch.equal(y.full_tensor(), torch.full((2, 6, 4), 2.0))),
                      "dtensor_dispatches": dispatches[0]}
    return out
