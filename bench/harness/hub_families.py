"""keras-hub model families: real architectures (Gemma, Llama 3) at growing sizes and published shapes.

Each family builds a keras-hub CausalLM (backbone and LM head) from a config (random weights,
nothing downloaded) and shards it with the backbone's own ``get_layout_map`` on a
(1, N) ("batch", "model") mesh, with the residual stream split along the sequence
(sequence parallelism, `hub_layout_map`) where the sequence divides over "model". The size knob
picks the dimensions of a
2-layer model of about that many parameter bytes; a preset name
(``PRESETS``) picks a published architecture's shape instead, for
``python -m bench plan``. keras-hub is optional: these families need
``pip install --no-deps keras-hub==0.32.0 && pip install -e ".[hub]"``.
"""

from __future__ import annotations

import math

__all__ = ["HUB_FAMILIES", "PRESETS", "hub_config", "hub_param_count", "build_hub_model", "hub_layout_map",
           "hub_sample_batch"]

#: family -> (keras-hub backbone class, whether the output embedding is a separate matrix,
#: the CausalLM class, the name of block i)
HUB_FAMILIES = {"gemma": ("GemmaBackbone", False, "GemmaCausalLM", "decoder_block_{}"),
                "llama": ("Llama3Backbone", True, "Llama3CausalLM", "transformer_layer_{}")}

#: Published shapes (from the model cards / configs), float32 parameters as built here.
PRESETS = {
    "gemma-2b": ("gemma", dict(vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
                               hidden_dim=2048, intermediate_dim=32768, head_dim=256)),
    "gemma-7b": ("gemma", dict(vocabulary_size=256000, num_layers=28, num_query_heads=16, num_key_value_heads=16,
                               hidden_dim=3072, intermediate_dim=49152, head_dim=256)),
    "llama3-8b": ("llama", dict(vocabulary_size=128256, num_layers=32, num_query_heads=32, num_key_value_heads=8,
                                hidden_dim=4096, intermediate_dim=14336)),
    "llama3-70b": ("llama", dict(vocabulary_size=128256, num_layers=80, num_query_heads=64, num_key_value_heads=8,
                                 hidden_dim=8192, intermediate_dim=28672)),
}

LAYERS = 2


