"""A hand-written tensor-parallel train step of each family: plain torch, explicit collectives.

What `python -m bench speed` holds shardimpl's sharded step against: the step a person would
write by hand for the same model, the same shapes and the same layout as the family's 1-D
LayoutMap on ("model",) (`bench.harness.families.layout_map`, the speed tool's map: no
sequence given, so the residual stream is whole), with Megatron's two conjugate operators
(Shoeybi et al. 2019) as the only communication:

* ``_copy`` (Megatron's f): identity forward, all-reduce of the gradient backward, at the
  input of every column-split layer whose input needs a gradient;
* ``_reduce`` (Megatron's g): all-reduce forward, identity backward, at the output of every
  row-split layer and of the vocabulary-split embedding.

``mlp``: Dense kernels column-split (even layers, bias split alike) then row-split (odd
layers, bias whole, added after the all-reduce), relu between. ``transformer``: the
embedding split by vocabulary (each rank looks up its rows, zeros elsewhere, one all-reduce),
RMSNorm on the whole stream, attention split by query and key-value heads (torch's
scaled_dot_product_attention, causal, as Keras' GroupQueryAttention calls it), the SwiGLU MLP
column (gate, up) then row (down), the LM head split by vocabulary (the logits stay split).
The loss is the speed tool's: mean squared logits against zero targets (each rank sums its
block's squares; the reported loss is all-reduced, one float). The update is SGD with
momentum, torch's own (equal to Keras' SGD: m = 0.9 m - lr g, w += m).

`reference_step` is checked the reference against stock Keras (tests/test_tp_reference.py: equal
losses to 1e-5 on the same weights, two steps).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["REFERENCE_FAMILIES", "ReferenceMLP", "ReferenceTransformer", "build_reference", "reference_step", "load_keras_weights",
           "make_optimizer", "megatron_f", "megatron_g"]


REFERENCE_FAMILIES = ("mlp", "transformer")  # the families with a hand-written step (keras-hub's: none)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Copy(torch.autograd.Function):
    """Megatron's f: identity forward; backward, the gradient summed over ranks (one all-reduce)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        if _world()[1] > 1:
            grad = grad.contiguous()
            dist.all_reduce(grad)
        return grad


class _Reduce(torch.autograd.Function):
    """Megatron's g: forward, the partial sums summed over ranks (one all-reduce); identity backward."""

    @staticmethod
    def forward(ctx, x):
        if _world()[1] > 1:
            x = x.contiguous()
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


def megatron_f(x: torch.Tensor) -> torch.Tensor:
    """Megatron's f on ``x`` (identity forward, all-reduced gradient): before a column-split layer."""
    return _Copy.apply(x)


def megatron_g(x: torch.Tensor) -> torch.Tensor:
    """Megatron's g on ``x`` (partial sums all-reduced, identity backward): after a row-split layer."""
    return _Reduce.apply(x)


