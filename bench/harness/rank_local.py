"""Stock Keras models of one rank's shapes: the floor a sharded step is measured against.

Under the speed tool's 1-D LayoutMap on N ranks (`bench.harness.families.layout_map`), each rank
computes on blocks: the mlp's column-split layers map width -> width / N, its row-split layers
width / N -> width; the transformer's attention has heads / N query and key-value heads, its MLP
ffn / N, its embedding and LM head vocab / N rows. `rank_local_model` builds exactly that as a
plain Keras model (no distribution), so N processes running it do a sharded step's local work
with stock Keras and no communication at all: what is left of a sharded step's time above it is
the collectives and shardimpl's own overhead; what the floor itself costs above the hand-written
step (`bench.tools.tp_reference`) is stock Keras' (layers, trainer, optimizer).
"""

from __future__ import annotations

__all__ = ["rank_local_model", "rank_local_batch"]


def _transformer_dims(param_bytes, ranks: int) -> dict:
    from bench.harness.families import dims_for
    from bench.harness.transformer import _heads_split

    dims = dims_for("transformer", param_bytes)
    if not _heads_split(dims, ranks) or dims["ffn"] % ranks or dims["vocab"] % ranks:
        raise ValueError(f"rank_local_model: the transformer of {param_bytes} bytes does not split evenly over "
                         f"{ranks} ranks (heads {dims['heads']}, kv heads {dims['kv_heads']}, ffn {dims['ffn']}, "
                         f"vocab {dims['vocab']}); pick another size or rank count.")
    return {**dims, "heads": dims["heads"] // ranks, "kv_heads": dims["kv_heads"] // ranks,
            "ffn": dims["ffn"] // ranks, "vocab": dims["vocab"] // ranks}


def rank_local_model(family: str, param_bytes, ranks: int):
    """The plain Keras model one of ``ranks`` ranks computes under the speed tool's map (module docstring)."""
    import keras

    from bench.harness.families import BATCH, DEPTH, SEQ, dims_for

    if family == "transformer":
        from bench.harness.transformer import build_transformer

        return build_transformer(_transformer_dims(param_bytes, ranks), batch=BATCH, seq=SEQ)
    if family != "mlp":
        raise ValueError(f"rank_local_model: no one-rank model for family {family!r}; it has mlp and transformer.")
    width = dims_for("mlp", param_bytes)["width"]
    if width % ranks:
        raise ValueError(f"rank_local_model: the mlp's width {width} does not split over {ranks} ranks.")
    inputs = keras.Input((width,), batch_size=BATCH)
    x = inputs
    for i in range(DEPTH):  # even layers column-split (width -> width / N), odd ones row-split (back to width)
        x = keras.layers.Dense(width // ranks if i % 2 == 0 else width,
                               activation="relu" if i < DEPTH - 1 else None, name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="mlp_one_rank")


def rank_local_batch(family: str, param_bytes, ranks: int):
    """The speed tool's batch for `rank_local_model`: the mlp's as it is; the transformer's token
    ids folded into the rank's vocab / N rows (the lookup's cost does not depend on which rows)."""
    from bench.harness.families import sample_batch

    batch = sample_batch(family, param_bytes)
    if family == "transformer":
        return batch % _transformer_dims(param_bytes, ranks)["vocab"]
    return batch
