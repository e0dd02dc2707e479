"""Rank-side checks of batches the data axis does not divide, against stock Keras.

On a mesh that splits batches (DataParallel on (2,), or ("batch", "model") on
(2, 2) with weights split along both axes), `fit`/`evaluate`/`predict` on 7
samples with batch_size 2 end on a batch of 1, and single batches of 1 or 3
are smaller than (or not a multiple of) the 2 data ranks. Each function runs
on every rank (or on one process for the unsharded reference) and returns
plain data for `test_partial_batch.py` to compare.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

SAMPLES, STEPS, FEATURES, BATCH = 7, 4, 6, 2


def _data():
    rs = np.random.RandomState(5)
    x = rs.randn(SAMPLES, STEPS, FEATURES).astype("float32")
    y = rs.randn(SAMPLES, 4).astype("float32")
    w = rs.uniform(0.2, 2.0, size=(SAMPLES,)).astype("float32")
    return x, y, w


def build():
    """Dense on a 3-D input (torch folds it with a view of the batch dim), BatchNormalization
    (statistics over the whole batch), Flatten, two Dense."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((STEPS, FEATURES))
    h = keras.layers.Dense(8, activation="tanh", name="dense_a")(inputs)
    h = keras.layers.BatchNormalization(name="norm")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="dense_b")(h)
    out = keras.layers.Dense(4, name="head")(h)
    return keras.Model(inputs, out, name="seq")


def _layout_map(mesh):
    """Every kernel split along the data axis ("batch": FSDP, gathered while its layer runs),
    two of them along "model" too."""
    import keras

    lm = keras.distribution.LayoutMap(mesh)
    lm[r".*dense_a/kernel"] = ("batch", "model")
    lm[r".*dense_a/bias"] = ("model",)
    lm[r".*dense_b/kernel"] = ("model", "batch")
    lm[r".*head/kernel"] = ("batch", None)
    return lm


def _set_distribution(setup):
    import keras

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    if setup == "data_parallel":
        dist = keras.distribution.DataParallel(devices=devices)
    else:
        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
        dist = keras.distribution.ModelParallel(layout_map=_layout_map(mesh), batch_dim_name="batch")
    keras.distribution.set_distribution(dist)
    return dist


def _compile(model):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse",
                  metrics=["mae"], weighted_metrics=["mse"])


def _laid_out_batches(record):
    """Record, for every step, the batch size and whether its x came split along the batch."""
    from shardimpl.keras import steps

    original = steps.distribute_batch

    def recording(data, distribution):
        out = original(data, distribution)
        x = out[0] if isinstance(out, tuple) else out
        record.append((int(x.shape[0]), "Shard" in str(getattr(x, "placements", ""))))
        return out

    steps.distribute_batch = recording
    return lambda: setattr(steps, "distribute_batch", original)


def _runs(model) -> dict:
    """The same program on the sharded and the stock model: direct calls, predict, evaluate,
    fit (with and without sample weights), single batches of 1, weights at the end."""
    import keras

    x, y, w = _data()
    out = {"direct_3": keras.ops.convert_to_numpy(model(x[:3])),
           "direct_1": keras.ops.convert_to_numpy(model(x[:1]))}
    _compile(model)
    out["predict"] = model.predict(x, batch_size=BATCH, verbose=0)
    out["predict_1"] = model.predict(x[:1], verbose=0)
    out["predict_on_batch_3"] = keras.ops.convert_to_numpy(model.predict_on_batch(x[:3]))
    out["evaluate"] = model.evaluate(x, y, batch_size=BATCH, verbose=0)
    out["evaluate_weighted"] = model.evaluate(x, y, sample_weight=w, batch_size=BATCH, verbose=0)
    out["evaluate_1"] = model.evaluate(x[:1], y[:1], verbose=0)
    out["fit"] = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
    out["fit_weighted"] = model.fit(x, y, sample_weight=w, batch_size=BATCH, epochs=1, shuffle=False,
                                    verbose=0).history
    out["train_on_batch_1"] = model.train_on_batch(x[:1], y[:1], sample_weight=w[:1])
    out["test_on_batch_3"] = model.test_on_batch(x[:3], y[:3])
    out["fit_even"] = model.fit(x[:4], y[:4], batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
    out["predict_after"] = model.predict(x, batch_size=BATCH, verbose=0)
    out["weights"] = model.get_weights()
    return out


def sharded_run(setup):
    """`_runs` under ``setup`` ("data_parallel" on 2 ranks, "fsdp_tp" on a (2, 2) mesh)."""
    from shardimpl.keras.steps import data_axis

    dist = _set_distribution(setup)
    model = build()
    initial = model.get_weights()
    record = []
    restore = _laid_out_batches(record)
    try:
        out = _runs(model)
    finally:
        restore()
    out.update(initial=initial, data_axis=data_axis(dist), steps=record,
               split_weights=sorted(v.path for v in model.weights if "Shard" in str(getattr(v.value, "placements", ""))))
    return out


def reference_run(initial):
    """The same model, unsharded with stock Keras in one process, from the same weights."""
    import keras

    keras.distribution.set_distribution(None)
    model = build()
    model.set_weights(initial)
    return _runs(model)
