"""Model families with a size knob, built from Keras layers, each with a LayoutMap.

* ``mlp``: a stack of ``DEPTH`` Dense(width) layers on width-wide inputs;
  every kernel is the same size, none dominates the others.
* ``transformer``: a token embedding (vocab x d, its largest variable) and
  ``BLOCKS`` pre-norm blocks of MultiHeadAttention (at least ``HEADS`` heads,
  about 128 wide in large models) and a 4x MLP.

`param_bytes` is exact (counted from the built model's shapes); the knob only
picks the dimensions. On a 1-D ("model",) mesh the LayoutMaps shard every
large variable over "model" and leave norms replicated. On a 2-D
("batch", "model") mesh (`parse_mesh`, ``--mesh BxM``) every large variable is
sharded over both axes (`layout_map` says how): "batch" splits batches and,
for weights, is gathered while their layer runs (FSDP) or shares a dim with
"model" (tensor parallel over the whole mesh).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["FAMILIES", "HUB", "build_model", "layout_map", "dims_for", "sample_batch", "exact_param_bytes",
           "model_mesh", "parse_mesh", "mesh_label"]

FAMILIES = ("mlp", "transformer", "gemma", "llama")
HUB = ("gemma", "llama")  # keras-hub backbones (bench.harness.hub_families); need keras-hub installed
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

    For keras-hub families ``param_bytes`` may be a preset name (``bench.harness.hub_families.PRESETS``).
    """
    if family in HUB:
        from bench.harness.hub_families import hub_config, hub_param_count

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
        from bench.harness.hub_families import build_hub_model

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
    """A LayoutMap that shards every large variable of ``family`` over ``mesh``.

    1-D ("model",) mesh, or a 2-D mesh whose "batch" axis has size 1: every
    large variable over "model". Attention kernels are split by heads when the
    heads divide evenly over the "model" axis (each rank then computes whole
    heads, and their gradients stay sharded); otherwise (heads run out before
    ranks: 256 heads on 1024 ranks, or ``param_bytes`` unknown) by model width.
    A ("batch", "model") mesh with "batch" > 1: `_layout_map_2d`.
    """
    import keras

    if family in HUB:
        from bench.harness.hub_families import hub_layout_map

        return hub_layout_map(family, mesh)
    if _batch_ranks(mesh) > 1:
        return _layout_map_2d(family, mesh, param_bytes)
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
    # Split by vocabulary: each rank looks up the rows it holds and one all-reduce sums
    # them, so the embedding's output is whole. Split by width instead, the output (and
    # with it the residual stream) comes out width-split, and every LayerNorm re-lays it
    # out by batch and every next layer gathers it back: 2.2-2.6x the stock step at N=2.
    lm[r".*token_embedding/embeddings"] = ("model", None)
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
    # Megatron's residual stream: replicated between blocks. The row-split layers
    # (attention output, mlp_down) return partial sums; summing each once, at the layer's
    # output, keeps LayerNorm, the residual adds and the next block's inputs unsharded.
    lm[r".*attn/output"] = (None, None, None)
    lm[r".*mlp_down/output"] = (None, None, None)
    return lm


def _batch_ranks(mesh) -> int:
    names = list(mesh.axis_names)
    return int(mesh.shape[names.index("batch")]) if "batch" in names else 1


