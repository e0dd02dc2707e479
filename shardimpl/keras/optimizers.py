"""Optimizer updates of sharded variables within a bounded scratch, not whole-model temporaries.

Keras 3.15's torch optimizers (``TorchParallelOptimizer``: SGD, Adam, AdamW,
RMSprop, Adagrad, Adadelta, Adamax, Lion, Nadam) update every variable at
once with ``torch._foreach_*`` ops, and each out-of-place one allocates a
temporary as large as all gradients: Adam's update holds three of them at its
peak, so with weights, gradients and two moments (4 x P/N per rank) a step
peaks near 7 x P/N. Stock Keras does the same.

Under `shardimpl.install()`, `wrap_backend_update_step` runs, for the
variables shardimpl created sharded, the same arithmetic on each rank's local
shards (plain tensors: no DTensor dispatch, no collective), in place where the
arithmetic allows, over chunk groups: every variable's local shard (and its
gradient and slots) is seen flat and cut into pieces, and the pieces are
grouped so that a group holds at most `chunk_bytes` of variables. The
``_foreach`` temporaries then never exceed ``rule.temporaries x chunk_bytes``
(`scratch_bound_bytes`), whatever the model's size. The update is elementwise,
so chunking changes no result; each rule does Keras' operations in Keras'
order (tests compare with Keras' own update).

Keras' own path still runs for what is not covered: an optimizer class whose
update rule is not one of Keras' nine (a subclass that overrides
``_parallel_update_step``, or any other optimizer), no distribution, variables
not created sharded, and variables whose gradient or slots are not laid out
like the variable (for Nadam, whose update also advances a shared product
once per step, any such variable sends the whole step to Keras' path), and
everything inside `keras_own_updates()`. Weight decay (AdamW's
``_apply_weight_decay``, an in-place ``_foreach_mul_``), gradient clipping,
loss scaling, gradient accumulation and EMA are Keras' own code before and
after this step and unchanged. docs/optimizer-memory.md has the measurements.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.tensor import DTensor

from shardimpl.keras.compat import optimizer_slot_lists, torch_parallel_optimizer_classes
from shardimpl.keras.variables import is_sharded_variable

__all__ = ["wrap_backend_update_step", "keras_own_updates", "chunk_bytes", "chunk_groups", "scratch_bound_bytes",
           "rule_for", "MIN_CHUNK_BYTES", "MAX_CHUNK_BYTES", "CHUNKS_PER_UPDATE"]

MiB = 1 << 20
#: A group holds about 1/CHUNKS_PER_UPDATE of the rank's variables in the update ...
CHUNKS_PER_UPDATE = 16
#: ... but never less than this (smaller pieces cost dispatch time, not memory worth saving) ...
MIN_CHUNK_BYTES = MiB // 4
#: ... nor more than this (a larger group is no faster: each op is bandwidth-bound).
MAX_CHUNK_BYTES = 64 * MiB


def chunk_bytes(update_bytes: int) -> int:
    """Bytes of variables one group holds, for an update of ``update_bytes`` of local variables."""
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, update_bytes // CHUNKS_PER_UPDATE))


def scratch_bound_bytes(optimizer, update_bytes: int) -> int:
    """The most temporary bytes the chunked update of ``optimizer`` holds at once (0 if not covered)."""
    rule = rule_for(optimizer)
    return 0 if rule is None else rule.temporaries * chunk_bytes(update_bytes)


def chunk_groups(sizes: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int, int]]]:
    """Cut flat tensors into groups of pieces, each group at most ``limit`` bytes.

    ``sizes``: (numel, itemsize) per tensor. Returns groups of (tensor index,
    start, stop) element ranges, covering every element once, in order.
    """
    groups, group, room = [], [], limit
    for index, (numel, itemsize) in enumerate(sizes):
        start = 0
        while start < numel:
            take = min(numel - start, max(room // itemsize, 1))
            group.append((index, start, start + take))
            start += take
            room -= take * itemsize
            if room < itemsize:
                groups.append(group)
                group, room = [], limit
    if group:
        groups.append(group)
    return groups


# --- the update rules: Keras' arithmetic, in place, on lists of pieces ------------------------


@dataclass(frozen=True)
class _Rule:
    """One Keras optimizer's elementwise update.

    slots: the optimizer's per-variable slot lists the update reads (attribute names).
    scalars: ``(optimizer, learning_rate, dtype) -> dict``, once per step (may update the
        optimizer's own scalar state, as Nadam's product).
    kernel: ``(optimizer, scalars, variables, gradients, *slots)``, lists of pieces, in place.
    temporaries: pieces-lists of scratch the kernel holds at once.
    splittable: False when ``scalars`` has a side effect, so that Keras' path must not run
        for part of the variables in the same step.
    """

    slots: Callable[[object], tuple[str, ...]]
    scalars: Callable
    kernel: Callable
    temporaries: int
    splittable: bool = True


def _plain(x):
    """A Keras variable's or a DTensor's value as a plain tensor (replicated: its local copy, no collective)."""
    x = getattr(x, "value", x) if not isinstance(x, torch.Tensor) else x
    if not isinstance(x, DTensor):
        return x
    return x._local_tensor if all(p.is_replicate() for p in x.placements) else x.full_tensor()


def _cast(x, dtype):
    from keras import ops

    return ops.cast(_plain(x), dtype)


def _step(opt, dtype, ahead: int = 1):
    return _cast(_plain(opt.iterations) + ahead, dtype)


def _lr_only(opt, learning_rate, dtype):
    lr = _cast(learning_rate, dtype)
    return {"lr": lr, "lr_value": float(lr)}  # Keras passes some as a tensor, some as ``alpha=``


def _sgd_kernel(opt, s, var, grad, *slots):
    lr = s["lr_value"]
    if var and var[0].device.type == "cpu":
        # On a CPU each variable's whole update in turn, while its momentum is in cache: the
        # _foreach form (every momentum scaled, then every one added to, ...) went through
        # memory three times; measured 2-3 ms of a 64 MiB mlp step's 28 at N = 2. Same ops,
        # same order per element. Accelerators keep the _foreach form (one launch per op).
        for i, (v, g) in enumerate(zip(var, grad)):
            _sgd_one(opt, lr, v, g, slots[0][i] if slots else None)
        return
    if not slots:
        torch._foreach_add_(var, grad, alpha=-lr)
        return
    (buf,) = slots
    torch._foreach_mul_(buf, opt.momentum)
    torch._foreach_add_(buf, grad, alpha=-lr)
    if opt.nesterov:
        torch._foreach_add_(var, grad, alpha=-lr)
        torch._foreach_add_(var, buf, alpha=opt.momentum)
    else:
        torch._foreach_add_(var, buf)


def _sgd_one(opt, lr, var, grad, buf):
    """`_sgd_kernel`'s update of one variable (Keras' SGD: m = momentum m - lr g; w += m)."""
    if buf is None:
        var.add_(grad, alpha=-lr)
        return
    buf.mul_(opt.momentum).add_(grad, alpha=-lr)
    if opt.nesterov:
        var.add_(grad, alpha=-lr)
        var.add_(buf, alpha=opt.momentum)
    else:
        var.add_(buf)


def _sgd_scalars(opt, learning_rate, dtype):
    return {"lr_value": float(_plain(learning_rate))}  # Keras passes the variable itself as alpha


def _adam_scalars(opt, learning_rate, dtype):
    from keras import ops

    lr = _cast(learning_rate, dtype)
    step = _step(opt, dtype)
    beta_1_power = ops.power(ops.cast(opt.beta_1, dtype), step)
    beta_2_power = ops.power(ops.cast(opt.beta_2, dtype), step)
    return {"alpha": lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)}


def _adam_kernel(opt, s, var, grad, m, v, v_hat=None):
    torch._foreach_mul_(m, opt.beta_1)
    torch._foreach_add_(m, grad, alpha=1 - opt.beta_1)
    torch._foreach_mul_(v, opt.beta_2)
    torch._foreach_add_(v, torch._foreach_mul(grad, grad), alpha=1 - opt.beta_2)
    if v_hat is not None:
        torch._foreach_maximum_(v_hat, v)
        v = v_hat
    step = torch._foreach_mul(m, s["alpha"])
    denominator = torch._foreach_sqrt(v)
    torch._foreach_add_(denominator, opt.epsilon)
    torch._foreach_div_(step, denominator)
    del denominator
    torch._foreach_add_(var, step, alpha=-1)


def _rmsprop_kernel(opt, s, var, grad, velocity, *rest):
    rho = opt.rho
    torch._foreach_mul_(velocity, rho)
    torch._foreach_add_(velocity, torch._foreach_mul(grad, grad), alpha=1 - rho)
    denominator = torch._foreach_add(velocity, opt.epsilon)
    rest = list(rest)
    if opt.centered:
        average = rest.pop()
        torch._foreach_mul_(average, rho)
        torch._foreach_add_(average, grad, alpha=1 - rho)
        torch._foreach_add_(denominator, torch._foreach_mul(average, average), alpha=-1)
    torch._foreach_sqrt_(denominator)
    increment = torch._foreach_mul(grad, s["lr"])
    torch._foreach_div_(increment, denominator)
    del denominator
    if opt.momentum > 0:
        (momentum,) = rest
        torch._foreach_mul_(momentum, opt.momentum)
        torch._foreach_add_(momentum, increment)
        torch._foreach_add_(var, momentum, alpha=-1)
    else:
        torch._foreach_add_(var, increment, alpha=-1)


def _rmsprop_slots(opt):
    return ("_velocities",) + (("_momentums",) if opt.momentum > 0 else ()) + (
        ("_average_gradients",) if opt.centered else ())


def _adagrad_kernel(opt, s, var, grad, accumulator):
    torch._foreach_add_(accumulator, torch._foreach_mul(grad, grad))
    step = torch._foreach_mul(grad, s["lr"])
    denominator = torch._foreach_add(accumulator, opt.epsilon)
    torch._foreach_sqrt_(denominator)
    torch._foreach_div_(step, denominator)
    del denominator
    torch._foreach_add_(var, step, alpha=-1)


def _adadelta_kernel(opt, s, var, grad, accumulated_grad, accumulated_delta):
    rho, eps = opt.rho, opt.epsilon
    torch._foreach_mul_(accumulated_grad, rho)
    torch._foreach_add_(accumulated_grad, torch._foreach_mul(grad, grad), alpha=1 - rho)
    delta = torch._foreach_add(accumulated_delta, eps)
    torch._foreach_sqrt_(delta)  # rms(accumulated_delta)
    torch._foreach_mul_(delta, grad)
    rms_grad = torch._foreach_add(accumulated_grad, eps)
    torch._foreach_sqrt_(rms_grad)
    torch._foreach_div_(delta, rms_grad)
    del rms_grad
    torch._foreach_mul_(delta, -1)
    torch._foreach_mul_(accumulated_delta, rho)
    torch._foreach_add_(accumulated_delta, torch._foreach_mul(delta, delta), alpha=1 - rho)
    torch._foreach_add_(var, delta, alpha=s["lr_value"])


def _adamax_scalars(opt, learning_rate, dtype):
    from keras import ops

    lr = _cast(learning_rate, dtype)
    beta_1_power = ops.power(ops.cast(opt.beta_1, dtype), _step(opt, dtype))
    return {"lr": lr, "bias": 1 - beta_1_power}


def _adamax_kernel(opt, s, var, grad, m, u):
    torch._foreach_mul_(m, opt.beta_1)
    torch._foreach_add_(m, grad, alpha=1 - opt.beta_1)
    torch._foreach_mul_(u, opt.beta_2)
    torch._foreach_maximum_(u, torch._foreach_abs(grad))
    step = torch._foreach_mul(m, s["lr"])
    denominator = torch._foreach_add(u, opt.epsilon)
    torch._foreach_mul_(denominator, s["bias"])
    torch._foreach_div_(step, denominator)
    del denominator
    torch._foreach_add_(var, step, alpha=-1)


def _lion_kernel(opt, s, var, grad, m):
    update = torch._foreach_mul(m, opt.beta_1)
    torch._foreach_add_(update, grad, alpha=1 - opt.beta_1)
    torch._foreach_sign_(update)
    torch._foreach_mul_(update, s["lr"])
    torch._foreach_add_(var, update, alpha=-1)
    del update
    torch._foreach_mul_(m, opt.beta_2)
    torch._foreach_add_(m, grad, alpha=1 - opt.beta_2)


def _nadam_scalars(opt, learning_rate, dtype):
    from keras import ops

    from shardimpl.keras.compat import torch_core

    lr = _cast(learning_rate, dtype)
    decay, beta_1, beta_2 = (ops.cast(x, dtype) for x in (0.96, opt.beta_1, opt.beta_2))
    u_t = beta_1 * (1.0 - 0.5 * ops.power(decay, _step(opt, dtype)))
    u_t_1 = beta_1 * (1.0 - 0.5 * ops.power(decay, _step(opt, dtype, 2)))
    u_product_t = _plain(opt._u_product) * u_t
    u_product_t_1 = u_product_t * u_t_1
    opt._u_product.assign(u_product_t)  # once per step: the rule is not splittable
    numpy = torch_core().convert_to_numpy
    return {"lr": lr, "u_t": u_t, "u_t_1": u_t_1, "m_bias": 1 - numpy(u_product_t_1),
            "g_bias": 1 - numpy(u_product_t), "v_bias": 1 - ops.power(beta_2, _step(opt, dtype))}


def _nadam_kernel(opt, s, var, grad, m, v):
    torch._foreach_mul_(m, opt.beta_1)
    torch._foreach_add_(m, grad, alpha=1 - opt.beta_1)
    torch._foreach_mul_(v, opt.beta_2)
    torch._foreach_add_(v, torch._foreach_mul(grad, grad), alpha=1 - opt.beta_2)
    m_hat = torch._foreach_mul(m, s["u_t_1"])
    torch._foreach_div_(m_hat, s["m_bias"])
    g_part = torch._foreach_mul(grad, 1 - s["u_t"])
    torch._foreach_div_(g_part, s["g_bias"])
    torch._foreach_add_(m_hat, g_part)
    del g_part
    denominator = torch._foreach_div(v, s["v_bias"])  # v_hat
    torch._foreach_sqrt_(denominator)
    torch._foreach_add_(denominator, opt.epsilon)
    torch._foreach_mul_(m_hat, s["lr"])
    torch._foreach_div_(m_hat, denominator)
    del denominator
    torch._foreach_add_(var, m_hat, alpha=-1)


_RULES = {  # Keras' torch optimizer class name -> its rule
    "SGD": _Rule(lambda o: ("momentums",) if o.momentum != 0 else (), _sgd_scalars, _sgd_kernel, 0),
    "Adam": _Rule(lambda o: ("_momentums", "_velocities") + (("_velocity_hats",) if o.amsgrad else ()),
                  _adam_scalars, _adam_kernel, 2),
    "RMSprop": _Rule(_rmsprop_slots, _lr_only, _rmsprop_kernel, 2),
    "Adagrad": _Rule(lambda o: ("_accumulators",), _lr_only, _adagrad_kernel, 2),
    "Adadelta": _Rule(lambda o: ("_accumulated_grads", "_accumulated_delta_vars"), _lr_only,
                      _adadelta_kernel, 2),
    "Adamax": _Rule(lambda o: ("_m", "_u"), _adamax_scalars, _adamax_kernel, 2),
    "Lion": _Rule(lambda o: ("_momentums",), _lr_only, _lion_kernel, 1),
    "Nadam": _Rule(lambda o: ("_momentums", "_velocities"), _nadam_scalars, _nadam_kernel, 2,
                   splittable=False),
}


@functools.lru_cache(maxsize=None)
def _rules_by_update() -> dict:
    """Keras' own ``_parallel_update_step`` functions -> rule (AdamW shares Adam's)."""
    return {cls._parallel_update_step: _RULES[name]
            for name, cls in torch_parallel_optimizer_classes().items() if name in _RULES}


def rule_for(optimizer):
    """The rule for ``optimizer``'s update, or None when its update is not Keras' own."""
    update = getattr(type(optimizer), "_parallel_update_step", None)
    return _rules_by_update().get(update)


# --- which variables the rule takes, and the chunked run ------------------------------------


def _local(value, layout):
    """``value``'s local shard if it is laid out as ``layout`` (a DTensor) and flat-viewable, else None."""
    if not isinstance(value, DTensor):
        return None
    local = value._local_tensor
    if value is not layout and (value.device_mesh != layout.device_mesh
                                or tuple(value.placements) != tuple(layout.placements)
                                or local.shape != layout._local_tensor.shape):
        return None
    return local if local.is_contiguous() else None


