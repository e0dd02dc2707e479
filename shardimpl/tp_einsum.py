"""A sharded layer's einsum run on local tensors, with exactly the collectives its layouts imply.

Left to DTensor, a tensor-parallel layer's matmul costs several dispatches forward and, in
backward, sharding propagation picks its own layouts for the gradients: on the transformer it
reduce-scattered residual-stream gradients along the width and gathered them back (11 + 4
collectives per step that a hand-written step does not issue). `local_einsum` instead runs
``torch.einsum`` on the local blocks and wraps the result in the DTensor layout that the
operands' placements imply, per mesh axis (Megatron's rules, Shoeybi et al. 2019):

=======================  =====================  =======================  =================================
kernel                   input                  output                   backward
=======================  =====================  =======================  =================================
Replicate                Replicate              Replicate                nothing
Replicate                Shard(a batch dim)     Shard(that dim)          kernel gradient Partial (reduced
                                                                         where the variable's layout says)
Shard(an output dim)     Replicate              Shard(that output dim)   one all-reduce of the input's
 (column-parallel)                                                       gradient on that axis (Megatron's f)
Shard(the contracted     Shard(the contracted   Partial                  nothing (the output's reduction is
 dim) (row-parallel)      dim)                                           the caller's: the layer's output
                                                                         layout or DTensor, once)
=======================  =====================  =======================  =================================

An einsum of two activations (attention's scores and weighted values, in keras-hub's Gemma and
Keras' MultiHeadAttention) that both split along the same letter, which the output keeps (the
heads, the batch), is independent per slice of that letter: `local_batched_einsum` runs it on the
local blocks with no collective forward or backward (DTensor decomposed it into a dozen
dispatches forward and as many backward).

Before the table, the input is settled: a Partial(sum) input is summed once (one all-reduce,
shared by the layers reading it), and a whole input of a kernel split along the contracted dim
is cut to this rank's block (its gradient all-gathered backward). Any other combination (a
Partial kernel, two axes on one dim, an ellipsis) returns None and the caller runs DTensor's
own einsum: the rules above are the only ones taken on trust.
Memory: the local output block only; nothing is gathered.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from shardimpl.fsdp import is_gathered, local_saves
from shardimpl.local_views import from_local, sum_partial, to_local

__all__ = ["local_einsum", "local_einsum_parts", "local_contract", "dense_equation", "local_batched_einsum"]


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward, the gradient summed over each of ``groups`` (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        for group in ctx.groups:
            dist.all_reduce(grad, group=group)
        return grad, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward, the gradient made contiguous: einsum's backward hands back
    permuted views, and DTensor's view rules, running on what they become, need contiguous
    local blocks (a reshape's backward failed on a (batch, model) mesh)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def dense_equation(ndim: int) -> str | None:
    """Dense's ``matmul(x, kernel)`` as an einsum: '...k,kn->...n' with named batch dims."""
    if not 2 <= ndim <= 8:
        return None
    batch = "abcdefg"[: ndim - 1]
    return f"{batch}y,yz->{batch}z"


@functools.lru_cache(maxsize=1024)
def _letters(equation: str):
    """(input letters, kernel letters, output letters) of a two-operand einsum without an
    ellipsis, or None. Cached: a model has a few equations, called every step."""
    if "." in equation or "->" not in equation or equation.count("->") != 1:
        return None
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    return parts[0], parts[1], out


def _operand_letters(equation: str, a_ndim: int, b_ndim: int):
    """`_letters`, where each operand has one letter per dim and no letter twice; else None."""
    letters = _letters(equation)
    if letters is None:
        return None
    xs, ws, _ = letters
    if len(xs) != a_ndim or len(ws) != b_ndim or len(set(xs)) != len(xs) or len(set(ws)) != len(ws):
        return None
    return letters


def _plan(equation: str, x: DTensor, w: DTensor):
    """Output placements, the input's and kernel's gradient placements and the axes whose input
    gradient is all-reduced (tuples); None where the table in the module docstring has no row."""
    return _plan_for(equation, x.ndim, w.ndim, tuple(x.placements), tuple(w.placements))


