"""Rank-side checks of keras-hub backbones sharded by their own ``get_layout_map``.

Each backbone is built from a small config with random weights (nothing is
downloaded). `sharded_checks` runs every entry point under ModelParallel on the
ranks; `reference_checks` runs the same calls with stock Keras in one process
from the sharded run's initial weights, so the tests compare the two.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

VOCAB, SEQ, BATCH, PROMPT = 256, 12, 4, 4

CONFIGS = {
    "gemma": ("GemmaBackbone", "GemmaCausalLM", dict(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128, head_dim=16)),
    "llama": ("LlamaBackbone", "LlamaCausalLM", dict(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128)),
    "llama3": ("Llama3Backbone", "Llama3CausalLM", dict(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128)),
    "qwen": ("QwenBackbone", "QwenCausalLM", dict(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128)),
    "qwen3_moe": ("Qwen3MoeBackbone", "Qwen3MoeCausalLM", dict(
        vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=64, intermediate_dim=128, moe_intermediate_dim=32, num_experts=4, top_k=2,
        head_dim=16)),
}


def data():
    rs = np.random.RandomState(11)
    tokens = rs.randint(1, VOCAB, size=(BATCH, SEQ)).astype("int32")
    mask = np.ones((BATCH, SEQ), dtype=bool)
    mask[:, -2:] = False
    x = {"token_ids": tokens, "padding_mask": mask}
    y = np.roll(tokens, -1, axis=1)
    w = mask.astype("float32")
    return x, y, w


def prompt():
    x, _, _ = data()
    ids = np.where(np.arange(SEQ)[None, :] < PROMPT, x["token_ids"], 0).astype("int32")
    return {"token_ids": ids[:2], "padding_mask": (np.arange(SEQ)[None, :] < PROMPT).repeat(2, 0)}


def build(name):
    import keras
    import keras_hub

    backbone_cls, lm_cls, config = CONFIGS[name]
    keras.utils.set_random_seed(5)
    backbone = getattr(keras_hub.models, backbone_cls)(**config)
    lm = getattr(keras_hub.models, lm_cls)(backbone=backbone, preprocessor=None)
    lm.compile(optimizer=keras.optimizers.SGD(0.05),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               sampler="greedy")
    return lm


def _checks(lm, tmpdir=None):
    import keras

    x, y, w = data()
    out = {}
    out["direct"] = keras.ops.convert_to_numpy(lm.backbone(x))
    out["predict"] = lm.predict(x, batch_size=BATCH, verbose=0)
    out["train"] = [float(lm.train_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]) for _ in range(2)]
    out["fit"] = lm.fit(x, y, sample_weight=w, batch_size=2, epochs=1, shuffle=False, verbose=0).history["loss"]
    out["evaluate"] = float(lm.evaluate(x, y, sample_weight=w, batch_size=BATCH, verbose=0, return_dict=True)["loss"])
    out["generate"] = keras.ops.convert_to_numpy(
        lm.generate(prompt(), max_length=SEQ, stop_token_ids=None)["token_ids"])
    out["weights"] = lm.get_weights()
    if tmpdir:
        lm.save_weights(os.path.join(tmpdir, "lm.weights.h5"))
    return out


def sharded_checks(name, mesh_shape, tmpdir):
    import keras
    import keras_hub  # noqa: F401

    import shardimpl

    shardimpl.install()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"], devices)
    backbone_cls = CONFIGS[name][0]
    import keras_hub as hub

    layout_map = getattr(hub.models, backbone_cls).get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    lm = build(name)
    initial = lm.get_weights()
    local = full = 0
    for v in lm.weights:
        t = v.value
        full += t.numel() * t.element_size()
        local += (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
    out = _checks(lm, tmpdir)
    out["collectives"] = _collectives_of_a_step(lm)  # after the compared results: its step changes nothing compared
    out["initial"] = initial
    out["local_bytes"], out["full_bytes"] = local, full
    out["layout_map"] = {k: str(layout_map[k].axes) for k in layout_map}
    return out


def _collectives_of_a_step(lm) -> dict:
    """The c10d collectives one more train step issues (torch.profiler's events), by kind:
    "all_reduce", "all_gather", or the event's own name for any other."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    x, y, w = data()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lm.train_on_batch(x, y, sample_weight=w)
    kinds = collections.Counter()
    for event in prof.events():
        if event.name.startswith("c10d::"):
            name = event.name
            kinds["all_reduce" if "allreduce" in name else "all_gather" if "allgather" in name else name] += 1
    return dict(kinds)


def reference_checks(name, initial, tmpdir):
    """Stock Keras, one process, from ``initial``; also loads the sharded run's saved weights."""
    lm = build(name)
    lm.set_weights(initial)
    out = _checks(lm)
    loaded = build(name)
    loaded.load_weights(os.path.join(tmpdir, "lm.weights.h5"))
    out["loaded_weights"] = loaded.get_weights()
    return out


def sharded_many(names, mesh_shape, tmpdir):
    """`sharded_checks` for several backbones on one world (spawning ranks costs seconds)."""
    import keras

    out = {}
    for name in names:
        keras.distribution.set_distribution(None)
        folder = os.path.join(tmpdir, name)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
        out[name] = sharded_checks(name, mesh_shape, folder)
    return out


def reference_many(initials, tmpdir):
    return {name: reference_checks(name, initial, os.path.join(tmpdir, name)) for name, initial in initials.items()}
