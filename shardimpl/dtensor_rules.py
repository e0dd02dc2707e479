"""DTensor sharding rules that keep gradients sharded (registered by `shardimpl.install()`).

DTensor picks, per op, the placement strategy with the least communication; it
does not weigh memory. For the embedding's backward that choice is a weight
gradient that is ``Partial`` and *full-size* on every rank (then reduced), when
the gradient could be produced already column-sharded by reduce-scattering the
activation-sized incoming gradient instead. At 70B parameters on 8 ranks that
is a 111 GB temporary per rank. The rule below offers only the strategies that
keep the weight gradient no larger than its shard (plus, when the token ids
are split over a batch axis, the batch-split one, whose Partial is the
data-parallel sum). Registration is process-wide and
cannot be undone; it changes placements, not results.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard

__all__ = ["register_rules"]

_registered = False


def _embedding_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    rest = [None, None, None]
    out_ndim = len(grad_output.shape)
    strategies = [([Shard(1)], [Shard(out_ndim - 1), Replicate(), *rest])]  # column-sharded weight
    batch_split = {p.dim for p in getattr(indices, "placements", ()) if isinstance(p, Shard)}
    for i in sorted(batch_split):  # indices split over a batch axis: the data-parallel sum
        strategies.append(([Partial()], [Shard(i), Shard(i), *rest]))
    strategies.append(([Replicate()], [Replicate(), Replicate(), *rest]))
    return strategies


def register_rules() -> None:
    """Register shardimpl's memory-aware rules with DTensor (once per process)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import register_sharding

    op = torch.ops.aten.embedding_dense_backward.default
    propagator = DTensor._op_dispatcher.sharding_propagator
    # A built-in single-dim strategy would take precedence over a registered one.
    getattr(propagator, "op_single_dim_strategy_funcs", {}).pop(op, None)
    register_sharding(op)(_embedding_backward)
    cache_clear = getattr(getattr(propagator, "propagate_op_sharding", None), "cache_clear", None)
    if cache_clear:
        cache_clear()
    _registered = True
