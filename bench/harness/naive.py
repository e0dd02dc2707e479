"""The ``naive`` mode: the obvious fix, measured beside shardimpl.

Build each full variable with stock Keras on the host, keep this rank's slice, free the rest.
It runs through shardimpl's Keras hook with the creation step swapped for
`naive_distribute_variable`, so training, gathering and saving are identical and only creation
differs.
"""

from __future__ import annotations

__all__ = ["naive_distribute_variable", "use_naive_creation"]

_SHARDIMPL = {}  # shardimpl's own creation step, kept when the naive one replaces it


def naive_distribute_variable(value, layout, *, shape=None, dtype=None, name=None):
    """Full tensor on the host with stock Keras, then this rank's slice; the full tensor is freed."""
    import keras
    import torch

    if isinstance(value, (str, dict)) or callable(value) and not isinstance(value, torch.Tensor):
        init = keras.initializers.get(value) if isinstance(value, (str, dict)) else value
        with keras.device("cpu"):
            full = init(tuple(shape), dtype=dtype)
        out = _SHARDIMPL["distribute_variable"](torch.as_tensor(full), layout, dtype=dtype, name=name)
        del full
        return out
    return _SHARDIMPL["distribute_variable"](value, layout, shape=shape, dtype=dtype, name=name)


def use_naive_creation() -> None:
    """Swap shardimpl's creation step for the naive one in this process (a rank of mode "naive")."""
    from shardimpl import create

    _SHARDIMPL.setdefault("distribute_variable", create.distribute_variable)
    create.distribute_variable = naive_distribute_variable
