"""The Keras variants `python -m bench speed` times, set up once for every tool that times them.

`keras_step` builds and compiles one variant (stock, shardimpl on this rank, or stock on one
rank's shapes) as `bench.tools.speed` and `bench.tools.paired` both time it; `ordinary_malloc`
puts a rank's allocator back to an ordinary process's before timing; `warmed_reference` sets
up the hand-written step (`bench.tools.tp_reference`) as `speed` and `step_phases` time it.
"""

from __future__ import annotations

MiB = 1 << 20
WARMUP = 3  # untimed steps first: a sharded run's second and third steps still fill caches (layouts, DTensor's)


def _all_column_mlp_map(mesh):
    """Every mlp kernel split on its output features (the layout before column/row alternation)."""
    import keras

    lm = keras.distribution.LayoutMap(mesh)
    lm[r".*dense_\d+/kernel"] = (None, "model")
    lm[r".*dense_\d+/bias"] = ("model",)
    return lm


def ordinary_malloc() -> None:
    """Undo the launcher's `prefer_mmap` in this rank: time steps as an ordinary process runs them.

    Ranks send every block >= 128 KiB to mmap so that memory budgets bite; each
    step's gradients then come back as fresh, zero-filled pages (measured: stock
    mlp step 55 ms in a rank vs 38 ms in a plain process). glibc's own dynamic
    threshold ends at 32 MiB, so that is what timing runs use, stock and sharded alike, with the
    trim threshold glibc pairs with it (twice that: `shardimpl.budgets.keep_freed_heap`); left
    at 128 KiB, freed gradients went back to the OS and page-faulted in again every step.
    """
    from shardimpl.budgets import keep_freed_heap, prefer_mmap

    prefer_mmap(32 * MiB)
    keep_freed_heap(64 * MiB)


def keras_step(family: str, size: int, sharded: bool, all_column: bool = False, one_rank_of: int | None = None,
               megatron: bool = False):
    """(model, x, y) of one Keras variant, compiled as every run of this tool compiles it: stock
    (one process), sharded (this rank of N: shardimpl installed, the family's LayoutMap set),
    with ``one_rank_of`` = N, stock Keras on one rank's shapes (`bench.harness.rank_local`), or with
    ``megatron``, those shapes with the hand-written step's collectives (`bench.tools.keras_megatron`)."""
    import keras
    import numpy as np

    from bench.harness.families import HUB, build_model, layout_map, model_mesh, sample_batch, sample_targets
    from bench.harness.rank_local import rank_local_batch, rank_local_model

    if sharded:
        import shardimpl

        shardimpl.install()
        mesh = model_mesh(family, keras.distribution.list_devices())
        kwargs = {"batch_dim_name": "batch"} if "batch" in mesh.axis_names else {}
        lm = _all_column_mlp_map(mesh) if all_column and family == "mlp" else layout_map(family, mesh, size)
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm, **kwargs))
    keras.utils.set_random_seed(1)
    if megatron:
        from bench.tools.keras_megatron import megatron_loss, megatron_model

        model, batch = megatron_model(family, size), sample_batch(family, size)
        model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss=megatron_loss(family))
        x = batch.numpy()
        return model, x, np.zeros(model.compute_output_shape(x.shape), "float32")
    if one_rank_of:
        model, batch = rank_local_model(family, size, one_rank_of), rank_local_batch(family, size, one_rank_of)
    else:
        model, batch = build_model(family, size), sample_batch(family, size)
    x = {k: v.numpy() for k, v in batch.items()} if isinstance(batch, dict) else batch.numpy()
    optimizer = keras.optimizers.SGD(1e-4, momentum=0.9)
    if family in HUB:  # a CausalLM: next-token ids, its own loss (its default metrics need them too)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[])
        y = sample_targets(family, size).numpy()
    else:
        model.compile(optimizer=optimizer, loss="mse")
        shape = model.compute_output_shape({k: v.shape for k, v in x.items()} if isinstance(x, dict) else x.shape)
        y = np.zeros(shape, "float32")
    return model, x, y


def warmed_reference(family: str, size: int):
    """(model, optimizer, x) of the hand-written step in this rank, the allocator put back
    (`ordinary_malloc`) and `WARMUP` steps taken: ready to time."""
    from bench.harness.families import sample_batch
    from bench.tools import tp_reference

    ordinary_malloc()
    model = tp_reference.build_reference(family, size)
    optimizer = tp_reference.make_optimizer(model)
    x = sample_batch(family, size)
    for _ in range(WARMUP):
        tp_reference.reference_step(model, optimizer, x)
    return model, optimizer, x
