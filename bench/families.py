"""Model families with a size knob, built from Keras layers, each with a LayoutMap.

* ``mlp``: a stack of ``DEPTH`` Dense(width) layers on width-wide inputs;
  every kernel is the same size, none dominates the others.
* ``transformer``: a token embedding (vocab x d, its largest variable) and
  ``BLOCKS`` pre-norm blocks of MultiHeadAttention (at least ``HEADS`` heads,
  about 128 wide in large models) and a 4x MLP.

`param_bytes` is exact (counted from the built model's shapes); the knob only
picks the dimensions. The LayoutMaps shard every large variable over the
"model" axis and leave norms replicated.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["FAMILIES", "HUB", "build_model", "layout_map", "dims_for", "sample_batch", "exact_param_bytes",
           "model_mesh"]

FAMILIES = ("mlp", "transformer", "gemma", "llama")
HUB = ("gemma", "llama")  # keras-hub backbones (bench.hub_families); need keras-hub installed
DEPTH = 4
BLOCKS = 2
HEADS = 4
SEQ = 16
BATCH = 8


def dims_for(family: str, param_bytes: int, itemsize: int = 4) -> dict:
    """Dimensions that give about ``param_bytes`` of parameters."""
    elems = param_bytes / itemsize
    if family == "mlp":
        width = max(8, int(round(math.sqrt(elems / DEPTH))))
        return {"width": width}
    if family == "transformer":
        # embedding 16 d^2 + per block (4 d^2 attention + 8 d^2 MLP) => 40 d^2 for 2 blocks.
        target = math.sqrt(elems / (16 + 12 * BLOCKS))
        # About 128 per head for large models; a power of two, so that N = 2, 4, 8... split heads evenly.
        heads = max(HEADS, 2 ** int(math.log2(max(target / 128, 1))))
        d = max(heads * 4, int(round(target / heads)) * heads)
        return {"d_model": d, "vocab": 16 * d, "heads": heads}
    raise ValueError(f"Unknown model family {family!r}. Choose one of {FAMILIES}.")


def exact_param_bytes(family: str, param_bytes: int, itemsize: int = 4) -> int:
    """The exact parameter bytes `build_model` creates for the knob ``param_bytes`` (no build).

    For keras-hub families ``param_bytes`` may be a preset name (``bench.hub_families.PRESETS``).
    """
    if family in HUB:
        from bench.hub_families import hub_config, hub_param_count

        return hub_param_count(family, hub_config(family, param_bytes)) * itemsize
    dims = dims_for(family, param_bytes, itemsize)
    if family == "mlp":
        w = dims["width"]
        return DEPTH * (w * w + w) * itemsize
    d, vocab = dims["d_model"], dims["vocab"]
    # per block: attention 4d^2 + 4d, two LayerNorms 4d, MLP 8d^2 + 5d.
    return (vocab * d + BLOCKS * (12 * d * d + 13 * d)) * itemsize


def build_model(family: str, param_bytes: int):
    """An unbuilt Keras model of ``family``; ``model.build`` happens in `build`."""
    import keras

    if family in HUB:
        from bench.hub_families import build_hub_model

        return build_hub_model(family, param_bytes)
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        width = dims["width"]
        inputs = keras.Input((width,), batch_size=BATCH)
        x = inputs
        for i in range(DEPTH):
            x = keras.layers.Dense(width, activation="relu" if i < DEPTH - 1 else None, name=f"dense_{i}")(x)
        return keras.Model(inputs, x, name="mlp")
    d, vocab, heads = dims["d_model"], dims["vocab"], dims["heads"]
    tokens = keras.Input((SEQ,), batch_size=BATCH, dtype="int32")
    x = keras.layers.Embedding(vocab, d, name="token_embedding")(tokens)
    for b in range(BLOCKS):
        h = keras.layers.LayerNormalization(name=f"block{b}_ln1")(x)
        h = keras.layers.MultiHeadAttention(heads, d // heads, name=f"block{b}_attn")(h, h)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block{b}_ln2")(x)
        h = keras.layers.Dense(4 * d, activation="gelu", name=f"block{b}_mlp_up")(h)
        h = keras.layers.Dense(d, name=f"block{b}_mlp_down")(h)
        x = x + h
    return keras.Model(tokens, x, name="transformer")


def layout_map(family: str, mesh, param_bytes: int | None = None):
    """A LayoutMap that shards every large variable of ``family`` over the "model" axis.

    Attention kernels are split by heads when the heads divide evenly over the
    "model" axis (each rank then computes whole heads, and their gradients stay
    sharded); otherwise (heads run out before ranks: 256 heads on 1024 ranks, or
    ``param_bytes`` unknown) by model width.
    """
    import keras

    if family in HUB:
        from bench.hub_families import hub_layout_map

        return hub_layout_map(family, mesh)
    lm = keras.distribution.LayoutMap(mesh)
    if family == "mlp":
        # Column- then row-parallel, alternating (Megatron's pairing): a column-split layer's
        # output is split on its features, exactly what the next, row-split, layer consumes;
        # that layer's output is a sum (one all-reduce of batch x width) and replicated again.
        # Backward, every kernel's gradient comes out in the kernel's own layout, so no
        # gradient is re-laid out (all column-split: 3 of 4 gradients came back row-split).
        lm[r".*dense_\d*[02468]/kernel"] = (None, "model")
        lm[r".*dense_\d*[02468]/bias"] = ("model",)
        lm[r".*dense_\d*[13579]/kernel"] = ("model", None)
        lm[r".*dense_\d*[13579]/bias"] = (None,)
        return lm
    lm[r".*token_embedding/embeddings"] = (None, "model")
    model_ranks = mesh.shape[list(mesh.axis_names).index("model")]
    heads = dims_for(family, param_bytes)["heads"] if param_bytes else None
    if heads and heads % model_ranks == 0:
        lm[r".*attn/(query|key|value)/kernel"] = (None, "model", None)
        lm[r".*attn/(query|key|value)/bias"] = ("model", None)
        lm[r".*attn/attention_output/kernel"] = ("model", None, None)
    else:
        lm[r".*attn/(query|key|value)/kernel"] = ("model", None, None)
        lm[r".*attn/attention_output/kernel"] = (None, None, "model")
    lm[r".*mlp_up/kernel"] = (None, "model")
    lm[r".*mlp_up/bias"] = ("model",)
    lm[r".*mlp_down/kernel"] = ("model", None)
    return lm


def sample_batch(family: str, param_bytes: int, seed: int = 0):
    """A fixed input batch for a train step (the same on every rank)."""
    import torch

    if family in HUB:
        from bench.hub_families import hub_sample_batch

        return hub_sample_batch(family, param_bytes, BATCH, SEQ, seed)
    g = torch.Generator().manual_seed(seed)
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        return torch.randn(BATCH, dims["width"], generator=g)
    return torch.randint(0, dims["vocab"], (BATCH, SEQ), generator=g, dtype=torch.int32)


def model_mesh(family: str, devices):
    """The mesh a family is sharded on: ("model",) over ``devices``, or for keras-hub
    families (whose layout maps name both axes) (1, N) ("batch", "model")."""
    import keras

    if family in HUB:
        return keras.distribution.DeviceMesh((1, len(devices)), ["batch", "model"], devices)
    return keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
