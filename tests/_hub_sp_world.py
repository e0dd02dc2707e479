"""Rank-side checks of keras-hub backbones under the hub families' sequence-parallel maps.

`bench.harness.hub_families.hub_layout_map` with ``seq``: keras-hub's own weight layouts plus
activation layouts that split the residual stream along the sequence. `sharded_many` trains,
predicts and generates under it on the ranks and reads where a block's output lives;
`reference_many` runs the same calls with stock Keras in one process from the sharded run's
initial weights. Models and data are `_hub_world`'s (a tiny config, ``SEQ`` tokens).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import _hub_world

#: test world name -> the bench's hub family whose map it takes
FAMILY = {"gemma": "gemma", "llama3": "llama"}
STEPS = 3
#: family -> the block's attributes: its pre-attention norm, its attention, the attention's query projection
SUBLAYERS = {"gemma": ("pre_attention_norm", "attention", "query_dense"),
             "llama": ("_self_attention_layernorm", "_self_attention_layer", "_query_dense")}


def _placements_seen(lm, name):
    """Where block 1's output, its pre-attention norm's output and its attention's query
    projection's input live in a backbone call: each DTensor's placements as strings (None for
    a plain tensor), read by torch hooks (a forward hook sees the output before Keras lays it
    out; the query's input is the norm's output as laid out). Block 1, not 0: block 0's input,
    the token embedding's output, is whole (`bench.harness.hub_families._split_the_stream`)."""
    from bench.harness.hub_families import HUB_FAMILIES

    block = lm.backbone.get_layer(HUB_FAMILIES[FAMILY[name]][3].format(1))
    norm_name, attention_name, query_name = SUBLAYERS[FAMILY[name]]
    norm, attention = getattr(block, norm_name), getattr(block, attention_name)
    query = getattr(attention, query_name)
    seen = {}

    def where(t):
        return [str(p) for p in t.placements] if hasattr(t, "placements") else None

    def output_hook(key):
        def record(module, args, output):  # returns None: the output stays as it is
            seen.setdefault(key, where(output))
        return record

    def record_query_input(module, args):
        seen.setdefault("query_input", where(args[0]))

    handles = [block.register_forward_hook(output_hook("block")), norm.register_forward_hook(output_hook("norm")),
               query.register_forward_pre_hook(record_query_input)]
    try:
        x, _, _ = _hub_world.data()
        lm.backbone(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _checks(lm):
    import keras

    x, y, w = _hub_world.data()
    out = {"predict": lm.predict(x, batch_size=_hub_world.BATCH, verbose=0)}
    out["train"] = [float(lm.train_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]) for _ in range(STEPS)]
    out["generate"] = keras.ops.convert_to_numpy(
        lm.generate(_hub_world.prompt(), max_length=_hub_world.SEQ, stop_token_ids=None)["token_ids"])
    return out


def sharded_checks(name, mesh_shape):
    import keras

    import shardimpl
    from bench.harness.hub_families import hub_layout_map

    shardimpl.install()
    mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"], keras.distribution.list_devices())
    layout_map = hub_layout_map(FAMILY[name], mesh, seq=_hub_world.SEQ, batch=_hub_world.BATCH)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    lm = _hub_world.build(name)
    out = {"initial": lm.get_weights(), "placements": _placements_seen(lm, name)}
    out.update(_checks(lm))
    return out


def sharded_many(names, mesh_shape):
    """`sharded_checks` for several backbones on one world (spawning ranks costs seconds)."""
    import keras

    out = {}
    for name in names:
        keras.distribution.set_distribution(None)
        out[name] = sharded_checks(name, mesh_shape)
    return out


def reference_many(initials):
    """Stock Keras, one process, each backbone from the sharded run's initial weights."""
    out = {}
    for name, initial in initials.items():
        lm = _hub_world.build(name)
        lm.set_weights(initial)
        out[name] = _checks(lm)
    return out
