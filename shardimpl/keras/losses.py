"""Keras' sparse cross-entropy on vocabulary-split logits, computed on each rank's block.

Keras' torch ``sparse_categorical_crossentropy`` moves the class dim to dim 1 and calls
``torch.nn.functional.cross_entropy``; on logits a vocabulary-split LM head left split along
the vocabulary, DTensor all-gathers them whole on every rank first (batch x sequence x
vocabulary floats, forward and backward). Under a distribution, with ``from_logits=True`` on
the last axis and logits `shardimpl.vocab_parallel.vocab_axis` accepts, the loss per position
comes from `shardimpl.vocab_parallel.cross_entropy` instead (three all-reduces of one float per
position; the local block only). Everything else goes to Keras' own function.
"""

from __future__ import annotations

import functools

from shardimpl import vocab_parallel
from shardimpl.keras.active import current_distribution

__all__ = ["wrap_sparse_categorical_crossentropy"]


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
        return vocab_parallel.cross_entropy(output, target)

    return sparse_categorical_crossentropy