@functools.lru_cache(maxsize=4096)
def _plan_for(equation: str, x_ndim: int, w_ndim: int, x_placements: tuple, w_placements: tuple):
    """`_plan` on the layouts alone (placements are values: cached per layout, not per call)."""
    letters = _operand_letters(equation, x_ndim, w_ndim)
    if letters is None:
        return None
    xs, ws, out = letters
    out_placements, gx, gw, reduce_axes, used = [], [], [], [], set()
    for axis, (px, pw) in enumerate(zip(x_placements, w_placements)):
        if px.is_partial() or pw.is_partial():
            return None
        if pw.is_replicate() and px.is_replicate():
            out_placements.append(Replicate())
            gx.append(Replicate())
            gw.append(Replicate())
            continue
        if pw.is_replicate():  # the input split along one of its own dims (data parallel)
            letter = xs[px.dim]
            if letter in ws or letter not in out:
                return None
            placement = Shard(out.index(letter))
            gx.append(px)
            gw.append(Partial())
        elif px.is_replicate():  # column-parallel: the kernel split along an output dim
            letter = ws[pw.dim]
            if letter in xs or letter not in out:
                return None
            placement = Shard(out.index(letter))
            gx.append(Replicate())
            gw.append(pw)
            reduce_axes.append(axis)
        else:  # row-parallel: both split along the contracted dim
            letter = ws[pw.dim]
            if xs[px.dim] != letter or letter in out:
                return None
            placement = Partial()
            gx.append(px)
            gw.append(pw)
        if isinstance(placement, Shard):
            if placement.dim in used:
                return None
            used.add(placement.dim)
        out_placements.append(placement)
    return tuple(out_placements), tuple(gx), tuple(gw), tuple(reduce_axes)


def local_einsum(equation: str, x, w):
    """``einsum(equation, x, w)`` for a layer whose kernel ``w`` is a DTensor: on the local
    blocks, as a DTensor laid out as the module docstring's table says. ``x`` may be a plain
    tensor (replicated). None where the table has no row (the caller then uses DTensor's einsum).

    Collectives: none forward; backward, one all-reduce of the input's gradient per axis on
    which the kernel is column-split. Allocates the local output block only.
    """
    parts = local_einsum_parts(equation, x, w)
    if parts is None:
        return None
    y, mesh, placements, shape = parts
    return from_local(y, mesh, placements, shape)


def local_einsum_parts(equation: str, x, w, record: dict | None = None):
    """`local_einsum` before its result is wrapped: (local output, mesh, its placements, its
    global shape), for a caller that goes on with local math (Dense's bias and activation).

    ``record``, if given, receives the call's decisions where another call with an input laid
    out the same way would make them again unchanged (`shardimpl.keras.dense_plan`): the
    equation and the input's and kernel's gradient placements and reduced axes; left empty where
    the input had to be summed or re-laid out first."""
    if not isinstance(w, DTensor) or not isinstance(x, torch.Tensor) or is_gathered(w):
        return None  # a weight gathered for FSDP: DTensor's einsum saves it as a re-gather token
    mesh = w.device_mesh
    if not isinstance(x, DTensor):
        x = from_local(x, mesh, [Replicate()] * mesh.ndim)
    elif x.device_mesh != mesh or x.dtype != w.dtype:
        return None
    given = x
    x = _settle_input(equation, x, w)
    plan = _plan(equation, x, w) if x is not None else None
    if plan is None:
        return None
    placements, gx, gw, reduce_axes = plan
    y = local_contract(equation, x, w, gx, gw, reduce_axes, mesh)
    shape = torch.Size((x.shape[i] if operand == 0 else w.shape[i]) for operand, i in _output_dims(equation))
    if record is not None and x is given:
        record.update(equation=equation, gx=gx, gw=gw, reduce_axes=reduce_axes)
    return y, mesh, placements, shape


