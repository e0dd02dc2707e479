"""Rank-side checks of `shardimpl.tp_einsum.local_einsum` against the whole-tensor einsum."""

from __future__ import annotations


def local_einsum_matches_whole(mesh_shape):
    """For each layout row: output, input and kernel gradients against torch on whole tensors,
    the output's placements, and the all-reduces backward issued."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from shardimpl.tp_einsum import local_einsum

    mesh = init_device_mesh("cpu", mesh_shape)
    rest = [Replicate()] * (mesh.ndim - 1)
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(4, 6, 8, generator=g)
    w_full = torch.randn(8, 2, 5, generator=g)  # "abc,cde->abde": EinsumDense's query projection
    eq = "abc,cde->abde"
    cases = {"column": ([Replicate()], [Shard(1)]), "row": ([Shard(2)], [Shard(0)]),
             "data": ([Shard(0)], [Replicate()]), "replicated": ([Replicate()], [Replicate()]),
             "whole_input_row": ([Replicate()], [Shard(0)]), "partial_input": ([Partial()], [Shard(1)]),
             "unsupported": ([Shard(1)], [Shard(0)])}
    counted = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args, **kwargs):
        counted["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    out = {}
    try:
        for name, (px, pw) in cases.items():
            if px[0].is_partial():  # each rank holds a term of the sum; its gradient is the whole one
                leaf = (x_full / mesh.size(0)).requires_grad_()
                x = DTensor.from_local(leaf, mesh, px + rest, run_check=False)
            else:
                leaf = None
                x = distribute_tensor(x_full, mesh, px + rest).requires_grad_()
            w = distribute_tensor(w_full, mesh, pw + rest).requires_grad_()
            counted["all_reduce"] = 0
            y = local_einsum(eq, x, w)
            if y is None:
                out[name] = None
                continue
            # Two layers reading the same input (attention's query and key): one all-reduce.
            y2 = local_einsum(eq, x, w)
            (y.full_tensor().square().sum() + y2.full_tensor().sum()).backward()
            xf, wf = x_full.clone().requires_grad_(), w_full.clone().requires_grad_()
            want = torch.einsum(eq, xf, wf)
            (want.square().sum() + want.sum()).backward()
            out[name] = {"y": float((y.full_tensor() - want).detach().abs().max()),
                         "gx": float(((leaf.grad if leaf is not None else x.grad.full_tensor()) - xf.grad).abs().max()),
                         "gw": float((w.grad.full_tensor() - wf.grad).abs().max()),
                         "placements": str(y.placements[0]), "backward_all_reduces": counted["all_reduce"]}
    finally:
        dist.all_reduce = original
    return out


def keras_steps(family, size, sharded, steps, initial=None):
    """``steps`` train steps of the speed tool's setup (SGD with momentum, MSE against zeros),
    stock or sharded with the family's 1-D map: the losses, and one step's operator counts."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import numpy as np

    from bench.harness.families import build_model, layout_map, model_mesh, sample_batch
    from bench.tools.op_count import count_ops

    if sharded:
        import shardimpl

        shardimpl.install()
        mesh = model_mesh(family, keras.distribution.list_devices())
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map(family, mesh, size)))
    keras.utils.set_random_seed(1)
    model = build_model(family, size)
    start = model.get_weights()
    if initial is not None:
        model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9), loss="mse")
    x = sample_batch(family, size).numpy()
    y = np.zeros(model.compute_output_shape(x.shape), "float32")
    losses = [float(model.train_on_batch(x, y)) for _ in range(steps)]
    return {"losses": losses, "initial": start, "ops": count_ops(lambda: model.train_on_batch(x, y))}


def reference_ops(family, size):
    """One step's operator counts of the hand-written tensor-parallel reference."""
    from bench.harness.families import sample_batch
    from bench.tools import tp_reference
    from bench.tools.op_count import count_ops

    model = tp_reference.build_reference(family, size)
    optimizer = tp_reference.make_optimizer(model)
    x = sample_batch(family, size)
    return count_ops(lambda: tp_reference.reference_step(model, optimizer, x))


