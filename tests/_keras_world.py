"""Rank-side Keras checks: ModelParallel on the torch backend, end to end.

Each function runs on every rank (or on one process for the unsharded
reference) and returns plain data for the tests to compare.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

BATCH, FEATURES, TOKENS, VOCAB = 16, 12, 6, 40


def _data(kind, n=64):
    rs = np.random.RandomState(7)
    if kind == "mlp":
        x = rs.randn(n, FEATURES).astype("float32")
    else:
        x = rs.randint(0, VOCAB, size=(n, TOKENS)).astype("int32")
    y = rs.randn(n, 4).astype("float32")
    return x, y


def build(kind):
    import keras

    keras.utils.set_random_seed(3)
    if kind == "mlp":
        inputs = keras.Input((FEATURES,))
        h = keras.layers.Dense(32, activation="relu", name="dense_a")(inputs)
        h = keras.layers.Dense(24, activation="tanh", name="dense_b")(h)
        out = keras.layers.Dense(4, name="head")(h)
        return keras.Model(inputs, out, name="mlp")
    tokens = keras.Input((TOKENS,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 16, name="embed")(tokens)
    h = keras.layers.LayerNormalization(name="ln1")(x)
    h = keras.layers.MultiHeadAttention(4, 4, name="attn")(h, h)  # heads divisible by N <= 4
    x = x + h
    h = keras.layers.LayerNormalization(name="ln2")(x)
    h = keras.layers.Dense(32, activation="relu", name="mlp_up")(h)
    x = x + keras.layers.Dense(16, name="mlp_down")(h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(4, name="head")(x)
    return keras.Model(tokens, out, name="block")


def layout_map(kind, mesh, model_axis="model"):
    import keras

    lm = keras.distribution.LayoutMap(mesh)
    m = model_axis
    if kind == "mlp":
        lm[r".*dense_a/kernel"] = (None, m)
        lm[r".*dense_a/bias"] = (m,)
        lm[r".*dense_b/kernel"] = (m, None)
        lm[r".*head/kernel"] = (None, m)
        lm[r".*head/bias"] = (m,)
        lm[r".*dense_b/bias"] = (m,)
        return lm
    lm[r".*embed/embeddings"] = (None, m)
    lm[r".*attn/(query|key|value)/kernel"] = (None, m, None)
    lm[r".*attn/(query|key|value)/bias"] = (m, None)
    lm[r".*attn/attention_output/kernel"] = (m, None, None)
    lm[r".*mlp_up/kernel"] = (None, m)
    lm[r".*mlp_up/bias"] = (m,)
    lm[r".*mlp_down/kernel"] = (m, None)
    lm[r".*head/kernel"] = (m, None)
    return lm


def _set_model_parallel(kind, mesh_shape=None):
    import keras

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    if mesh_shape is None:
        mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
        lm = layout_map(kind, mesh)
        dist = keras.distribution.ModelParallel(layout_map=lm)
    else:
        mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"], devices)
        lm = layout_map(kind, mesh)
        dist = keras.distribution.ModelParallel(layout_map=lm, batch_dim_name="batch")
    keras.distribution.set_distribution(dist)
    return dist


def _adam():
    import keras

    # A large epsilon keeps Adam from turning the numerical noise of gradients that are
    # zero in exact arithmetic (attention key biases) into full-size steps.
    return keras.optimizers.Adam(1e-2, epsilon=1e-3)


def _local_bytes(variables):
    local = full = 0
    for v in variables:
        t = v.value
        size = t.element_size()
        full += t.numel() * size
        local += (t.to_local() if hasattr(t, "to_local") else t).numel() * size
    return local, full


def sharded_train(kind):
    """3 train_on_batch steps and a predict under ModelParallel; returns what to compare."""

    _set_model_parallel(kind)
    model = build(kind)
    model.compile(optimizer=_adam(), loss="mse")
    initial = model.get_weights()
    x, y = _data(kind)
    losses = [float(model.train_on_batch(x[:BATCH], y[:BATCH])) for _ in range(3)]
    pred = model.predict(x[:BATCH], verbose=0)
    local, full = _local_bytes(model.weights + model.optimizer.variables)
    sharded = sum(1 for v in model.weights if v.value.to_local().shape != v.value.shape)
    return {
        "initial": initial, "losses": losses, "pred": pred, "weights": model.get_weights(),
        "local_bytes": local, "full_bytes": full, "sharded_variables": sharded,
        "n_weights": len(model.weights),
    }


def reference_train(kind, initial):
    """The same model, unsharded in one process with stock Keras, from the same weights."""

    model = build(kind)
    model.set_weights(initial)
    model.compile(optimizer=_adam(), loss="mse")
    x, y = _data(kind)
    losses = [float(model.train_on_batch(x[:BATCH], y[:BATCH])) for _ in range(3)]
    return {"losses": losses, "pred": model.predict(x[:BATCH], verbose=0), "weights": model.get_weights()}


def reference_fit(kind, initial, epochs=2):
    import keras

    model = build(kind)
    model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _data(kind)
    hist = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return {"loss": hist.history["loss"], "weights": model.get_weights()}


def sharded_fit(kind, mesh_shape=None, epochs=2):
    """fit on numpy arrays (model-only mesh, or a 2-D ("batch", "model") mesh)."""
    import keras

    from shardimpl.keras.steps import data_axis

    dist = _set_model_parallel(kind, mesh_shape)
    model = build(kind)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    initial = model.get_weights()
    x, y = _data(kind)
    hist = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    shuffled = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0)
    evaluated = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    return {"initial": initial, "loss": hist.history["loss"], "weights": model.get_weights(),
            "data_axis": data_axis(dist),
            "shuffled_loss": shuffled.history["loss"], "evaluate": float(evaluated)}


def data_parallel_fit(kind):
    """DataParallel: variables replicated, every global batch split across the ranks."""
    import keras

    import shardimpl
    from shardimpl.keras.steps import data_axis

    shardimpl.install()
    dist = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    keras.distribution.set_distribution(dist)
    model = build(kind)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    initial = model.get_weights()
    x, y = _data(kind)
    hist = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    replicated = all(len(v.value.to_local().shape) == len(v.shape) and tuple(v.value.to_local().shape) == tuple(v.shape)
                     for v in model.weights)
    return {"initial": initial, "loss": hist.history["loss"], "weights": model.get_weights(),
            "data_axis": data_axis(dist), "replicated": replicated}


def sharded_fit_pydataset(kind):
    """fit and predict on a keras.utils.PyDataset with a model-only mesh."""
    import keras

    x, y = _data(kind)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(x) // BATCH

        def __getitem__(self, i):
            return x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]

    _set_model_parallel(kind)
    model = build(kind)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    hist = model.fit(Batches(), epochs=2, verbose=0)
    return {"loss": hist.history["loss"], "weights": model.get_weights()}


def save_sharded(kind, folder):
    """Train a step, then save weights and the whole model; report who wrote files."""

    from shardimpl.keras import saving as keras_saving

    _set_model_parallel(kind)
    model = build(kind)
    model.compile(optimizer=_adam(), loss="mse")
    x, y = _data(kind)
    model.train_on_batch(x[:BATCH], y[:BATCH])
    written = []
    for name in ("model.weights.h5", "model.keras"):
        path = os.path.join(folder, name)
        if name.endswith(".keras"):
            model.save(path)
        else:
            model.save_weights(path)
        written.append(keras_saving.last_save_wrote())
    return {"weights": model.get_weights(), "wrote": written,
            "files": sorted(os.listdir(folder))}


def load_unsharded(kind, folder):
    """Stock Keras, one process: load what the sharded run saved."""
    import keras

    model = build(kind)
    model.load_weights(os.path.join(folder, "model.weights.h5"))
    whole = keras.saving.load_model(os.path.join(folder, "model.keras"))
    return {"weights": model.get_weights(), "whole": whole.get_weights()}


def load_sharded(kind, folder):
    """Load the files into a model sharded over this world (another N than the saver's)."""
    import keras

    _set_model_parallel(kind)
    model = build(kind)
    model.load_weights(os.path.join(folder, "model.weights.h5"))
    whole = keras.saving.load_model(os.path.join(folder, "model.keras"))
    sharded = all(hasattr(v.value, "to_local") for v in whole.weights)
    return {"weights": model.get_weights(), "whole": whole.get_weights(), "whole_is_sharded": sharded}


ACTIVATION_LAYOUTS = {"mlp": {"dense_a/output": (None, "model")}, "block": {"mlp_up/output": (None, None, "model")}}


def _direct_checks(model, kind):
    """A direct call on numpy, and one custom-loop step (loss.backward()) on torch tensors."""
    import keras
    import torch

    x, y = _data(kind)
    out = {"direct": keras.ops.convert_to_numpy(model(x[:BATCH]))}
    pred = model(torch.as_tensor(x[:BATCH]))
    out["direct_is_plain"] = type(pred) is torch.Tensor
    loss = ((pred - torch.as_tensor(y[:BATCH])) ** 2).mean()
    loss.backward()
    out["loss"] = float(loss)
    grads = []
    for v in model.trainable_variables:
        g = v.value.grad
        grads.append(g.full_tensor().detach().numpy() if hasattr(g, "full_tensor") else g.detach().numpy())
        v.value.grad = None
    out["grads"] = grads
    return out


def sharded_direct(kind, mesh_shape=None, activation_layouts=False):
    """Direct calls, a custom training loop and (optionally) activation layouts under ModelParallel."""
    import keras

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    if mesh_shape is None:
        mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    else:
        mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"], devices)
    lm = layout_map(kind, mesh)
    if activation_layouts:
        for key, axes in ACTIVATION_LAYOUTS[kind].items():
            lm[key] = axes
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=lm, batch_dim_name="batch" if mesh_shape else "model"))
    from shardimpl.keras import backend

    laid_out = []
    original = backend.distribute_tensor

    def counting(tensor, layout):
        result = original(tensor, layout)
        if layout is not None and hasattr(result, "placements"):
            laid_out.append(str(result.placements))
        return result

    backend.distribute_tensor = counting
    model = build(kind)
    initial = model.get_weights()
    out = _direct_checks(model, kind)
    out["activation_placements"] = sorted(set(laid_out))
    out["activations"] = activation_layouts
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _data(kind)
    out["train"] = [float(model.train_on_batch(x[:BATCH], y[:BATCH])) for _ in range(2)]
    out["predict"] = model.predict(x[:BATCH], verbose=0)
    out["initial"] = initial
    return out