def _block(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's block of ``full`` along ``dim``, as DTensor's Shard(dim) cuts it (torch.chunk)."""
    return torch.chunk(full, world, dim=dim)[rank].clone()


def _param(shape, generator, scale) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=generator) * scale)


class ReferenceMLP(torch.nn.Module):
    """The ``mlp`` family on ``world`` ranks: Dense layers column- then row-split, alternating."""

    def __init__(self, width: int, depth: int, rank: int, world: int, seed: int = 1):
        super().__init__()
        if width % world:
            raise ValueError(f"The reference splits the mlp's width evenly over the ranks. Received: width={width}, "
                             f"ranks={world}; choose a size whose width the ranks divide.")
        g = torch.Generator().manual_seed(seed + rank)
        local = width // world
        self.depth = depth
        self.kernels = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for i in range(depth):
            column = i % 2 == 0
            self.kernels.append(_param((width, local) if column else (local, width), g, 1 / math.sqrt(width)))
            self.biases.append(torch.nn.Parameter(torch.zeros(local if column else width)))

    def forward(self, x):
        for i in range(self.depth):
            if i % 2 == 0:  # column-split: the input whole, the output split on features
                if i > 0:
                    x = _Copy.apply(x)
                x = x @ self.kernels[i] + self.biases[i]
            else:  # row-split: the split features in, partial sums out, reduced once
                x = _Reduce.apply(x @ self.kernels[i]) + self.biases[i]
            if i < self.depth - 1:
                x = torch.relu(x)
        return x


class ReferenceTransformer(torch.nn.Module):
    """The ``transformer`` family (`bench.harness.transformer`) split by heads, columns and vocabulary."""

    def __init__(self, dims: dict, rank: int, world: int, seed: int = 1):
        super().__init__()
        d, h, kv, hd, f, v = (dims[k] for k in ("d_model", "heads", "kv_heads", "head_dim", "ffn", "vocab"))
        for what, n in (("heads", h), ("kv_heads", kv), ("ffn", f), ("vocab", v)):
            if n % world:
                raise ValueError(f"The reference splits {what} evenly over the ranks. Received: {what}={n}, "
                                 f"ranks={world}; choose a size (or a number of ranks) that divides it.")
        g = torch.Generator().manual_seed(seed + rank)
        self.rank, self.world, self.dims = rank, world, dims
        self.vocab_start = rank * (v // world)
        self.embedding = _param((v // world, d), g, 0.05)
        self.blocks = torch.nn.ModuleList()
        s = 1 / math.sqrt(d)
        for _ in range(dims["layers"]):
            block = torch.nn.Module()
            block.norm1 = torch.nn.Parameter(torch.ones(d))
            block.query = _param((d, h // world, hd), g, s)
            block.key = _param((d, kv // world, hd), g, s)
            block.value = _param((d, kv // world, hd), g, s)
            block.out = _param((h // world, hd, d), g, 1 / math.sqrt(h * hd))
            block.norm2 = torch.nn.Parameter(torch.ones(d))
            block.gate = _param((d, f // world), g, s)
            block.up = _param((d, f // world), g, s)
            block.down = _param((f // world, d), g, 1 / math.sqrt(f))
            self.blocks.append(block)
        self.final_norm = torch.nn.Parameter(torch.ones(d))
        self.lm_head = _param((d, v // world), g, s)

    def _embed(self, ids):
        local = ids.long() - self.vocab_start
        outside = (local < 0) | (local >= self.embedding.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.embedding)
        return _Reduce.apply(rows.masked_fill(outside.unsqueeze(-1), 0.0))

    def _attention(self, b, x):
        dims = self.dims
        q = torch.einsum("bsd,dhk->bshk", x, b.query)
        k = torch.einsum("bsd,dhk->bshk", x, b.key)
        v = torch.einsum("bsd,dhk->bshk", x, b.value)
        repeats = dims["heads"] // dims["kv_heads"]
        k = k.repeat_interleave(repeats, dim=2)
        v = v.repeat_interleave(repeats, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=1.0 / math.sqrt(dims["head_dim"]))
        return _Reduce.apply(torch.einsum("bshk,hkd->bsd", o.transpose(1, 2), b.out))

    def forward(self, ids):
        d, eps = self.dims["d_model"], 1e-5
        x = self._embed(ids)
        for b in self.blocks:
            x = x + self._attention(b, _Copy.apply(F.rms_norm(x, (d,), b.norm1, eps)))
            h = _Copy.apply(F.rms_norm(x, (d,), b.norm2, eps))
            x = x + _Reduce.apply((F.silu(h @ b.gate) * (h @ b.up)) @ b.down)
        h = _Copy.apply(F.rms_norm(x, (d,), self.final_norm, eps))
        return h @ self.lm_head  # (batch, seq, vocab / N): split by vocabulary


def build_reference(family: str, param_bytes: int, *, seed: int = 1):
    """The reference model of ``family`` at the size knob, this rank's blocks only (random weights)."""
    from bench.harness.families import DEPTH, dims_for

    rank, world = _world()
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        return ReferenceMLP(dims["width"], DEPTH, rank, world, seed)
    if family == "transformer":
        return ReferenceTransformer(dims, rank, world, seed)
    raise ValueError(f"The hand-written reference exists for the families {REFERENCE_FAMILIES}. Received: "
                     f"family={family!r}; pass --no-reference or choose one of them.")


def load_keras_weights(reference: torch.nn.Module, weights: dict) -> None:
    """Copy this rank's blocks of a Keras model's weights (``{variable.path: full tensor}``) in."""
    rank, world = _world()
    with torch.no_grad():
        if isinstance(reference, ReferenceMLP):
            for i in range(reference.depth):
                column = i % 2 == 0
                reference.kernels[i].copy_(_block(weights[f"dense_{i}/kernel"], 1 if column else 0, rank, world))
                bias = weights[f"dense_{i}/bias"]
                reference.biases[i].copy_(_block(bias, 0, rank, world) if column else bias)
            return
        reference.embedding.copy_(_block(weights["token_embedding/embeddings"], 0, rank, world))
        for n, b in enumerate(reference.blocks):
            p = f"block{n}/block{n}_"
            b.norm1.copy_(weights[p + "norm1/scale"])
            b.norm2.copy_(weights[p + "norm2/scale"])
            for name in ("query", "key", "value"):
                getattr(b, name).copy_(_block(weights[f"{p}attn/{name}/kernel"], 1, rank, world))
            b.out.copy_(_block(weights[p + "attn/attention_output/kernel"], 0, rank, world))
            b.gate.copy_(_block(weights[p + "mlp_gate/kernel"], 1, rank, world))
            b.up.copy_(_block(weights[p + "mlp_up/kernel"], 1, rank, world))
            b.down.copy_(_block(weights[p + "mlp_down/kernel"], 0, rank, world))
        reference.final_norm.copy_(weights["final_norm/scale"])
        reference.lm_head.copy_(_block(weights["lm_head/kernel"], 1, rank, world))


def _total_elements(reference, out) -> int:
    if isinstance(reference, ReferenceTransformer):
        return out.numel() * reference.world  # the logits are split by vocabulary
    return out.numel()


def reference_step(reference: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One train step: forward, mean squared output against zero targets, backward, SGD update.

    Collectives: the model's (above), plus one all-reduce of one float (the reported loss) for
    the vocabulary-split logits. Returns the loss as a Python float, as ``train_on_batch`` does.
    """
    optimizer.zero_grad(set_to_none=True)
    out = reference(x)
    loss = out.square().sum() / _total_elements(reference, out)
    loss.backward()
    optimizer.step()
    value = loss.detach()
    if isinstance(reference, ReferenceTransformer) and reference.world > 1:
        dist.all_reduce(value)
    return float(value)


def make_optimizer(reference: torch.nn.Module, *, learning_rate: float = 1e-4, momentum: float = 0.9):
    """SGD with momentum over the reference's parameters: the speed tool's optimizer."""
    return torch.optim.SGD(reference.parameters(), lr=learning_rate, momentum=momentum)