def _layout_map_2d(family: str, mesh, param_bytes: int | None):
    """Every large variable over both axes of a ("batch", "model") mesh, B x M ranks.

    Each kernel keeps its 1-D tensor-parallel split on "model" and adds "batch":
    * on another dim (FSDP x TP): while its layer runs the kernel is gathered
      along "batch" only (`shardimpl.keras.fsdp`), a block of |W| / M, and the
      batch stays split along "batch";
    * on the same dim as "model" (TP over the whole mesh): never gathered;
      activations move instead. Used for the MLP kernels when their block
      gathered along "batch" would exceed a rank's share of the model
      (|W| / M > P / N, i.e. B x |W| > P: the 2-block family at 70B on 128 x 8);
      FSDP's premise, a layer small against the model, does not hold there.
    The token embedding is split by vocabulary along "batch" (a lookup moves ids,
    never the table) and by width along "model". Norms stay replicated.
    """
    import keras

    lm = keras.distribution.LayoutMap(mesh)
    batch_ranks = _batch_ranks(mesh)
    model_ranks = mesh.shape[list(mesh.axis_names).index("model")]
    total = exact_param_bytes(family, param_bytes) if param_bytes else None

    def gathered_fits(kernel_bytes):  # FSDP: the block gathered along "batch" within P / N
        return total is None or batch_ranks * kernel_bytes <= total

    if family == "mlp":
        width = dims_for(family, param_bytes)["width"] if param_bytes else None
        if gathered_fits(width * width * 4 if width else 0):
            lm[r".*dense_\d*[02468]/kernel"] = ("batch", "model")
            lm[r".*dense_\d*[02468]/bias"] = ("model",)
            lm[r".*dense_\d*[13579]/kernel"] = ("model", "batch")
            lm[r".*dense_\d*[13579]/bias"] = ("batch",)
        else:  # column- then row-parallel over the whole mesh, as the 1-D map over "model"
            lm[r".*dense_\d*[02468]/kernel"] = (None, ("batch", "model"))
            lm[r".*dense_\d*[02468]/bias"] = (("batch", "model"),)
            lm[r".*dense_\d*[13579]/kernel"] = (("batch", "model"), None)
            lm[r".*dense_\d*[13579]/bias"] = (None,)
        return lm
    dims = dims_for(family, param_bytes) if param_bytes else None
    d = dims["d_model"] if dims else None
    heads = dims["heads"] if dims else None
    lm[r".*token_embedding/embeddings"] = ("batch", "model")
    if heads and heads % model_ranks == 0:
        lm[r".*attn/(query|key|value)/kernel"] = ("batch", "model", None)
        lm[r".*attn/(query|key|value)/bias"] = ("model", None)
        lm[r".*attn/attention_output/kernel"] = ("model", None, "batch")
        lm[r".*attn/attention_output/bias"] = ("batch",)
    else:
        lm[r".*attn/(query|key|value)/kernel"] = (("batch", "model"), None, None)
        lm[r".*attn/attention_output/kernel"] = (None, None, ("batch", "model"))
    if gathered_fits(4 * d * d * 4 if d else 0):
        lm[r".*mlp_up/kernel"] = ("batch", "model")
        lm[r".*mlp_up/bias"] = ("model",)
        lm[r".*mlp_down/kernel"] = ("model", "batch")
        lm[r".*mlp_down/bias"] = ("batch",)
    else:
        lm[r".*mlp_up/kernel"] = (None, ("batch", "model"))
        lm[r".*mlp_up/bias"] = (("batch", "model"),)
        lm[r".*mlp_down/kernel"] = (("batch", "model"), None)
    # Activations between layers: whole along "model" (what every layer above consumes) and
    # split along "batch" when the batch divides evenly (DTensor cannot reshape an uneven
    # split: 8 sequences over 128 ranks stay whole). Without these DTensor may drift (tokens
    # split along "model") into layouts where a kernel's gradient comes out whole.
    act = ("batch", None, None) if BATCH % batch_ranks == 0 else (None, None, None)
    for name in ("token_embedding", r"block\d+_ln\d", r"block\d+_attn", r"block\d+_mlp_down"):
        lm[rf".*{name}/output"] = act
    return lm


def sample_batch(family: str, param_bytes: int, seed: int = 0):
    """A fixed input batch for a train step (the same on every rank)."""
    import torch

    if family in HUB:
        from bench.harness.hub_families import hub_sample_batch

        return hub_sample_batch(family, param_bytes, BATCH, SEQ, seed)
    g = torch.Generator().manual_seed(seed)
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        return torch.randn(BATCH, dims["width"], generator=g)
    return torch.randint(0, dims["vocab"], (BATCH, SEQ), generator=g, dtype=torch.int32)


def parse_mesh(text, ranks: int | None = None) -> tuple[int, int] | None:
    """'BxM' -> (B, M) (B batch ranks, M model ranks); None or '' -> None (the family's 1-D mesh).

    With ``ranks``, B x M must equal it; a single number or '1xN' is still a 2-D mesh.
    """
    if text in (None, "", "1d"):
        return None
    if isinstance(text, (tuple, list)):
        b, m = (int(x) for x in text)
    else:
        parts = str(text).lower().replace("*", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--mesh: a mesh is BxM (batch ranks x model ranks), e.g. 128x8. Received: {text!r}.")
        b, m = int(parts[0]), int(parts[1])
    if b < 1 or m < 1:
        raise ValueError(f"--mesh: both sizes must be positive. Received: {text!r}.")
    if ranks is not None and b * m != ranks:
        raise ValueError(f"--mesh {b}x{m} has {b * m} ranks but the world has {ranks}. "
                         "Choose B x M equal to the number of ranks.")
    return b, m


def mesh_label(mesh_shape, ranks: int) -> str:
    """How rows name a mesh: '1d' for the family's 1-D mesh, else 'BxM'."""
    return "1d" if mesh_shape is None else f"{mesh_shape[0]}x{mesh_shape[1]}"


def model_mesh(family: str, devices, mesh_shape=None):
    """The mesh a family is sharded on: ("model",) over ``devices``, or for keras-hub
    families (whose layout maps name both axes) (1, N) ("batch", "model"); with
    ``mesh_shape`` (B, M), a B x M ("batch", "model") mesh."""
    import keras

    if mesh_shape is not None:
        b, m = parse_mesh(mesh_shape, len(devices))
        return keras.distribution.DeviceMesh((b, m), ["batch", "model"], devices)
    if family in HUB:
        return keras.distribution.DeviceMesh((1, len(devices)), ["batch", "model"], devices)
    return keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
