"""Rank-side check of `shardimpl.keras.steps.wrap_should_torch_compile`: a model compiled with
``jit_compile=True`` under a distribution trains, evaluates and predicts eagerly, exactly as the
same model compiled with ``jit_compile=False``, and says so once."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")


def _model(jit_compile):
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16,), batch_size=8)
    h = keras.layers.Dense(32, activation="relu", name="col")(inputs)
    out = keras.layers.Dense(4, name="row")(h)
    model = keras.Model(inputs, out, name=f"jit_{jit_compile}")
    model.compile(optimizer="adam", loss="mse", jit_compile=jit_compile)
    return model


def jit_compile_runs_eagerly():
    import keras
    import numpy as np

    import shardimpl

    shardimpl.install()
    mesh = keras.distribution.DeviceMesh((2,), ["model"], keras.distribution.list_devices())
    lm = keras.distribution.LayoutMap(mesh)
    lm["col/kernel"] = (None, "model")
    lm["col/bias"] = ("model",)
    lm["row/kernel"] = ("model", None)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    x = np.random.default_rng(0).standard_normal((32, 16)).astype("float32")
    y = np.random.default_rng(1).standard_normal((32, 4)).astype("float32")
    models = {jit: _model(jit) for jit in (True, False)}
    models[False].set_weights(models[True].get_weights())  # the same start
    out = {}
    for jit, model in models.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            evaluated = model.evaluate(x, y, batch_size=8, verbose=0)
            predicted = model.predict(x, batch_size=8, verbose=0)
        out[jit] = {
            "losses": history.history["loss"], "evaluated": evaluated, "predicted": np.asarray(predicted),
            "warnings": [str(w.message) for w in caught if "jit_compile=True" in str(w.message)],
            "compiled": any(hasattr(f, "_torchdynamo_orig_callable") or type(f).__name__ == "OptimizedModule"
                            for f in (model.train_function, model.test_function, model.predict_function)),
            "jit_compile_kept": model.jit_compile,
        }
    return {
        "same_losses": out[True]["losses"] == out[False]["losses"] and out[True]["evaluated"] == out[False]["evaluated"],
        "same_predictions": bool(np.array_equal(out[True]["predicted"], out[False]["predicted"])),
        "compiled": out[True]["compiled"],
        "warnings": out[True]["warnings"],
        "warnings_without_jit": out[False]["warnings"],
        "jit_compile_kept": out[True]["jit_compile_kept"],
    }
