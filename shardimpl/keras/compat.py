"""Where shardimpl reaches into Keras' private modules, by Keras version (one place).

Supported: keras 3.15.x (`keras`) and keras-nightly 3.16.dev. Every lookup of
a private Keras name goes through a function here and fails loudly, naming
the version and the missing name, when Keras moves it.
"""

from __future__ import annotations

import importlib

__all__ = ["SUPPORTED_KERAS", "check_keras", "torch_core", "torch_nn", "torch_numpy", "torch_trainer_class", "keras_distribution_lib",
           "in_symbolic_scope", "torch_layer_class", "torch_parallel_optimizer_class",
           "torch_parallel_optimizer_classes", "optimizer_slot_lists"]

SUPPORTED_KERAS = ("3.15.", "3.16.")


def check_keras() -> None:
    """Raise unless Keras is a supported version running on its torch backend."""
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


def _moved(what: str, tried) -> RuntimeError:
    import keras

    return RuntimeError(
        f"shardimpl cannot find Keras' {what} in keras {keras.__version__} (looked for {tried}). "
        "This Keras version moved a private name shardimpl relies on; use keras 3.15.x or "
        "keras-nightly 3.16.dev, or report the version."
    )


def torch_core():
    """Keras' torch backend core module: ``backend/torch/core.py`` (3.15) or ``ops/core.py`` (3.16)."""
    tried = ("keras.src.backend.torch.core", "keras.src.backend.torch.ops.core")
    for name in tried:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "Variable") and hasattr(module, "convert_to_numpy"):
            return module
    raise _moved("torch backend core module", tried)


def keras_ops_nn():
    """``keras.src.ops.nn``, whose private ``_rms_normalization`` every RMS normalization calls."""
    module = importlib.import_module("keras.src.ops.nn")
    if not callable(getattr(module, "_rms_normalization", None)):
        raise _moved("RMS normalization (keras.src.ops.nn._rms_normalization)", ("keras.src.ops.nn",))
    return module


def torch_numpy():
    """Keras' torch backend numpy module (``backend/torch/numpy.py``, 3.15; ``ops/numpy.py``, 3.16),
    whose ``repeat`` ``keras.ops.repeat`` calls."""
    tried = ("keras.src.backend.torch.numpy", "keras.src.backend.torch.ops.numpy")
    for name in tried:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "repeat", None)):
            return module
    raise _moved("torch backend numpy module", tried)


def torch_nn():
    """Keras' torch backend nn module (``backend/torch/nn.py``, 3.15; ``ops/nn.py``, 3.16), whose
    ``sparse_categorical_crossentropy`` Keras' losses call."""
    tried = ("keras.src.backend.torch.nn", "keras.src.backend.torch.ops.nn")
    for name in tried:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "sparse_categorical_crossentropy"):
            return module
    raise _moved("torch backend nn module", tried)


def torch_trainer_class():
    """Keras' torch trainer class: ``TorchTrainer`` (3.15) or ``Trainer`` (3.16)."""
    from keras.src.backend.torch import trainer

    cls = getattr(trainer, "TorchTrainer", None) or getattr(trainer, "Trainer", None)
    if cls is None:
        raise _moved("torch trainer class", ("TorchTrainer", "Trainer"))
    return cls


def keras_distribution_lib():
    """``keras.src.distribution.distribution_lib`` (DeviceMesh, TensorLayout, distribution())."""
    from keras.src.distribution import distribution_lib

    return distribution_lib


def in_symbolic_scope() -> bool:
    """True while Keras traces shapes (``compute_output_spec``: symbolic build, Functional graphs)."""
    try:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope as inside
    except ImportError:
        raise _moved("symbolic scope", ("keras.src.backend.common.symbolic_scope.in_symbolic_scope",)) from None
    return inside()


def torch_layer_class():
    """Keras' torch ``TorchLayer`` (``backend/torch/layer.py``, 3.15 and 3.16): the torch Module
    base of every layer; its ``forward`` runs ``call``, ``_track_variables`` registers params."""
    from keras.src.backend.torch import layer

    cls = getattr(layer, "TorchLayer", None)
    if cls is None or not all(hasattr(cls, a) for a in ("forward", "_track_variables", "_post_track_variable")):
        raise _moved("torch layer class", ("TorchLayer.forward", "TorchLayer._track_variables"))
    return cls


#: Keras' torch optimizers whose update is one ``_parallel_update_step`` over all variables
#: (``keras/src/backend/torch/optimizers/torch_<name>.py``, 3.15): module -> class name.
_PARALLEL_OPTIMIZERS = {"torch_sgd": "SGD", "torch_adam": "Adam", "torch_adamw": "AdamW",
                        "torch_rmsprop": "RMSprop", "torch_adagrad": "Adagrad", "torch_adadelta": "Adadelta",
                        "torch_adamax": "Adamax", "torch_lion": "Lion", "torch_nadam": "Nadam"}


def torch_parallel_optimizer_class():
    """Keras' ``TorchParallelOptimizer`` (``backend/torch/optimizers/torch_parallel_optimizer.py``): the
    base of Keras' torch optimizers; its ``_backend_update_step`` calls ``_parallel_update_step``."""
    try:
        from keras.src.backend.torch.optimizers import torch_parallel_optimizer as module
    except ImportError:
        raise _moved("torch parallel optimizer", ("keras.src.backend.torch.optimizers.torch_parallel_optimizer",)) \
            from None
    cls = getattr(module, "TorchParallelOptimizer", None)
    if cls is None or "_backend_update_step" not in vars(cls):
        raise _moved("torch parallel optimizer", ("TorchParallelOptimizer._backend_update_step",))
    return cls


def torch_parallel_optimizer_classes() -> dict:
    """Keras' torch optimizer classes by name (``"Adam"`` -> ``torch_adam.Adam``), each with its own
    or an inherited ``_parallel_update_step``."""
    out = {}
    for module_name, name in _PARALLEL_OPTIMIZERS.items():
        try:
            module = importlib.import_module(f"keras.src.backend.torch.optimizers.{module_name}")
        except ImportError:
            raise _moved(f"torch optimizer {name}", (f"keras.src.backend.torch.optimizers.{module_name}",)) from None
        cls = getattr(module, name, None)
        if cls is None or not hasattr(cls, "_parallel_update_step"):
            raise _moved(f"torch optimizer {name}", (f"{module_name}.{name}._parallel_update_step",))
        out[name] = cls
    return out


def optimizer_slot_lists(optimizer, names) -> list:
    """The optimizer's per-variable slot lists named ``names`` (``Adam._momentums``, ...), each indexed
    like ``optimizer._get_variable_index``."""
    missing = [n for n in names if not isinstance(getattr(optimizer, n, None), list)]
    if missing:
        raise _moved(f"slot lists of {type(optimizer).__name__}", tuple(missing))
    return [getattr(optimizer, n) for n in names]