def local_contract(equation: str, x, w: DTensor, gx, gw, reduce_axes, mesh) -> torch.Tensor:
    """The local output block of ``einsum(equation, x, w)`` for a row of the table: ``gx`` / ``gw``
    the input's and kernel's gradient placements, ``reduce_axes`` the axes the input's gradient
    is all-reduced over (`_plan`'s answers, or a remembered plan's: `shardimpl.keras.dense_plan`).
    ``x`` a plain tensor that needs no gradient (a batch, where the mesh has no data axis)
    stands for the replicated DTensor `local_einsum_parts` makes of it: its own local block."""
    x_local = _local_input(x, gx, reduce_axes, mesh)
    with local_saves():
        # Saved as they are under a direct call's hooks (which would save them as replicated
        # DTensors, which a local backward cannot take); remat's checkpoint hooks stay in charge.
        return _contract(equation, x_local, to_local(w, gw))


@functools.lru_cache(maxsize=1024)
def _output_dims(equation: str) -> tuple:
    """For each output letter, (0, its dim in the input) or (1, its dim in the kernel)."""
    xs, ws, out = _letters(equation)
    return tuple((0, xs.index(c)) if c in xs else (1, ws.index(c)) for c in out)


def _settle_input(equation: str, x: DTensor, w: DTensor):
    """``x`` laid out as a row of the table expects, or None: a Partial(sum) input summed once
    (Megatron's g, kept on the input so that the layers sharing it reduce it once); a whole input
    of a kernel split along the contracted dim cut to this rank's block (no communication
    forward; DTensor all-gathers its gradient backward), the cut kept on the input too: the
    layers reading it (keras-hub Llama's query, key and value kernels split along the hidden
    dim) share one cut, autograd sums their gradients into it, and one all-gather serves them
    all, not one per layer."""
    letters = _letters(equation)
    if letters is None:
        return None
    if any(p.is_partial() for p in x.placements):
        if any(p.is_partial() and getattr(p, "reduce_op", None) != "sum" for p in x.placements):
            return None
        kept = getattr(x, "_shardimpl_reduced", None)
        if kept is None:
            kept = sum_partial(x)
            x._shardimpl_reduced = kept
        x = kept
    placements = tuple(x.placements)
    wanted = _wanted_input(letters, x.ndim, w.ndim, placements, tuple(w.placements))
    if wanted != placements:
        kept = getattr(x, "_shardimpl_cut", None)
        if kept is None or kept[0] != wanted:
            kept = (wanted, x.redistribute(x.device_mesh, wanted))
            x._shardimpl_cut = kept
        x = kept[1]
    return x


@functools.lru_cache(maxsize=4096)
def _wanted_input(letters, x_ndim: int, w_ndim: int, x_placements: tuple, w_placements: tuple) -> tuple:
    """The input's placements `_settle_input` wants: its own, but split along the kernel's
    contracted dim on each axis where the kernel is split there and the input is whole."""
    xs, ws, out = letters
    wanted = list(x_placements)
    for axis, (px, pw) in enumerate(zip(x_placements, w_placements)):
        if px.is_replicate() and pw.is_shard() and len(ws) == w_ndim and len(xs) == x_ndim:
            letter = ws[pw.dim]
            if letter in xs and letter not in out:
                wanted[axis] = Shard(xs.index(letter))
    return tuple(wanted)


