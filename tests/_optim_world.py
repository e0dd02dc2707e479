"""Rank-side checks of the chunked optimizer update (`shardimpl.keras.optimizers`).

`compare_updates` runs on every rank of one world: for each case (an optimizer
config and a dtype policy) it trains the same sharded model twice from the
same initial weights for ``STEPS`` steps, once with shardimpl's chunked update
and once with Keras' own update (`keras_own_updates`), and returns the largest
absolute difference over every weight and optimizer variable, and how many
chunked updates ran. Chunks are made tiny here so that every variable is cut
across several groups.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

STEPS = 10
TINY_CHUNK_BYTES = 256  # 64 float32 per group: each kernel here is cut across groups

#: case name -> (optimizer class name, keyword arguments); every one with a rule
COVERED = {
    "sgd": ("SGD", {}),
    "sgd-momentum": ("SGD", {"momentum": 0.9}),
    "sgd-nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "adam": ("Adam", {}),
    "adam-amsgrad": ("Adam", {"amsgrad": True}),
    "adamw": ("AdamW", {"weight_decay": 0.05}),
    "rmsprop": ("RMSprop", {}),
    "rmsprop-centered-momentum": ("RMSprop", {"centered": True, "momentum": 0.5}),
    "adagrad": ("Adagrad", {}),
    "adadelta": ("Adadelta", {"learning_rate": 1.0}),
    "adamax": ("Adamax", {}),
    "lion": ("Lion", {"learning_rate": 1e-4}),
    "nadam": ("Nadam", {}),
    # Keras' own code around the update: clipping, EMA, accumulation, a schedule
    "adamw-clip-ema-accumulate": ("AdamW", {"weight_decay": 0.05, "global_clipnorm": 0.5, "use_ema": True,
                                           "ema_overwrite_frequency": 3, "gradient_accumulation_steps": 2}),
    "adam-schedule": ("Adam", {"learning_rate": "schedule"}),
    "adam-loss-scale": ("LossScaleOptimizer", {}),
}
#: Keras' own path, by design: no rule for these
FALLBACK = {
    "lamb": ("Lamb", {}),  # not elementwise (trust ratio: a norm per variable)
    "adam-own-update": ("CustomAdam", {}),  # a subclass with its own _parallel_update_step
}
#: one variable (``PARTLY_KERAS``) refused by the rule: Adam updates it with Keras' own update and
#: the rest chunked; Nadam (not splittable) falls back as a whole
PARTLY = {
    "adam-partly-keras": ("Adam", {}),
    "nadam-partly-keras": ("Nadam", {}),
}
PARTLY_KERAS = "dense_b/kernel"
POLICIES = ("float32", "mixed_bfloat16")


def _optimizer(kind: str, kwargs: dict):
    import keras
    from keras.src.backend.torch.optimizers import torch_adam

    kwargs = dict(kwargs)
    lr = kwargs.pop("learning_rate", 1e-3)
    if lr == "schedule":
        lr = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=2, decay_rate=0.5)
    if kind == "LossScaleOptimizer":
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(lr), initial_scale=2.0 ** 8)
    if kind == "CustomAdam":
        class CustomAdam(torch_adam.Adam):
            def _parallel_update_step(self, grads, variables, learning_rate):
                super()._parallel_update_step(grads, variables, learning_rate)

        return CustomAdam(lr)
    return getattr(keras.optimizers, kind)(lr, **kwargs)


def _model():
    """The test model, with the same initial weights every time (drawn here, then assigned)."""
    import keras

    inputs = keras.Input((12,))
    h = keras.layers.Dense(40, activation="tanh", name="dense_a")(inputs)  # kernel split on columns
    h = keras.layers.Dense(24, activation="tanh", name="dense_b")(h)  # on rows; its bias replicated
    out = keras.layers.Dense(4, name="head")(h)  # not in the map: replicated
    model = keras.Model(inputs, out)
    rs = np.random.RandomState(3)
    model.set_weights([rs.uniform(-0.5, 0.5, w.shape).astype("float32") for w in model.weights])
    return model


def _train(kind, kwargs, policy, own_update: bool):
    import keras

    from shardimpl.keras.optimizers import keras_own_updates

    keras.config.set_dtype_policy(policy)
    model = _model()
    model.compile(optimizer=_optimizer(kind, kwargs), loss="mse")
    rs = np.random.RandomState(5)
    x, y = rs.randn(16, 12).astype("float32"), rs.randn(16, 4).astype("float32")
    if own_update:
        with keras_own_updates():
            for _ in range(STEPS):
                model.train_on_batch(x, y)
    else:
        for _ in range(STEPS):
            model.train_on_batch(x, y)
    weights = model.get_weights()
    slots = [np.asarray(v.numpy(), np.float64) for v in model.optimizer.variables]
    keras.config.set_dtype_policy("float32")
    return weights, slots


def _max_abs_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
               for x, y in zip(a, b))


def _set_model_parallel():
    import keras

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[r".*dense_a/kernel"] = (None, "model")
    lm[r".*dense_a/bias"] = ("model",)
    lm[r".*dense_b/kernel"] = ("model", None)
    lm[r".*dense_c/kernel"] = (None, "model")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))


def compare_updates() -> dict:
    """{case/policy: {"max_abs_diff", "chunked_runs", "chunked_runs_in_keras_own", "weights_moved"}}."""
    import keras

    from shardimpl.keras import optimizers

    _set_model_parallel()
    saved_min, optimizers.MIN_CHUNK_BYTES = optimizers.MIN_CHUNK_BYTES, TINY_CHUNK_BYTES
    runs = {"n": 0}
    chunked = optimizers._run_chunked

    def counting(*args):
        runs["n"] += 1
        return chunked(*args)

    optimizers._run_chunked = counting
    taken = optimizers._taken

    def refusing(optimizer, slot_lists, grad, variable):
        return None if variable.path.endswith(PARTLY_KERAS) else taken(optimizer, slot_lists, grad, variable)

    out = {}
    try:
        initial = _model().get_weights()
        for name, (kind, kwargs) in {**COVERED, **FALLBACK, **PARTLY}.items():
            optimizers._taken = refusing if name in PARTLY else taken
            for policy in POLICIES:
                runs["n"] = 0
                ours, ours_slots = _train(kind, kwargs, policy, own_update=False)
                chunked_runs, runs["n"] = runs["n"], 0
                keras_weights, keras_slots = _train(kind, kwargs, policy, own_update=True)
                out[f"{name}/{policy}"] = {
                    "max_abs_diff": max(_max_abs_diff(ours, keras_weights), _max_abs_diff(ours_slots, keras_slots)),
                    "chunked_runs": chunked_runs,
                    "chunked_runs_in_keras_own": runs["n"],
                    "weights_moved": _max_abs_diff(ours, initial),
                }
    finally:
        optimizers._run_chunked, optimizers._taken = chunked, taken
        optimizers.MIN_CHUNK_BYTES = saved_min
    return out


SCRATCH_CASES = {"sgd-momentum": ("SGD", {"momentum": 0.9}), "adam": ("Adam", {}),
                 "adamw": ("AdamW", {"weight_decay": 0.05})}


def update_scratch(units: int = 512) -> dict:
    """Per case: the bytes ``optimizer.apply`` allocates above what was live when it was called
    (a `PeakMeter` inside it), with the chunked update and with Keras' own, on a model of three
    ``units`` x ``units`` kernels; plus the rank's local variable bytes and the rule's bound."""
    import keras

    from shardimpl.keras import optimizers
    from shardimpl.meters import PeakMeter

    _set_model_parallel()
    out = {}
    for name, (kind, kwargs) in SCRATCH_CASES.items():
        inputs = keras.Input((units,))
        h = keras.layers.Dense(units, name="dense_a")(inputs)
        h = keras.layers.Dense(units, name="dense_b")(h)
        model = keras.Model(inputs, keras.layers.Dense(units, name="dense_c")(h))
        model.compile(optimizer=_optimizer(kind, kwargs), loss="mse")
        x = np.random.RandomState(0).randn(8, units).astype("float32")
        model.train_on_batch(x, x)  # builds the slots
        rises = []
        apply = model.optimizer.apply

        def metered(*args, **kw):
            with PeakMeter("cpu", trace_python=False) as meter:
                apply(*args, **kw)
            rises.append(meter.result().device_peak_bytes)

        model.optimizer.apply = metered
        model.train_on_batch(x, x)
        with optimizers.keras_own_updates():
            model.train_on_batch(x, x)
        local = sum(v.value.to_local().numel() * v.value.element_size() for v in model.trainable_weights)
        out[name] = {"chunked": rises[0], "keras_own": rises[1], "local_bytes": local,
                     "bound": optimizers.scratch_bound_bytes(model.optimizer, local)}
    return out


def optimizer_world() -> dict:
    """Everything the optimizer tests read, from one spawn."""
    return {"compare": compare_updates(), "scratch": update_scratch()}
