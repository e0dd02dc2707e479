"""Keras' losses on vocabulary-split logits, computed on each rank's block.

Keras' torch ``sparse_categorical_crossentropy`` moves the class dim to dim 1 and calls
``torch.nn.functional.cross_entropy``; on logits a vocabulary-split LM head left split along
the vocabulary, DTensor all-gathers them whole on every rank first (batch x sequence x
vocabulary floats, forward and backward). Under a distribution, with ``from_logits=True`` on
the last axis and logits `shardimpl.vocab_parallel.vocab_axis` accepts, the loss per position
comes from `shardimpl.vocab_parallel.cross_entropy` instead (three all-reduces of one float per
position; the local block only). Everything else goes to Keras' own function.

Keras' mean squared and mean absolute errors (``"mse"``, ``"mae"``, their classes) on such logits
come from `shardimpl.vocab_parallel.mean_over_vocabulary` (one all-reduce of one float per
position) instead of a dozen DTensor dispatches forward and backward.

Either way, where the loss per position comes out replicated on every rank (no other axis splits
the logits), it is handed back as its local tensor: Keras' reduction, the loss tracker and
backward then run in plain torch (`shardimpl.keras.local_scoring`'s reasoning).
"""

from __future__ import annotations

import functools

from torch.distributed.tensor import DTensor

from shardimpl import vocab_parallel
from shardimpl.keras.active import current_distribution
from shardimpl.local_views import to_local

__all__ = ["wrap_sparse_categorical_crossentropy", "wrap_loss_function_call", "ELEMENTWISE_LOSSES"]


def _local_if_replicated(x):
    if isinstance(x, DTensor) and all(p.is_replicate() for p in x.placements):
        return to_local(x)
    return x


def wrap_sparse_categorical_crossentropy(original):
    @functools.wraps(original)
    def sparse_categorical_crossentropy(target, output, from_logits=False, axis=-1):
        if (current_distribution() is None or not from_logits or vocab_parallel.vocab_axis(output) is None
                or axis not in (-1, output.dim() - 1)):
            return original(target, output, from_logits=from_logits, axis=axis)
        if target.dim() == output.dim() and target.shape[-1] == 1:  # as Keras: (..., 1) ids
            target = target.squeeze(-1)
        if tuple(target.shape) != tuple(output.shape[:-1]):
            return original(target, output, from_logits=from_logits, axis=axis)  # Keras' own error
        return _local_if_replicated(vocab_parallel.cross_entropy(output, target))

    return sparse_categorical_crossentropy


def _squared(target, output):
    difference = target - output
    return difference * difference


def _absolute(target, output):
    return (target - output).abs()


#: Keras' loss functions (by name in ``keras.src.losses.losses``) that are a mean over the last
#: axis of an elementwise term, with that term on local blocks.
ELEMENTWISE_LOSSES = {"mean_squared_error": _squared, "mean_absolute_error": _absolute}


@functools.lru_cache(maxsize=None)
def _elementwise_terms() -> dict:
    from keras.src.losses import losses as keras_losses

    return {getattr(keras_losses, name): term for name, term in ELEMENTWISE_LOSSES.items()}


def wrap_loss_function_call(original):
    """LossFunctionWrapper.call: Keras' mean squared / absolute error of vocabulary-split logits
    from each rank's block (module docstring); any other function, layout or shape: Keras'."""

    @functools.wraps(original)
    def call(self, y_true, y_pred):
        term = _elementwise_terms().get(self.fn)
        if (term is None or self._fn_kwargs or current_distribution() is None or vocab_parallel.vocab_axis(y_pred) is None
                or not y_pred.dtype.is_floating_point or tuple(getattr(y_true, "shape", ())) != tuple(y_pred.shape)):
            return original(self, y_true, y_pred)
        return _local_if_replicated(vocab_parallel.mean_over_vocabulary(term, y_pred, y_true))

    return call