def _taken(optimizer, slot_lists, grad, variable):
    """(variable, gradient, *slots) local shards for the chunked update, or None for Keras' path."""
    if not is_sharded_variable(variable):
        return None
    value = variable._value  # what ``value`` reads outside a layer call (no autocast in an update)
    if not isinstance(value, DTensor):
        return None
    index = optimizer._get_variable_index(variable)
    slots = [slot_list[index] for slot_list in slot_lists]
    if any(s is None for s in slots):
        return None
    tensors = [_local(value, value), _local(grad, value)] + [_local(getattr(s, "_value", None), value) for s in slots]
    if any(t is None for t in tensors) or len({t.dtype for t in tensors}) != 1:
        return None
    return tensors


def _run_chunked(optimizer, rule, scalars, taken: list[list[torch.Tensor]]) -> None:
    sizes = [(t[0].numel(), t[0].element_size()) for t in taken]
    update_bytes = sum(n * itemsize for n, itemsize in sizes)
    # A rule without temporaries (SGD) needs no chunks: one group, the fewest calls.
    limit = chunk_bytes(update_bytes) if rule.temporaries else max(update_bytes, 1)
    for group in chunk_groups(sizes, limit):
        columns = [[_piece(taken[i][k], a, b, sizes[i][0]) for i, a, b in group] for k in range(len(taken[0]))]
        rule.kernel(optimizer, scalars, *columns)


