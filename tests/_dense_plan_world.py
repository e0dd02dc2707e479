"""Rank-side checks of `shardimpl.keras.dense_plan`: a sharded Dense call with its decisions kept
gives what the full path gives, and is not taken once what it was made from changed."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")


def _model(seed):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,), batch_size=8)
    h = keras.layers.Dense(32, activation="relu", name="col")(inputs)  # column-split, bias split
    h = keras.layers.Dense(16, name="row")(h)                          # row-split with a bias: summed
    out = keras.layers.Dense(16, use_bias=False, name="row_nobias")(keras.layers.Dense(32, activation="silu", name="col2")(h))
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9), loss="mse")
    return model


def plans_match_the_full_path(steps=3):
    """Two identical models trained side by side, one with plans, one without: per-step losses,
    final weights (bitwise), how many calls took a plan; then a changed activation and a new
    batch size, which must not take the old plan."""
    import keras
    import numpy as np

    import shardimpl
    from shardimpl.keras import dense_plan

    shardimpl.install()
    mesh = keras.distribution.DeviceMesh((2,), ["model"], keras.distribution.list_devices())
    lm = keras.distribution.LayoutMap(mesh)
    lm["col.*/kernel"] = (None, "model")
    lm["col/bias"] = ("model",)
    lm["col2/bias"] = ("model",)
    lm["row.*/kernel"] = ("model", None)
    lm["row_nobias/output"] = (None, None)  # laid out: its Partial output is reduced by Keras' relayout
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 16)).astype("float32"), rng.normal(size=(8, 16)).astype("float32")

    import sys

    real, real_fast = dense_plan.planned, dense_plan.fast_call
    hits, fast = [], []

    def counted(layer, inputs):
        plan = real(layer, inputs)
        if sys._getframe(1).f_code.co_name != "fast_call":  # a fast call's hit is counted below
            hits.append((layer.name, plan is not None))
        return plan

    def fast_counted(layer, args, kwargs):
        out = real_fast(layer, args, kwargs)
        if isinstance(layer, keras.layers.Dense) and dense_plan.planned is counted:
            fast.append((layer.name, out is not None))
            if out is not None:  # else the layer's call asks for its plan again, counted there
                hits.append((layer.name, True))
        return out

    dense_plan.fast_call = fast_counted

    planned_model, full_model = _model(1), _model(2)
    full_model.set_weights(planned_model.get_weights())
    losses = {"planned": [], "full": []}
    for _ in range(steps):
        dense_plan.planned = counted
        losses["planned"].append(float(planned_model.train_on_batch(x, y)))
        dense_plan.planned = lambda layer, inputs: None
        losses["full"].append(float(full_model.train_on_batch(x, y)))
    dense_plan.planned = counted
    out = {"losses_equal": losses["planned"] == losses["full"],
           "weights_equal": all(np.array_equal(a, b) for a, b in zip(planned_model.get_weights(), full_model.get_weights())),
           # The last step's calls: the first layer reads the plain batch, the others DTensors.
           "last_step": hits[-4:],
           # Keras' Layer.__call__ skipped for the planned calls, but where the output is laid out.
           "last_step_fast": fast[-4:]}

    # A changed activation: the old plan must not run (the output follows the new activation).
    planned_model.get_layer("col2").activation = keras.activations.get("tanh")
    full_model.get_layer("col2").activation = keras.activations.get("tanh")
    hits.clear()
    a = [planned_model.predict_on_batch(x) for _ in range(2)]  # the second call runs the new plan
    dense_plan.planned = lambda layer, inputs: None
    b = full_model.predict_on_batch(x)
    dense_plan.planned = counted
    out["changed_activation_equal"] = all(bool(np.array_equal(one, b)) for one in a)
    out["changed_activation_call_missed"] = hits[:4] == [("col", True), ("row", True), ("col2", False), ("row_nobias", True)]
    out["changed_activation_replanned"] = hits[4:8] == [("col", True), ("row", True), ("col2", True), ("row_nobias", True)]
    # A kernel DTensor replaced by another object (its values doubled): not the planned one.
    import torch

    for model in (planned_model, full_model):
        variable = model.get_layer("row_nobias")._kernel
        variable._value = torch.nn.Parameter(variable._value.detach() * 2)
    hits.clear()
    a = planned_model.predict_on_batch(x)
    dense_plan.planned = lambda layer, inputs: None
    b = full_model.predict_on_batch(x)
    dense_plan.planned = counted
    out["replaced_kernel_equal"] = bool(np.array_equal(a, b))
    out["replaced_kernel_missed"] = hits[3] == ("row_nobias", False)
    # Another batch size: another input shape, no plan taken for it at first.
    hits.clear()
    planned_model.predict_on_batch(x[:4])
    out["new_shape_second_layer_missed"] = hits[1] == ("row", False)
    # A plain input that needs a gradient (a custom loop's) never takes a plan: its gradient must
    # reach it through the replicated DTensor the full path makes of it.
    from shardimpl.keras.context import step_context

    layer = planned_model.get_layer("col")
    hits.clear()
    grads = []
    for _ in range(2):
        xr = torch.tensor(x, requires_grad=True)
        with step_context():
            layer(xr).to_local().sum().backward()
        grads.append(xr.grad)
    out["grad_input_never_planned"] = hits == [("col", False), ("col", False)]
    out["grad_input_gets_its_gradient"] = all(g is not None and bool(torch.equal(g, grads[0])) for g in grads)
    return out