def _grown(family: str, param_bytes: int, itemsize: int = 4) -> dict:
    """A 2-layer config of about ``param_bytes``: vocabulary 8 x hidden, MLP 4 x hidden,
    a power-of-two number of heads (about 128 wide in large models), Llama with grouped
    key/value heads (half the query heads)."""
    elems = param_bytes / itemsize
    # gemma: 8d^2 embedding + per layer 4d^2 attention + 12d^2 MLP; llama: 16d^2 (two
    # embeddings) + per layer 3d^2 attention (half-width key/value) + 12d^2 MLP.
    per_d2 = 8 + LAYERS * 16 if family == "gemma" else 16 + LAYERS * 15
    target = math.sqrt(elems / per_d2)
    heads = max(4, 2 ** int(math.log2(max(target / 128, 1))))
    step = 2 * heads  # whole heads of an even width (rotary embeddings rotate pairs)
    d = max(4 * step, int(round(target / step)) * step)
    config = dict(vocabulary_size=8 * d, num_layers=LAYERS, num_query_heads=heads, hidden_dim=d)
    if family == "gemma":
        return {**config, "num_key_value_heads": heads, "intermediate_dim": 8 * d, "head_dim": d // heads}
    return {**config, "num_key_value_heads": max(1, heads // 2), "intermediate_dim": 4 * d}


def hub_config(family: str, size) -> dict:
    """The backbone config for ``size``: bytes of parameters (int) or a preset name."""
    if isinstance(size, str):
        preset_family, config = PRESETS[size]
        if preset_family != family:
            raise ValueError(f"preset {size!r} is a {preset_family} model, not {family}.")
        return dict(config)
    return _grown(family, int(size))


def hub_param_count(family: str, config: dict) -> int:
    """Parameters the backbone creates for ``config`` (checked against a built model in the tests)."""
    v, layers, d = config["vocabulary_size"], config["num_layers"], config["hidden_dim"]
    h, kv = config["num_query_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // h
    attention = d * hd * (h + 2 * kv) + h * hd * d
    if family == "gemma":
        ff = config["intermediate_dim"] // 2
        per_layer = attention + 3 * d * ff + 2 * d  # two RMS norms
        return v * d + layers * per_layer + d
    ff = config["intermediate_dim"]
    per_layer = attention + 3 * d * ff + 2 * d
    return 2 * v * d + layers * per_layer + d  # untied output embedding


def build_hub_model(family: str, size, *, remat: bool = False):
    """The family's CausalLM (no preprocessor): token ids and a padding mask -> logits over the
    vocabulary. ``remat``: every block rematerialized in backward (``keras.RematScope``)."""
    import contextlib

    import keras
    import keras_hub

    backbone_cls, _, lm_cls, block = HUB_FAMILIES[family]
    config = hub_config(family, size)
    names = [block.format(i) for i in range(config["num_layers"])]
    scope = keras.RematScope(mode="list_of_layers", layer_names=names) if remat else contextlib.nullcontext()
    with scope:
        backbone = getattr(keras_hub.models, backbone_cls)(**config)
    return getattr(keras_hub.models, lm_cls)(backbone=backbone, preprocessor=None)


#: family -> (the row-split layers whose partial sums end a sublayer, the norms whose outputs feed
#: column-split layers), as regular expressions over layer paths. The attention layers' and the
#: blocks' own outputs are not used: under generate() they return (output, cache).
SEQUENCE_PARALLEL_POINTS = {
    "gemma": (r"decoder_block_\d+/(attention/attention_output|ffw_linear)",
              r"decoder_block_\d+/(pre_attention_norm|pre_ffw_norm)|final_normalization"),
    "llama": (r"transformer_layer_\d+/(self_attention/attention_output|feedforward_output_dense)",
              r"transformer_layer_\d+/(self_attention_layernorm|feedforward_layernorm)|sequence_output_layernorm"),
}


def hub_layout_map(family: str, mesh, *, seq: int | None = None, batch: int | None = None):
    """The backbone's own ``get_layout_map`` on ``mesh`` (which needs a "batch" and a "model" axis),
    with the residual stream split along the sequence where `sequence_parallel` (``seq``) says so
    (`_split_the_stream`); ``batch`` (the global batch) keeps those activations split along
    "batch" where it divides, as the transformer family's 2-D map does.

    keras-hub 0.32's Llama map leaves the untied output embedding
    (``token_embedding/reverse_embeddings``, vocabulary x hidden, 2 GiB in
    Llama-3 8B) out, so every rank would hold it whole; the llama family adds
    it, split like the input embedding (vocabulary over "model").
    """
    import keras_hub

    layout_map = getattr(keras_hub.models, HUB_FAMILIES[family][0]).get_layout_map(mesh)
    if HUB_FAMILIES[family][1]:
        layout_map["token_embedding/reverse_embeddings"] = ("batch", "model")
    from bench.harness.transformer import sequence_parallel

    if sequence_parallel(seq, _axis_size(mesh, "model")):
        batch_ranks = _axis_size(mesh, "batch")
        _split_the_stream(layout_map, family, batch_split=batch_ranks > 1 and bool(batch) and batch % batch_ranks == 0)
    return layout_map


def _axis_size(mesh, name: str) -> int:
    names = list(mesh.axis_names)
    return int(mesh.shape[names.index(name)]) if name in names else 1


def _split_the_stream(layout_map, family: str, *, batch_split: bool):
    """Megatron's sequence parallelism (Korthikanti et al. 2022) as activation layouts on the
    blocks' layers, the transformer family's cut (`bench.harness.transformer`) but for the token
    embedding (below).

    The row-split layers (attention output, MLP down) return partial sums: reduce-scattered
    along the sequence at their outputs, so the residual adds inside the block, the norms and
    what backward keeps hold 1/M of the tokens each. The norms run on their 1/M of the tokens;
    their outputs, the column-split layers' inputs, are all-gathered (attention needs every
    position). ``batch_split``: the batch dim stays split along "batch" (else whole).
    """
    rows = "batch" if batch_split else None
    row_split, norms = SEQUENCE_PARALLEL_POINTS[family]
    stream, whole = (rows, "model", None), (rows, None, None)
    layout_map[rf"({row_split})/output$"] = stream
    layout_map[rf"({norms})/output$"] = whole


def hub_sample_batch(family: str, size, batch: int, seq: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = hub_config(family, size)["vocabulary_size"]
    return {"token_ids": torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int32),
            "padding_mask": torch.ones(batch, seq, dtype=torch.bool)}