def _piece(tensor: torch.Tensor, start: int, stop: int, numel: int) -> torch.Tensor:
    """Elements ``start:stop`` of ``tensor`` read flat; the tensor itself when that is all of it
    (no view and slice op per variable per step: 180 ATen calls a step for the transformer's 30)."""
    return tensor if start == 0 and stop == numel else tensor.view(-1)[start:stop]


_state = {"keras_own": 0}


@contextlib.contextmanager
def keras_own_updates():
    """Inside the block, Keras' own update (whole-model ``_foreach`` ops) runs for sharded variables
    too: the reference that tests and benchmarks compare the chunked update with."""
    _state["keras_own"] += 1
    try:
        yield
    finally:
        _state["keras_own"] -= 1


def wrap_backend_update_step(original):
    """``TorchParallelOptimizer._backend_update_step``: sharded variables updated chunk by chunk.

    No collective (each rank updates its own shards; replicated scalars are read locally).
    Allocates, on the variables' device, at most `scratch_bound_bytes` at a time.
    """

    @functools.wraps(original)
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        rule = None if _state["keras_own"] else rule_for(self)
        if rule is None or not any(is_sharded_variable(v) for v in trainable_variables):
            return original(self, grads, trainable_variables, learning_rate)
        slot_lists = optimizer_slot_lists(self, rule.slots(self))
        with torch.no_grad():
            taken = [_taken(self, slot_lists, g, v) for g, v in zip(grads, trainable_variables)]
            rest = [i for i, t in enumerate(taken) if t is None]
            if len(rest) == len(taken) or (rest and not rule.splittable):
                return original(self, grads, trainable_variables, learning_rate)
            if rest:  # Keras' own update for the variables the rule cannot take
                original(self, [grads[i] for i in rest], [trainable_variables[i] for i in rest], learning_rate)
            dtype = trainable_variables[0].value.dtype  # as Keras: the first variable's, for the scalars
            scalars = rule.scalars(self, learning_rate, dtype)
            _run_chunked(self, rule, scalars, [t for t in taken if t is not None])

    return _backend_update_step
