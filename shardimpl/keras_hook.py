"""The Keras hook: make `keras.distribution` drive shardimpl on Keras' torch backend.

`install()` patches, and `uninstall()` restores:

* Keras' distribution backend (`shardimpl.keras_backend`): `list_devices`,
  `initialize`, `DeviceMesh`, `LayoutMap`, `ModelParallel`, `distribute_tensor`;
* variable creation (this module): under a distribution each variable's
  layout comes from `distribution.get_variable_layout(variable)` (the
  LayoutMap, or replicated when unmatched) and its value is a DTensor holding
  only this rank's shard, made by `shardimpl.distribute_variable`;
* the trainer's steps and data loading (`shardimpl.keras_steps`);
* array conversion, assignment and saving (`shardimpl.keras_saving`).

It also registers shardimpl's DTensor sharding rules (`shardimpl.dtensor_rules`),
which stay. With no distribution set Keras behaves as stock. Supported: keras
3.15.x and keras-nightly 3.16.dev; other versions are refused.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

__all__ = ["install", "uninstall", "installed", "is_installed", "SUPPORTED_KERAS"]

SUPPORTED_KERAS = ("3.15.", "3.16.")
_saved: dict = {}


def _check_version():
    import keras

    version = keras.__version__
    if not version.startswith(SUPPORTED_KERAS):
        raise RuntimeError(
            f"shardimpl supports keras 3.15.x and keras-nightly 3.16.dev; found keras {version}. "
            "Install keras==3.15.* or keras-nightly, or pin shardimpl to a release that supports it."
        )
    if keras.backend.backend() != "torch":
        raise RuntimeError(
            f"shardimpl hooks Keras' torch backend, but Keras runs on {keras.backend.backend()!r}. "
            "Set KERAS_BACKEND=torch before importing keras."
        )


def _sharded_layout(variable):
    from keras.src.distribution import distribution_lib

    distribution = distribution_lib.distribution()
    if distribution is None:
        return None
    return distribution.get_variable_layout(variable)


def _sharded_parameter(value, trainable: bool) -> torch.nn.Parameter:
    """Wrap a DTensor as a Parameter whose gradient keeps the parameter's own layout.

    DTensor's backward may return a gradient as Partial(sum) or on another
    dim; reducing it to the parameter's placements right away keeps grads (and
    the optimizer slots built from them) sharded like the variable.
    """
    param = torch.nn.Parameter(value, requires_grad=trainable)
    if trainable:
        mesh, placements = value.device_mesh, value.placements

        def _to_param_layout(grad):
            if getattr(grad, "placements", placements) == placements:
                return grad
            from shardimpl.reshard import can_reshard_p2p, reshard_p2p

            if can_reshard_p2p(grad, placements):
                return reshard_p2p(grad, placements)  # gloo's all-to-all would gather it all
            return grad.redistribute(mesh, placements)

        param.register_hook(_to_param_layout)
    return param


def _make_initialize_with_initializer(original):
    def _initialize_with_initializer(self, initializer):
        layout = _sharded_layout(self)
        if layout is None:
            return original(self, initializer)
        from shardimpl.create import distribute_variable

        value = distribute_variable(initializer, layout, shape=self._shape, dtype=self._dtype, name=self.path)
        self._layout = layout  # optimizer slots made from this variable take the same layout
        self._value = _sharded_parameter(value, self.trainable)

    return _initialize_with_initializer


def _make_initialize(original):
    def _initialize(self, value):
        if isinstance(value, torch.nn.Parameter):
            return original(self, value)
        if self._shape is None:  # Keras sets it from the value right after; layouts need it now
            self._shape = tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))
        layout = _sharded_layout(self)
        if layout is None:
            return original(self, value)
        from shardimpl.create import distribute_variable

        if not isinstance(value, torch.Tensor):
            value = np.asarray(value)
        sharded = distribute_variable(value, layout, dtype=self._dtype, name=self.path)
        self._layout = layout
        self._value = _sharded_parameter(sharded, self.trainable)

    return _initialize


def torch_core():
    """Keras' torch backend core module: ``backend/torch/core.py`` (3.15) or ``ops/core.py`` (3.16)."""
    import importlib

    try:
        return importlib.import_module("keras.src.backend.torch.core")
    except ImportError:
        return importlib.import_module("keras.src.backend.torch.ops.core")


def torch_trainer_class():
    """Keras' torch trainer class: ``TorchTrainer`` (3.15) or ``Trainer`` (3.16)."""
    from keras.src.backend.torch import trainer

    return getattr(trainer, "TorchTrainer", None) or trainer.Trainer


def _make_validate_axes(original):
    """Let a TensorLayout entry name several mesh axes, e.g. ``(("batch", "model"), None)``."""

    def _validate_axes(self):
        if self._device_mesh:
            valid = set(self._device_mesh.axis_names)
            named = {a for e in self._axes if e is not None for a in ((e,) if isinstance(e, str) else e)}
            if named - valid:
                raise ValueError(
                    f"Invalid axis names for Layout. Valid axis names: {valid}, Got {named - valid}. "
                    "Each entry is None, a mesh axis name, or a tuple of mesh axis names."
                )

    return _validate_axes


def _creation_patches():
    from keras.src import backend as keras_backend_pkg
    from keras.src.distribution import distribution_lib as keras_dist

    core = torch_core()

    from shardimpl import keras_backend

    return [
        (keras_dist, "distribution_lib", lambda _: keras_backend),
        (keras_backend_pkg, "distribution_lib", lambda _: keras_backend),
        (core.Variable, "_initialize_with_initializer", _make_initialize_with_initializer),
        (core.Variable, "_initialize", _make_initialize),
        (keras_dist.TensorLayout, "_validate_axes", _make_validate_axes),
    ]


def install() -> None:
    """Route Keras' torch backend through shardimpl (idempotent).

    Patches, each undone by `uninstall`: the distribution backend, variable
    creation (this module), the trainer's steps and data loading
    (`shardimpl.keras_steps`), array conversion, assignment and saving
    (`shardimpl.keras_saving`).
    """
    if _saved:
        return
    _check_version()
    from shardimpl import keras_saving, keras_steps
    from shardimpl.dtensor_rules import register_rules

    register_rules()

    for owner, name, factory in _creation_patches() + keras_steps.patches() + keras_saving.patches():
        original = getattr(owner, name, None)
        _saved[(id(owner), name)] = (owner, name, name in vars(owner), original)
        setattr(owner, name, factory(original))


def uninstall() -> None:
    """Restore stock Keras (idempotent)."""
    for owner, name, had_own, original in reversed(list(_saved.values())):
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)
    _saved.clear()


def is_installed() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def installed():
    """``with shardimpl.installed(): ...``: the hook for one block (tests)."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
