"""The harness' families as plain torch modules: the fsdp2 peer's models.

The same shapes as the Keras models `bench.harness.families.build_model` builds, from the same
shape logic (`bench.harness.families.dims_for` and ``DEPTH``), with torch's own layers so that
each has torch's ``reset_parameters`` and can be built on the meta device, sharded, then
materialized shard by shard:

* ``mlp``: ``DEPTH`` Linear(width, width) layers with biases, relu between them;
* ``transformer``: a token embedding, pre-norm Llama blocks (RMSNorm, grouped-query attention
  without biases, RMSNorm, SwiGLU MLP), a final RMSNorm and an untied LM head without bias.
  A Keras (d, heads, head_dim) kernel is a Linear(d, heads x head_dim) here: the same numbers.

`count_params` of a module equals `bench.harness.families.param_count` for the same size knob
(tests/test_fsdp2_peer.py checks it). The keras-hub families have no plain-torch module here.

Each model's ``units()`` are the modules the fsdp2 peer hands to ``fully_shard`` one by one before
the root: the mlp's layers; the transformer's token embedding, each Llama block and the LM head
(the final norm stays with the root). The embedding and the LM head are units of their own
because at these sizes they are most of the model (at 64 MiB: 38 of 63 MiB, vocabulary 12528 x
width 400); left with the root they would be gathered whole for all of forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TORCH_FAMILIES", "TorchMLP", "TorchTransformer", "build_torch_model", "family_loss", "count_params"]

TORCH_FAMILIES = ("mlp", "transformer")  # the families with a plain-torch module (keras-hub's: none)
_EPS = 1e-5  # the Keras family's RMSNormalization epsilon


class TorchMLP(nn.Module):
    """The ``mlp`` family: Linear layers of width x width with biases, relu between them."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def units(self) -> list[nn.Module]:
        """What ``fully_shard`` wraps one by one before the root: each layer."""
        return list(self.blocks)

    def forward(self, x):
        for i, layer in enumerate(self.blocks):
            x = layer(x)
            if i < len(self.blocks) - 1:
                x = torch.relu(x)
        return x


class TorchBlock(nn.Module):
    """One pre-norm Llama block: x + attention(norm1(x)), then + SwiGLU(norm2(x))."""

    def __init__(self, dims: dict):
        super().__init__()
        d, h, kv, hd, f = (dims[k] for k in ("d_model", "heads", "kv_heads", "head_dim", "ffn"))
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.norm1 = nn.RMSNorm(d, eps=_EPS)
        self.query = nn.Linear(d, h * hd, bias=False)
        self.key = nn.Linear(d, kv * hd, bias=False)
        self.value = nn.Linear(d, kv * hd, bias=False)
        self.out = nn.Linear(h * hd, d, bias=False)
        self.norm2 = nn.RMSNorm(d, eps=_EPS)
        self.gate = nn.Linear(d, f, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def _attention(self, x):
        b, s, _ = x.shape
        q = self.query(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def forward(self, x):
        x = x + self._attention(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TorchTransformer(nn.Module):
    """The ``transformer`` family: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, dims: dict, remat: bool = False):
        super().__init__()
        self.remat = remat
        self.embedding = nn.Embedding(dims["vocab"], dims["d_model"])
        self.blocks = nn.ModuleList(TorchBlock(dims) for _ in range(dims["layers"]))
        self.final_norm = nn.RMSNorm(dims["d_model"], eps=_EPS)
        self.lm_head = nn.Linear(dims["d_model"], dims["vocab"], bias=False)

    def units(self) -> list[nn.Module]:
        """What ``fully_shard`` wraps one by one before the root: the embedding, each block, the LM head."""
        return [self.embedding, *self.blocks, self.lm_head]

    def forward(self, ids):
        x = self.embedding(ids.long())
        for block in self.blocks:
            if self.remat and self.training:  # keep only the block's input; recompute it in backward
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.final_norm(x))


def build_torch_model(family: str, param_bytes: int, *, remat: bool = False) -> nn.Module:
    """The plain-torch model of ``family`` at the size knob ``param_bytes`` (bytes of float32
    parameters), on the current default device: under ``torch.device("meta")`` no memory is used.

    ``remat``: the transformer recomputes each block in backward (the mlp's remat is per layer in
    Keras; here its layers are not checkpointed, and the fsdp2 peer refuses that combination).
    """
    from bench.harness.families import DEPTH, dims_for

    if family not in TORCH_FAMILIES:
        raise ValueError(f"The fsdp2 peer has plain-torch modules for the families {', '.join(TORCH_FAMILIES)}; "
                         f"the keras-hub family {family!r} has none. Received: family={family!r}.")
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        return TorchMLP(dims["width"], DEPTH)
    return TorchTransformer(dims, remat=remat)


def family_loss(family: str):
    """The harness' loss for ``family`` (`bench.harness.training.make_loss`) in torch: mean squared
    error for the mlp, else cross-entropy of the logits against next-token ids, both averaged."""
    if family == "mlp":
        return F.mse_loss

    def cross_entropy(logits, targets):
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.long().flatten())

    return cross_entropy


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (global shapes: a sharded parameter counts whole)."""
    return sum(p.numel() for p in model.parameters())