def dense_bias_and_activation_on_local_blocks():
    """A column- then a row-split Dense, each with a bias and relu, called directly under
    shardimpl: the DTensor dispatches of the bias adds and activations (forward and backward),
    and the output against numpy on the gathered weights."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.distributed.tensor import DTensor

    import shardimpl

    shardimpl.install()
    mesh = keras.distribution.DeviceMesh((2,), ["model"], keras.distribution.list_devices())
    lm = keras.distribution.LayoutMap(mesh)
    lm["col/kernel"], lm["col/bias"] = (None, "model"), ("model",)
    lm["row/kernel"], lm["row/bias"] = ("model", None), (None,)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", bias_initializer="random_normal", name="col")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(8, activation="relu", bias_initializer="random_normal",
                                                   name="row")(h))
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    names = {"aten.add.Tensor", "aten.relu.default", "aten.threshold_backward.default", "aten.sum.dim_IntList"}
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in names and any(isinstance(a, DTensor) for a in tree_flatten((args, kwargs or {}))[0]):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count():
        out = model(x)
        (out.to_local() if isinstance(out, DTensor) else out).sum().backward()
    w1, b1, w2, b2 = model.get_weights()
    expected = np.maximum(np.maximum(x @ w1 + b1, 0) @ w2 + b2, 0)
    got = out.full_tensor() if isinstance(out, DTensor) else out
    return {"dispatches": seen, "max_abs": float(np.abs(got.detach().numpy() - expected).max()),
            "bias_grads": [v.value.grad is not None for v in model.trainable_variables if "bias" in v.path]}


def batched_einsum_matches_whole(mesh_shape):
    """`local_batched_einsum` (attention's scores and weighted values) against torch on whole
    tensors, for heads split on a 1-D mesh and batch and heads split on a (2, 2) mesh: output,
    both gradients, the output's placements and the collectives issued (none); None for
    operands split along different letters."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from shardimpl.tp_einsum import local_batched_einsum

    mesh = init_device_mesh("cpu", mesh_shape)
    split = (Shard(2),) if len(mesh_shape) == 1 else (Shard(0), Shard(2))  # heads; batch and heads
    g = torch.Generator().manual_seed(3)
    q_full, k_full = torch.randn(4, 5, 6, 3, generator=g), torch.randn(4, 7, 6, 3, generator=g)
    out = {}
    for eq, b_full in (("btnh,bsnh->bnts", k_full), ("bnts,bsnh->btnh", None)):
        a_full = q_full if b_full is not None else torch.randn(4, 6, 5, 7, generator=g)
        a_split = split if b_full is not None else tuple(Shard(0 if p.dim == 0 else 1) for p in split)
        b_full = b_full if b_full is not None else torch.randn(4, 7, 6, 3, generator=g)
        a = distribute_tensor(a_full, mesh, a_split).requires_grad_()
        b = distribute_tensor(b_full, mesh, split).requires_grad_()
        with CommDebugMode() as comm:
            y = local_batched_einsum(eq, a, b)
            (y * y).sum().backward()  # stays local: the sum's gradient is what each block gets
        af, bf = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
        want = torch.einsum(eq, af, bf)
        (want * want).sum().backward()
        out[eq] = {"y": float((y.full_tensor() - want).detach().abs().max()),
                   "ga": float((a.grad.full_tensor() - af.grad).abs().max()),
                   "gb": float((b.grad.full_tensor() - bf.grad).abs().max()),
                   "placements": [str(p) for p in y.placements],
                   "collectives": comm.get_total_counts()}
    other = distribute_tensor(k_full, mesh, (Shard(1),) + (Replicate(),) * (len(mesh_shape) - 1))
    out["different_letters"] = local_batched_einsum("btnh,bsnh->bnts", distribute_tensor(q_full, mesh, split), other)
    return out


def matmul_layer_steps(sharded: bool, initial=None, steps: int = 3):
    """A model whose last layer is ``ops.matmul(x, self.kernel)`` (a custom layer, as keras-hub's
    tied LM head), the kernel split along its output dim on N ranks, trained ``steps`` SGD steps
    with MSE: the losses and final weights (against stock Keras from the same ``initial``), the
    matmul's output placements and the all-reduces one step issues."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import numpy as np
    import torch.distributed as dist

    class MatmulHead(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 12), initializer="glorot_uniform", name="kernel")

        def call(self, x):
            return keras.ops.matmul(x, self.kernel)

    if sharded:
        import shardimpl

        shardimpl.install()
        mesh = keras.distribution.DeviceMesh((2,), ["model"], keras.distribution.list_devices())
        lm = keras.distribution.LayoutMap(mesh)
        lm["head/kernel"] = (None, "model")
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,), batch_size=4)
    model = keras.Model(inputs, MatmulHead(name="head")(keras.layers.Dense(8, activation="tanh", name="body")(inputs)))
    start = model.get_weights()
    if initial is not None:
        model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 6)).astype("float32"), rng.normal(size=(4, 12)).astype("float32")
    losses = [float(model.train_on_batch(x, y)) for _ in range(steps)]
    out = {"losses": losses, "weights": model.get_weights(), "initial": start}
    if sharded:
        from shardimpl.keras.context import step_context

        with step_context():
            logits = model.get_layer("head")(model.get_layer("body")(x))
        out["placements"] = [str(p) for p in logits.placements]
        calls, original = {"n": 0}, dist.all_reduce

        def counting(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting
        try:
            model.train_on_batch(x, y)
        finally:
            dist.all_reduce = original
        out["all_reduces"] = calls["n"]
    return out
