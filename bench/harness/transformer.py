"""The ``transformer`` family: Llama-shaped, from plain Keras layers, at any size.

A token embedding, ``layers`` pre-norm blocks (RMSNorm, grouped-query attention without
biases, RMSNorm, a SwiGLU MLP: silu(x W_gate) * (x W_up), then W_down), a final RMSNorm and an
untied LM head (d x vocab, no bias). No rotary embedding: it has no parameters, and its
activations are the query and key's own size.

Sizes grow in depth and width along Llama 3's published shapes (`transformer_dims`):

* at 8B parameters, Llama 3 8B: 32 blocks of width 4096, FFN 14336, 32 query / 8 key-value
  heads of 128, vocabulary 128256 (8.03B parameters);
* at 70B, Llama 3 70B: 80 blocks of 8192, FFN 28672, 64 / 8 heads, vocabulary 128256 (70.55B);
* below 8B, 8B's proportions: FFN 3.5 d, vocabulary 31.3 d, one block per 128 of width (at
  least 2), heads of 128 (at least 8 heads, so that 2, 4 and 8 ranks split them), 8 key-value
  heads from 32 query heads on (8B's 32 / 8), 4 below;
* above 8B, 70B's: the vocabulary stays 128256 and there is one block per 102.4 of width.

Each block is one Keras layer (`Block`), so `keras.RematScope(mode="list_of_layers")` over the
block names checkpoints whole blocks (what "full" activation checkpointing means in Megatron
and torchtitan): a block keeps only its input for backward.
"""

from __future__ import annotations

__all__ = ["transformer_dims", "transformer_param_count", "build_transformer", "block_names",
           "transformer_layout_map", "transformer_layout_map_2d",
           "sequence_parallel"]

_VOCAB_8B, _WIDTH_8B = 128256, 4096
_LAYERS_PER_WIDTH_70B = 80 / 8192


