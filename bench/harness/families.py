"""Model families with a size knob, built from Keras layers, each with a LayoutMap.

* ``mlp``: a stack of ``DEPTH`` Dense(width) layers on width-wide inputs;
  every kernel is the same size, none dominates the others.
* ``transformer``: Llama-shaped (RMSNorm, grouped-query attention, SwiGLU MLP, untied LM
  head), growing in depth and width along Llama 3's shapes (`bench.harness.transformer`).

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

__all__ = ["FAMILIES", "HUB", "build_model", "layout_map", "dims_for", "sample_batch", "sample_targets",
           "exact_param_bytes", "param_count", "model_mesh", "parse_mesh", "mesh_label", "BATCH", "SEQ"]

FAMILIES = ("mlp", "transformer", "gemma", "llama")
HUB = ("gemma", "llama")  # keras-hub backbones (bench.harness.hub_families); need keras-hub installed
DEPTH = 4  # mlp layers
SEQ = 32  # tokens per sequence (transformer, keras-hub) unless a step asks for another (--seq)
BATCH = 8  # global batch unless a step asks for another


def dims_for(family: str, param_bytes: int, itemsize: int = 4) -> dict:
    """Dimensions that give about ``param_bytes`` of parameters (``itemsize`` bytes each)."""
    elems = param_bytes / itemsize
    if family == "mlp":
        width = max(8, int(round(math.sqrt(elems / DEPTH))))
        return {"width": width}
    if family == "transformer":
        from bench.harness.transformer import transformer_dims

        return transformer_dims(elems)
    raise ValueError(f"Unknown model family {family!r}. Choose one of {FAMILIES}.")


def param_count(family: str, param_bytes) -> int:
    """The exact number of parameters `build_model` creates for the knob ``param_bytes`` (the
    size in bytes of float32 parameters; for keras-hub families also a preset name)."""
    if family in HUB:
        from bench.harness.hub_families import hub_config, hub_param_count

        return hub_param_count(family, hub_config(family, param_bytes))
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        w = dims["width"]
        return DEPTH * (w * w + w)
    from bench.harness.transformer import transformer_param_count

    return transformer_param_count(dims)


def exact_param_bytes(family: str, param_bytes, itemsize: int = 4) -> int:
    """The exact parameter bytes `build_model` creates for the knob ``param_bytes``, at
    ``itemsize`` bytes per parameter (no build). For keras-hub families ``param_bytes`` may be
    a preset name (``bench.harness.hub_families.PRESETS``)."""
    return param_count(family, param_bytes) * itemsize


def build_model(family: str, param_bytes, *, batch: int = BATCH, seq: int = SEQ, remat: bool = False,
                layers: int | None = None):
    """A Keras model of ``family`` at the size knob ``param_bytes``, built.

    The transformer takes int32 tokens (batch, seq) and returns logits; keras-hub families
    are CausalLMs (the LM head included); the mlp takes (batch, width). ``remat``: every
    block (mlp: every layer) is rematerialized in backward (``keras.RematScope``).
    ``layers``: the transformer with this many blocks instead of its own (the planner
    extrapolates a deep model's figures from a few blocks).
    """
    import contextlib

    import keras

    if family in HUB:
        from bench.harness.hub_families import build_hub_model

        return build_hub_model(family, param_bytes, remat=remat)
    dims = dims_for(family, param_bytes)
    if layers is not None and family != "transformer":
        raise ValueError(f"layers= sets the transformer's depth only. Received: family={family!r}, layers={layers}.")
    if family == "transformer":
        from bench.harness.transformer import build_transformer

        return build_transformer({**dims, "layers": layers or dims["layers"]}, batch=batch, seq=seq, remat=remat)
    width = dims["width"]
    names = [f"dense_{i}" for i in range(DEPTH)]
    scope = keras.RematScope(mode="list_of_layers", layer_names=names) if remat else contextlib.nullcontext()
    with scope:
        inputs = keras.Input((width,), batch_size=batch)
        x = inputs
        for i, name in enumerate(names):
            x = keras.layers.Dense(width, activation="relu" if i < DEPTH - 1 else None, name=name)(x)
        return keras.Model(inputs, x, name="mlp")


def layout_map(family: str, mesh, param_bytes=None, *, batch: int | None = BATCH, seq: int | None = None):
    """A LayoutMap that shards every large variable of ``family`` over ``mesh``.

    1-D ("model",) mesh, or a 2-D mesh whose "batch" axis has size 1: every large variable
    over "model" (Megatron's tensor parallelism: `bench.harness.transformer`; the mlp's
    kernels column- then row-split). A ("batch", "model") mesh with "batch" > 1:
    `_layout_map_2d`. keras-hub families: their backbone's own map
    (`bench.harness.hub_families.hub_layout_map`). ``param_bytes`` (the size knob) lets the
    map split attention by heads where they divide; ``batch`` (the global batch) lets
    activations be split along "batch" where it divides, ``seq`` along "model" (sequence
    parallelism) where it divides.
    """
    import keras

    if family in HUB:
        from bench.harness.hub_families import hub_layout_map

        return hub_layout_map(family, mesh, seq=seq, batch=batch)
    if _batch_ranks(mesh) > 1:
        return _layout_map_2d(family, mesh, param_bytes, batch=batch, seq=seq)
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
    from bench.harness.transformer import transformer_layout_map

    model_ranks = mesh.shape[list(mesh.axis_names).index("model")]
    return transformer_layout_map(lm, dims_for(family, param_bytes) if param_bytes else None, model_ranks, seq=seq)


def _batch_ranks(mesh) -> int:
    names = list(mesh.axis_names)
    return int(mesh.shape[names.index("batch")]) if "batch" in names else 1


def _layout_map_2d(family: str, mesh, param_bytes, *, batch: int | None, seq: int | None = None):
    """Every large variable over both axes of a ("batch", "model") mesh, B x M ranks.

    Each kernel keeps its 1-D tensor-parallel split on "model" and adds "batch":
    * on another dim (FSDP x TP): while its layer runs the kernel is gathered
      along "batch" only (`shardimpl.keras.fsdp`), a block of |W| / M, and the
      batch stays split along "batch";
    * on the same dim as "model" (TP over the whole mesh): never gathered;
      activations move instead. Used where a kernel's block gathered along "batch"
      would exceed a rank's share of the model (|W| / M > P / N, i.e. B x |W| > P);
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
    from bench.harness.transformer import transformer_layout_map_2d

    dims = dims_for(family, param_bytes) if param_bytes else None
    return transformer_layout_map_2d(lm, dims, model_ranks, batch_ranks, gathered_fits, batch=batch, seq=seq)


def sample_batch(family: str, param_bytes, seed: int = 0, *, batch: int = BATCH, seq: int = SEQ):
    """A fixed input batch for a train step (the same on every rank): the global batch."""
    import torch

    if family in HUB:
        from bench.harness.hub_families import hub_sample_batch

        return hub_sample_batch(family, param_bytes, batch, seq, seed)
    g = torch.Generator().manual_seed(seed)
    dims = dims_for(family, param_bytes)
    if family == "mlp":
        return torch.randn(batch, dims["width"], generator=g)
    return torch.randint(0, dims["vocab"], (batch, seq), generator=g, dtype=torch.int32)


def sample_targets(family: str, param_bytes, seed: int = 0, *, batch: int = BATCH, seq: int = SEQ):
    """Targets for `sample_batch`'s inputs: next-token ids for the language models (a sparse
    cross-entropy over the vocabulary), a regression target for the mlp."""
    import torch

    g = torch.Generator().manual_seed(seed + 7919)
    if family == "mlp":
        return torch.randn(batch, dims_for(family, param_bytes)["width"], generator=g) * 0.1
    if family in HUB:
        from bench.harness.hub_families import hub_config

        vocab = hub_config(family, param_bytes)["vocabulary_size"]
    else:
        vocab = dims_for(family, param_bytes)["vocab"]
    return torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int32)


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