def reference_direct(kind, initial):
    import keras

    model = build(kind)
    model.set_weights(initial)
    out = _direct_checks(model, kind)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _data(kind)
    out["train"] = [float(model.train_on_batch(x[:BATCH], y[:BATCH])) for _ in range(2)]
    out["predict"] = model.predict(x[:BATCH], verbose=0)
    return out


def _meta_refusing_model():
    """A Dense model with a layer that refuses the meta device: Keras' symbolic build then
    falls back to tracing eagerly with real (here: sharded) values."""
    import keras

    class NoMeta(keras.layers.Layer):
        def call(self, x):
            if str(x.device) == "meta":
                raise RuntimeError("this layer cannot run on the meta device")
            return x * 2.0

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.Dense(32, name="dense_a"), NoMeta(),
                              keras.layers.Dense(24, name="dense_b"), keras.layers.Dense(4, name="head")])
    return model


def build_fallback_run(sharded, initial=None):
    """Build (Keras' symbolic build falls back to an eager trace), then fit and a direct call."""
    import keras

    if sharded:
        _set_model_parallel("mlp")
    model = _meta_refusing_model()
    model.build((None, FEATURES))
    if initial is not None:
        model.set_weights(initial)
    initial = model.get_weights()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _data("mlp")
    keras.utils.set_random_seed(4)
    hist = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    from torch.distributed.tensor import Shard

    return {"loss": hist.history["loss"], "direct": keras.ops.convert_to_numpy(model(x[:4])), "initial": initial,
            "sharded": sum(1 for v in model.weights if hasattr(v.value, "placements")
                           and any(isinstance(p, Shard) for p in v.value.placements))}
