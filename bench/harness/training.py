"""The train step the harness measures: the one users run, chosen by options.

`TrainConfig` says which: a Keras optimizer (``sgd``: SGD with momentum 0.9; ``adamw``), a
dtype policy (``float32``; ``mixed_bfloat16``: float32 variables, bfloat16 compute;
``bfloat16``: bfloat16 variables), activation checkpointing (``remat``: ``none`` or ``full``,
every block rematerialized in backward), the sequence length and the global batch (split over
the data axis of a ("batch", "model") mesh by shardimpl's train step; whole on every rank of a
one-axis mesh).

The step is Keras' own: ``model.train_step((x, y))`` after ``model.compile`` with that
optimizer and the family's loss (sparse cross-entropy over the vocabulary for the language
models, mean squared error for the mlp), so the step a rank runs is what ``fit`` runs per
batch (shardimpl's trainer hooks included), minus the data pipeline.

`state_bytes_per_param` is the per-parameter model state such a step keeps between steps
(weights + gradients + optimizer slots): ZeRO's 16 bytes for AdamW in mixed precision
(Rajbhandari et al. 2020, Table 1: 2 + 2 + 12; Keras realizes it as float32 weights 4,
float32 gradients 4 and two float32 moments 8).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass

os.environ.setdefault("KERAS_BACKEND", "torch")

from bench.harness.families import BATCH, HUB, SEQ  # noqa: E402

__all__ = ["TrainConfig", "OPTIMIZERS", "PRECISIONS", "REMATS", "DEFAULT", "state_bytes_per_param", "variable_itemsize",
           "check_supported", "make_optimizer", "make_loss",
           "dtype_policy", "compile_model", "train_data", "train_step", "model_state_bytes"]

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("float32", "mixed_bfloat16", "bfloat16")
REMATS = ("none", "full")
_SLOTS = {"sgd": 1, "adamw": 2}  # momentum; first and second moments


@dataclass(frozen=True)
class TrainConfig:
    """Which train step: optimizer, dtype policy, remat, sequence length, global batch."""

    optimizer: str = "adamw"
    precision: str = "float32"
    remat: str = "none"
    seq: int = SEQ
    batch: int = BATCH

    def __post_init__(self):
        for name, value, choices in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("precision", self.precision, PRECISIONS), ("remat", self.remat, REMATS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}. Received: {name}={value!r}.")
        for name, value in (("seq", self.seq), ("batch", self.batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}.")

    def as_row(self) -> dict:
        return asdict(self)


DEFAULT = TrainConfig()


def check_supported(family: str, config: TrainConfig) -> None:
    """ValueError for a combination Keras itself cannot train (checked before any rank starts)."""
    if family == "mlp" and config.remat == "full" and config.precision == "mixed_bfloat16":
        raise ValueError(
            "--remat full with --precision mixed_bfloat16 cannot train the mlp family: Keras' RematScope "
            "recomputes a Dense layer's call outside the layer's autocast scope, so the recomputed values "
            "differ in dtype (torch.utils.checkpoint raises CheckpointError; stock Keras too). Use "
            "--precision float32 or bfloat16 for the mlp, or the transformer family (its blocks are "
            "rematerialized whole).")


def variable_itemsize(config: TrainConfig) -> int:
    """Bytes per parameter of the variables (bfloat16 policy: 2; float32 and mixed: 4)."""
    return 2 if config.precision == "bfloat16" else 4


def state_bytes_per_param(config: TrainConfig) -> int:
    """Weights + gradients + optimizer slots per parameter, all in the variables' dtype
    (16 for AdamW in float32 or mixed_bfloat16, 12 for SGD with momentum, half in bfloat16)."""
    return variable_itemsize(config) * (2 + _SLOTS[config.optimizer])


@contextlib.contextmanager
def dtype_policy(config: TrainConfig):
    """Keras' global dtype policy set to ``config.precision`` for the block (models are built
    inside it), the previous one restored after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def make_optimizer(config: TrainConfig):
    """The config's Keras optimizer: SGD(1e-3, momentum 0.9) or AdamW(1e-4, weight decay 0.01)."""
    import keras

    if config.optimizer == "sgd":
        return keras.optimizers.SGD(1e-3, momentum=0.9)
    return keras.optimizers.AdamW(1e-4, weight_decay=0.01)


def make_loss(family: str):
    """The family's loss: mean squared error (mlp), else sparse cross-entropy over the logits."""
    import keras

    if family == "mlp":
        return keras.losses.MeanSquaredError()
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compile_model(model, family: str, config: TrainConfig) -> None:
    """``model.compile`` with the config's optimizer and the family's loss (no metrics)."""
    extra = {"weighted_metrics": []} if family in HUB else {}
    model.compile(optimizer=make_optimizer(config), loss=make_loss(family), **extra)


def train_data(family: str, param_bytes, config: TrainConfig, seed: int = 0):
    """(inputs, targets) of one global batch, the same on every rank."""
    from bench.harness.families import sample_batch, sample_targets

    shape = {"batch": config.batch, "seq": config.seq}
    return sample_batch(family, param_bytes, seed, **shape), sample_targets(family, param_bytes, seed, **shape)


def _to_device(data, device):
    from keras.src import tree

    return tree.map_structure(lambda t: t.to(device) if hasattr(t, "to") else t, data)


def train_step(model, data, device: str = "cpu") -> None:
    """One Keras train step on ``data`` = (inputs, targets): forward, loss, backward, the
    optimizer's update (the step ``fit`` runs per batch)."""
    model.train_step(_to_device(data, device))


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def model_state_bytes(model) -> dict:
    """This rank's model state after a step, measured: weights, their gradients (kept until
    the next step's forward ends, as Keras' torch trainer does) and the optimizer's slots."""
    weights = sum(_local_bytes(v.value) for v in model.weights)
    grads = sum(_local_bytes(v.value.grad) for v in model.trainable_weights if v.value.grad is not None)
    slots = sum(_local_bytes(v.value) for v in getattr(model.optimizer, "variables", ()) if len(v.shape) > 0)
    return {"weight_bytes": weights, "grad_bytes": grads, "slot_bytes": slots,
            "model_state_bytes": weights + grads + slots}