def _local_input(x: DTensor, gx, reduce_axes, mesh):
    """``x``'s local tensor, whose gradient is all-reduced over ``reduce_axes`` in backward.

    Several column-parallel layers that read the same input (attention's query, key and value;
    the MLP's gate and up) share one local tensor, kept on the input for as long as it lives:
    autograd sums their gradients into it first, and one all-reduce reduces the sum (as the
    hand-written step's single f per block), not one per layer."""
    if not isinstance(x, DTensor):  # plain, no gradient (`local_contract`): its own local block
        return x
    if not reduce_axes or not x.requires_grad:
        return to_local(x, gx)
    key = (tuple(reduce_axes), tuple(gx))
    kept = getattr(x, "_shardimpl_tp_input", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    x_local = _AllReduceGrad.apply(to_local(x, gx), [mesh.get_group(a) for a in reduce_axes])
    x._shardimpl_tp_input = (key, x_local)
    return x_local


def _contract(equation: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(equation, x, w)`` on local blocks, as one matmul where the equation is one:
    the input's trailing letters are the kernel's leading ones and the output is the input's
    other letters then the kernel's (Dense '...y,yz->...z', attention's 'abc,cde->abde' and
    'abcd,cde->abe'). torch.einsum routes those through bmm with permutes, unsqueezes and squeezes
    around it, forward and backward (about 10 more ATen calls per layer and step); a matmul of the
    flattened operands is one mm between two views. Anything else: torch.einsum."""
    k = _matmul_letters(equation)
    if k is None:
        return torch.einsum(equation, x, w)
    batch, contracted = x.shape[: x.ndim - k], x.shape[x.ndim - k:]
    if tuple(w.shape[:k]) != tuple(contracted):
        return torch.einsum(equation, x, w)
    size = 1
    for d in contracted:
        size *= d
    y = torch.matmul(x.reshape(*batch, size), w.reshape(size, -1))
    return y.reshape(*batch, *w.shape[k:])


@functools.lru_cache(maxsize=1024)
def _matmul_letters(equation: str) -> int | None:
    """How many trailing input letters the kernel leads with, if ``equation`` is a matmul; else None."""
    letters = _letters(equation)
    if letters is None:
        return None
    xs, ws, out = letters
    if len(set(xs)) != len(xs) or len(set(ws)) != len(ws):
        return None
    for k in range(min(len(xs), len(ws)), 0, -1):
        if xs[len(xs) - k:] == ws[:k] and out == xs[: len(xs) - k] + ws[k:]:
            return k
    return None


def local_batched_einsum(equation: str, a, b):
    """``einsum(equation, a, b)`` of two DTensors laid out alike along a shared letter (module
    docstring): on each mesh axis both replicated, or both split along the same letter, which
    the output keeps; the output split along it. On the local blocks, no collective forward or
    backward; None for anything else (the caller runs DTensor's einsum)."""
    if not (isinstance(a, DTensor) and isinstance(b, DTensor)) or a.device_mesh != b.device_mesh or a.dtype != b.dtype:
        return None
    placements = _batched_plan(equation, tuple(a.shape), tuple(b.shape), tuple(a.placements), tuple(b.placements))
    if placements is None:
        return None
    with local_saves():
        y = torch.einsum(equation, _ContiguousGrad.apply(to_local(a)), _ContiguousGrad.apply(to_local(b)))
    xs, ws, out = _letters(equation)
    shape = tuple(a.shape[xs.index(c)] if c in xs else b.shape[ws.index(c)] for c in out)
    return from_local(y.contiguous(), a.device_mesh, placements, shape)


@functools.lru_cache(maxsize=4096)
def _batched_plan(equation: str, a_shape: tuple, b_shape: tuple, a_placements: tuple, b_placements: tuple):
    """`local_batched_einsum`'s output placements, or None where its rule does not hold."""
    letters = _operand_letters(equation, len(a_shape), len(b_shape))
    if letters is None:
        return None
    xs, ws, out = letters
    placements, used = [], set()
    for pa, pb in zip(a_placements, b_placements):
        if pa.is_replicate() and pb.is_replicate():
            placements.append(Replicate())
            continue
        if not (type(pa) is Shard and type(pb) is Shard):  # Partial, or DTensor's strided shards
            return None
        letter = xs[pa.dim % len(xs)]
        if ws[pb.dim % len(ws)] != letter or letter not in out or letter in used:
            return None
        if a_shape[xs.index(letter)] != b_shape[ws.index(letter)]:  # a broadcast size-1 dim
            return None
        used.add(letter)
        placements.append(Shard(out.index(letter)))
    return tuple(placements)