def _dims_at(d: int) -> dict:
    """The shape of width ``d`` (8B's proportions up to 4096, 70B's above)."""
    heads = max(8, d // 128)
    kv_heads = 8 if heads >= 32 and heads % 8 == 0 else 4
    if d <= _WIDTH_8B:
        layers = max(2, round(d / 128))
        vocab = max(8, round(d * _VOCAB_8B / _WIDTH_8B / 8) * 8)
    else:
        layers = round(d * _LAYERS_PER_WIDTH_70B)
        vocab = _VOCAB_8B
    return {"d_model": d, "layers": layers, "ffn": int(3.5 * d), "heads": heads,
            "kv_heads": kv_heads, "head_dim": d // heads, "vocab": vocab}


def _widths():
    """Candidate widths: multiples of 8 (8 heads) up to 1024, then multiples of 512 (whole
    128-wide heads, a multiple of 4 of them, so the key-value heads divide them)."""
    yield from range(16, 1024, 8)
    yield from range(1024, 65536 + 1, 512)


def transformer_param_count(dims: dict) -> int:
    """Parameters `build_transformer` creates for ``dims`` (checked against built models)."""
    d, hd, h, kv, f = dims["d_model"], dims["head_dim"], dims["heads"], dims["kv_heads"], dims["ffn"]
    per_block = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d
    return 2 * dims["vocab"] * d + dims["layers"] * per_block + d


def transformer_dims(param_count: float) -> dict:
    """The shape whose parameter count is nearest ``param_count``."""
    return min((_dims_at(d) for d in _widths()),
               key=lambda dims: abs(transformer_param_count(dims) - param_count))


def block_names(dims: dict) -> list[str]:
    return [f"block{b}" for b in range(dims["layers"])]


def _block_class():
    import keras

    class Block(keras.layers.Layer):
        """One pre-norm Llama block: x + attn(norm1(x)), then + mlp(norm2(x))."""

        def __init__(self, dims, **kwargs):
            super().__init__(**kwargs)
            d, n = dims["d_model"], self.name
            self.norm1 = keras.layers.RMSNormalization(epsilon=1e-5, name=f"{n}_norm1")
            self.attn = keras.layers.GroupQueryAttention(
                dims["head_dim"], dims["heads"], dims["kv_heads"], use_bias=False, name=f"{n}_attn")
            self.norm2 = keras.layers.RMSNormalization(epsilon=1e-5, name=f"{n}_norm2")
            self.mlp_gate = keras.layers.Dense(dims["ffn"], use_bias=False, activation="silu", name=f"{n}_mlp_gate")
            self.mlp_up = keras.layers.Dense(dims["ffn"], use_bias=False, name=f"{n}_mlp_up")
            self.mlp_down = keras.layers.Dense(d, use_bias=False, name=f"{n}_mlp_down")

        def build(self, input_shape):
            self.norm1.build(input_shape)
            self.attn.build(input_shape, input_shape)
            self.norm2.build(input_shape)
            self.mlp_gate.build(input_shape)
            self.mlp_up.build(input_shape)
            self.mlp_down.build(tuple(input_shape[:-1]) + (self.mlp_up.units,))

        def compute_output_shape(self, input_shape):
            # Declared, so that building the model never runs a block on real tensors (Keras
            # would otherwise trace `call` and, failing on the meta device, run it on zeros).
            return input_shape

        def call(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, use_causal_mask=True)
            h = self.norm2(x)
            return x + self.mlp_down(self.mlp_gate(h) * self.mlp_up(h))

    return Block


def build_transformer(dims: dict, *, batch: int, seq: int, remat: bool = False):
    """The Llama-shaped model of ``dims``: int32 token ids (batch, seq) -> logits (batch, seq, vocab).

    ``remat``: every block is rematerialized (``keras.RematScope`` over the block names).
    """
    import contextlib

    import keras

    Block = _block_class()
    scope = (keras.RematScope(mode="list_of_layers", layer_names=block_names(dims)) if remat
             else contextlib.nullcontext())
    with scope:
        tokens = keras.Input((seq,), batch_size=batch, dtype="int32")
        x = keras.layers.Embedding(dims["vocab"], dims["d_model"], name="token_embedding")(tokens)
        for name in block_names(dims):
            x = Block(dims, name=name)(x)
        x = keras.layers.RMSNormalization(epsilon=1e-5, name="final_norm")(x)
        logits = keras.layers.Dense(dims["vocab"], use_bias=False, name="lm_head")(x)
        return keras.Model(tokens, logits, name="transformer")


def _heads_split(dims: dict | None, model_ranks: int) -> bool:
    return bool(dims) and dims["heads"] % model_ranks == 0 and dims["kv_heads"] % model_ranks == 0


def transformer_layout_map(lm, dims: dict | None, model_ranks: int, *, seq: int | None = None):
    """The 1-D ("model",) map, Megatron's tensor parallelism (`docs/layouts-and-speed.md`):

    * the embedding split by vocabulary (each rank looks its rows up, one all-reduce), so the
      residual stream is whole; the row-split layers' outputs replicated (one all-reduce each);
    * attention split by heads where the query and the key-value heads divide over "model";
      on width otherwise (more ranks than key-value heads: DTensor cannot split the backward of
      the key-value heads' repeat, a view of the split heads dim into groups);
    * the MLP column (gate, up) then row (down); the LM head by vocabulary (logits split).
    Norm scales stay replicated.
    """
    lm[r".*token_embedding/embeddings"] = ("model", None)
    if _heads_split(dims, model_ranks):
        lm[r".*attn/(query|key|value)/kernel"] = (None, "model", None)
        lm[r".*attn/attention_output/kernel"] = ("model", None, None)
    else:
        lm[r".*attn/(query|key|value)/kernel"] = ("model", None, None)
        lm[r".*attn/attention_output/kernel"] = (None, None, "model")
    lm[r".*mlp_(gate|up)/kernel"] = (None, "model")
    lm[r".*mlp_down/kernel"] = ("model", None)
    lm[r".*lm_head/kernel"] = (None, "model")
    # Between the tensor-parallel layers, the residual stream: split along the sequence
    # (Megatron's sequence parallelism, Korthikanti et al. 2022) where "model" divides it,
    # whole otherwise. The row-split layers (attention output, mlp_down) return partial sums,
    # reduced once at the layer's output: reduce-scattered along the sequence, or all-reduced
    # whole; the norms, the residual adds and what remat keeps then hold 1/M of the stream each
    # (split), and the next column-split layer all-gathers its input (DTensor's redistribution).
    stream = (None, "model", None) if sequence_parallel(seq, model_ranks) else (None, None, None)
    lm[r".*token_embedding/output"] = stream
    lm[r".*attn/output"] = stream
    lm[r".*mlp_down/output"] = stream
    if sequence_parallel(seq, model_ranks):
        # Each norm runs on its 1/M of the tokens; its output, the next column-split layers'
        # input, is all-gathered there (Megatron's g), so that attention and the MLP run split by
        # heads and columns on every token (left to DTensor, the heads' scores came out whole).
        lm[r".*(block\d+_norm\d|final_norm)/output"] = (None, None, None)
    return lm


def sequence_parallel(seq: int | None, model_ranks: int) -> bool:
    """Whether the family's maps split the residual stream along the sequence: several model
    ranks that divide the sequence (DTensor cannot view an unevenly split dim)."""
    return bool(seq) and model_ranks > 1 and seq % model_ranks == 0


def transformer_layout_map_2d(lm, dims: dict | None, model_ranks: int, batch_ranks: int,
                              gathered_fits, *, batch: int | None, seq: int | None = None):
    """The ("batch", "model") map: the 1-D split on "model", plus "batch" on another dim
    (FSDP: gathered along "batch" while the layer runs) where the gathered block fits in a
    rank's share of the model (``gathered_fits(bytes)``), else on the same dim as "model"
    (tensor parallel over the whole mesh, never gathered)."""
    d = dims["d_model"] if dims else None
    lm[r".*token_embedding/embeddings"] = ("batch", "model")
    if _heads_split(dims, model_ranks):
        lm[r".*attn/(query|key|value)/kernel"] = ("batch", "model", None)
        lm[r".*attn/attention_output/kernel"] = ("model", None, "batch")
    else:
        lm[r".*attn/(query|key|value)/kernel"] = (("batch", "model"), None, None)
        lm[r".*attn/attention_output/kernel"] = (None, None, ("batch", "model"))
    ffn = dims["ffn"] if dims else None
    if gathered_fits(d * ffn * 4 if d else 0):
        lm[r".*mlp_(gate|up)/kernel"] = ("batch", "model")
        lm[r".*mlp_down/kernel"] = ("model", "batch")
    else:
        lm[r".*mlp_(gate|up)/kernel"] = (None, ("batch", "model"))
        lm[r".*mlp_down/kernel"] = (("batch", "model"), None)
    vocab = dims["vocab"] if dims else None
    lm[r".*lm_head/kernel"] = ("batch", "model") if gathered_fits(d * vocab * 4 if d else 0) \
        else (None, ("batch", "model"))
    # Activations between layers: whole along "model" (what every layer above consumes) and
    # split along "batch" when the batch divides evenly (DTensor cannot reshape an uneven
    # split). Without these DTensor may drift (tokens split along "model") into layouts where
    # a kernel's gradient comes out whole.
    rows = "batch" if batch and batch % batch_ranks == 0 else None
    tokens = "model" if sequence_parallel(seq, model_ranks) else None  # as the 1-D map: along the sequence
    for name in ("token_embedding", r"block\d+_attn", r"block\d+_mlp_down"):
        lm[rf".*{name}/output"] = (rows, tokens, None)
    for name in (r"block\d+_norm\d", "final_norm"):  # the column-split layers' inputs: whole tokens
        lm[rf".*{name}/output"] = (rows, None, None)
    return lm
