"""DTensor sharding rules that keep gradients sharded (active only while shardimpl is installed).

DTensor picks, per op, the placement strategy with the least communication; it
does not weigh memory. For the embedding's backward that choice is a weight
gradient that is ``Partial`` and *full-size* on every rank (then reduced), when
the gradient could be produced already column-sharded by reduce-scattering the
activation-sized incoming gradient instead. At 70B parameters on 8 ranks that
is a 111 GB temporary per rank. The rules below offer only strategies that keep
a weight gradient no larger than its shard: for the embedding's backward
(plus, when the token ids are split over a batch axis, the batch-split one,
whose Partial is the data-parallel sum), and for ``mm``/``bmm`` no Partial or
Replicate result larger than both of its inputs. They change placements, not
results. `shardimpl.install()` writes them into DTensor's sharding-strategy
tables (rows of `shardimpl.keras.patches.patch_table`) and `uninstall()` puts
every table entry back as it was.
"""

from __future__ import annotations

from torch.distributed.tensor import Partial, Replicate, Shard

__all__ = [
    "propagator", "strategy_tables", "clear_sharding_cache",
    "install_embedding_backward_rule", "install_no_oversized_mm_rule",
]


def _embedding_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    rest = [None, None, None]
    out_ndim = len(grad_output.shape)
    strategies = [([Shard(1)], [Shard(out_ndim - 1), Replicate(), *rest])]  # column-sharded weight
    batch_split = {p.dim for p in getattr(indices, "placements", ()) if isinstance(p, Shard)}
    for i in sorted(batch_split):  # indices split over a batch axis: the data-parallel sum
        strategies.append(([Partial()], [Shard(i), Shard(i), *rest]))
    strategies.append(([Replicate()], [Replicate(), Replicate(), *rest]))
    return strategies


def _no_oversized_partial(info):
    """Wrap a single-dim mm/bmm strategy: drop whole-tensor outputs larger than both inputs.

    That case is a weight gradient (x^T @ dy, with few tokens against a wide
    layer): a Partial result is the full weight on every rank, reduced only
    afterwards; without the option DTensor moves the activation-sized inputs
    instead and produces the gradient already sharded.
    """
    import dataclasses
    import math

    original = info.func

    def func(op, args_schema, kwargs_schema):
        strategies = original(op, args_schema, kwargs_schema)
        a, b = (tuple(args_schema[i].shape) for i in (0, 1))
        out_numel = math.prod(a[:-1]) * b[-1]
        if out_numel <= max(math.prod(a), math.prod(b)):
            return strategies
        # Oversized result: only sharded outputs (Partial and Replicate are whole on every rank).
        kept = [st for st in strategies if not isinstance(st[0], (Partial, Replicate))]
        return kept or strategies

    return dataclasses.replace(info, func=func)


def propagator():
    """DTensor's process-wide sharding propagator (the tables the rules are written into)."""
    from torch.distributed.tensor import DTensor

    return DTensor._op_dispatcher.sharding_propagator


def strategy_tables() -> dict:
    """Every dict-valued table of the propagator, by attribute name (what a rule may touch)."""
    prop = propagator()
    return {name: table for name, table in vars(prop).items() if isinstance(table, dict)}


def clear_sharding_cache() -> None:
    """Forget DTensor's cached per-op decisions (made under the previous rules)."""
    cache_clear = getattr(getattr(propagator(), "propagate_op_sharding", None), "cache_clear", None)
    if cache_clear:
        cache_clear()


def install_embedding_backward_rule(op) -> None:
    """``embedding_dense_backward``: offer only gradients no larger than the weight's shard."""
    from torch.distributed.tensor.experimental import register_sharding

    # A built-in single-dim strategy would take precedence over a registered one.
    strategy_tables().get("op_single_dim_strategy_funcs", {}).pop(op, None)
    register_sharding(op)(_embedding_backward)


def install_no_oversized_mm_rule(op) -> None:
    """``mm`` / ``bmm``: the built-in single-dim strategy without oversized whole results."""
    single = strategy_tables().get("op_single_dim_strategy_funcs", {})
    if op in single:
        single[op] = _no_oversized_partial(single[op])
