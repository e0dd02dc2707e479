"""Every change shardimpl makes to Keras and torch, in one table, applied all-or-nothing.

`patch_table()` lists each patch: the owner, the attribute (or, for DTensor,
the op whose sharding strategy is replaced), the replacement and why.
`apply_all` applies them in order and, if one raises, undoes the ones already
applied before re-raising; `undo_all` restores exactly what was there
(an attribute the owner did not define itself is deleted again; a DTensor op's
entry in every sharding-strategy table is put back or removed).

`before_install_table()` holds the only rows applied without ``install()``:
from ``import shardimpl`` on (or, when Keras comes later, as soon as Keras'
distribution module is imported), Keras' empty torch ``distribution_lib``
slot (None) holds `shardimpl.keras.before_install`, so that
``keras.distribution.initialize()`` works before ``install()`` and anything
else names it. `install()` replaces the slot like any row; `uninstall()` puts
back what was there.

Nothing else in shardimpl assigns to a Keras or torch attribute. Variables
created sharded carry their own guard (`shardimpl.keras.variables`), which
is per object, not global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from shardimpl.keras import (attention, backend, calls, dense, layout_lookup, local_scoring, losses, norms, optimizers,
                             ops, remat, rules, saving, steps, variables)
from shardimpl.keras.compat import (keras_distribution_lib, keras_ops_nn, torch_core, torch_layer_class, torch_nn,
                                   torch_numpy, torch_parallel_optimizer_class, torch_trainer_class)

__all__ = ["Patch", "patch_table", "before_install_table", "apply_before_install", "apply_all", "undo_all",
           "describe_table"]


@dataclass(frozen=True)
class Patch:
    """One row of the table.

    owner: the patched object, named for people (``"keras...core.Variable"``).
    attribute: the attribute replaced, or for ``kind="dtensor-op"`` the aten op.
    why: one line.
    targets: returns the live owner objects (several for a function that Keras
        modules import by name) or, for ``kind="dtensor-op"``, the op overloads.
    replacement: ``original -> replacement`` for attributes and settings;
        ``op -> None`` (it writes the op's strategy into DTensor's tables) for
        dtensor-op rows.
    kind: "attribute" (set; undone by restoring or deleting the owner's own
        attribute), "setting" (a property such as a C-backed flag: set, and set
        back to its value on undo) or "dtensor-op".
    """

    owner: str
    attribute: str
    why: str
    targets: Callable[[], list]
    replacement: Callable[[Any], Any]
    kind: str = "attribute"


def _one(obj):
    return lambda: [obj()]


def patch_table() -> list[Patch]:
    """The whole table, resolved against the Keras version in this process."""
    core = torch_core
    trainer = torch_trainer_class

    keras_backend_pkg = _keras_backend_pkg

    def loss_function_wrapper():
        from keras.src.losses.losses import LossFunctionWrapper

        return LossFunctionWrapper

    def base_trainer():
        from keras.src.trainers.trainer import Trainer

        return Trainer

    def data_adapters():
        from keras.src.trainers import data_adapters as mod

        return mod

    def saving_lib():
        from keras.src.saving import saving_lib as mod

        return mod

    def legacy_h5():
        from keras.src.legacy.saving import legacy_h5_format as mod

        return mod

    def variable():
        return core().Variable

    def embedding_layer():
        from keras.src.layers.core.embedding import Embedding

        return Embedding

    def layer():
        from keras.src.layers.layer import Layer

        return Layer

    def dense_layer():
        from keras.src.layers.core.dense import Dense

        return Dense

    def einsum_dense_layer():
        from keras.src.layers.core.einsum_dense import EinsumDense

        return EinsumDense

    rows = [
        Patch("keras.src.distribution.distribution_lib", "distribution_lib",
              "Keras' distribution API calls its backend module by this name; torch has none",
              _one(keras_distribution_lib), lambda _: backend),
        Patch("keras.src.backend", "distribution_lib",
              "the same backend module, where Keras' backend package exposes it",
              _one(keras_backend_pkg), lambda _: backend),
        Patch("keras.src.distribution.distribution_lib.LayoutMap", "__getitem__",
              "a path's matching key is remembered: a layer call's output-layout lookup runs no regex "
              "per call", lambda: [keras_distribution_lib().LayoutMap], layout_lookup.wrap_getitem),
        Patch("keras.src.distribution.distribution_lib.TensorLayout", "_validate_axes",
              "a layout entry may name several mesh axes, e.g. ((\"batch\", \"model\"), None)",
              lambda: [keras_distribution_lib().TensorLayout], backend.wrap_validate_axes),
        Patch("<torch core>.Variable", "_initialize_with_initializer",
              "under a distribution, draw only this rank's shard of the initializer",
              _one(variable), variables.wrap_initialize_with_initializer),
        Patch("<torch core>.Variable", "_initialize",
              "under a distribution, keep only this rank's shard of a concrete value",
              _one(variable), variables.wrap_initialize),
        Patch("<torch core>.Variable", "_direct_assign",
              "assigning a full value to a sharded variable keeps this rank's slice",
              _one(variable), saving.wrap_direct_assign),
        Patch("<torch core>.Variable", "_convert_to_tensor",
              "a full value for a sharded variable stays on the host until sliced",
              _one(variable), saving.wrap_convert_to_tensor),
        Patch("every keras module holding <torch core>.convert_to_numpy", "convert_to_numpy",
              "DTensors come back as full host arrays (gathered one variable at a time)",
              saving.convert_to_numpy_owners, saving.wrap_convert_to_numpy),
        Patch("keras.src.saving.saving_lib", "save_model",
              "rank 0 writes the file once every rank gathered; no partial file on failure",
              _one(saving_lib), saving.atomic_save),
        Patch("keras.src.saving.saving_lib", "save_weights_only",
              "as save_model, for save_weights",
              _one(saving_lib), saving.atomic_save),
        Patch("keras.src.legacy.saving.legacy_h5_format", "save_model_to_hdf5",
              "as save_model, for legacy .h5 files (else every rank opens the same HDF5 file)",
              _one(legacy_h5), saving.atomic_save),
        Patch("keras.src.trainers.data_adapters", "get_data_adapter",
              "every rank loads the same global batches; the steps lay them out",
              _one(data_adapters), steps.wrap_get_data_adapter),
    ]
    rows.append(Patch("keras.src.layers.layer.Layer", "__call__",
                      "a direct call (model(x), the build fallback, generate) runs as in a step and "
                      "returns plain tensors", _one(layer), calls.wrap_layer_call))
    rows.append(Patch("<torch layer>.TorchLayer", "forward",
                      "inside a step or direct call, a layer's call reads variables split along the "
                      "data axis gathered along it (FSDP), and only there", _one(torch_layer_class),
                      calls.wrap_forward))
    for name in ("_track_variables", "_post_track_variable"):
        rows.append(Patch("<torch layer>.TorchLayer", name,
                          "a layer's torch parameters are the sharded variables, never gathered copies",
                          _one(torch_layer_class), calls.wrap_track_variables))
    rows.append(Patch("keras.src.layers.core.embedding.Embedding", "call",
                      "a sharded table (vocabulary-split too) is looked up without torch 2.13's "
                      "_MaskPartial defect; the gradient keeps the table's layout",
                      _one(embedding_layer), calls.wrap_embedding_call))
    rows.append(Patch("keras.src.layers.core.dense.Dense", "call",
                      "a sharded kernel's matmul on local blocks with the collectives its layout implies "
                      "(Megatron's f and g); DTensor's propagation re-laid gradients out in backward",
                      _one(dense_layer), dense.wrap_dense_call))
    rows.append(Patch("keras.src.layers.core.einsum_dense.EinsumDense", "call",
                      "as Dense.call: a sharded kernel's einsum on local blocks",
                      _one(einsum_dense_layer), dense.wrap_einsum_dense_call))
    rows.append(Patch("<torch core>", "slice_update",
                      "an update of a value split along a dim (a sampler's batch-split prompt) is "
                      "done on its gathered form and laid out again; DTensor has no in-place rule",
                      _one(core), ops.wrap_slice_update))
    rows.append(Patch("<torch numpy>", "repeat",
                      "a DTensor repeated by an integer along an axis (GroupQueryAttention's key-value heads) "
                      "on the local block; DTensor took four dispatches forward and backward",
                      _one(torch_numpy), ops.wrap_repeat))
    rows.append(Patch("<torch numpy>", "matmul",
                      "x @ a sharded 2-D kernel (a reversible embedding's LM head) on local blocks with "
                      "Megatron's f; DTensor left x's gradient Partial, reduced again at every residual add",
                      _one(torch_numpy), ops.wrap_matmul))
    rows.append(Patch("<torch numpy>", "einsum",
                      "an einsum of two DTensors split alike along a letter the output keeps (attention "
                      "split by heads) on the local blocks; DTensor decomposed it into a dozen dispatches",
                      _one(torch_numpy), ops.wrap_einsum))
    rows.append(Patch("<torch numpy>", "argmax",
                      "argmax over vocabulary-split logits (an accuracy metric, greedy sampling) from each "
                      "rank's best value and index; DTensor gathered the whole logits on every rank",
                      _one(torch_numpy), ops.wrap_argmax))
    rows.append(Patch("<torch core>", "remat",
                      "keras.RematScope's checkpoints free recomputed tensors at once: torch's early "
                      "stop left them in a traceback's reference cycle until the garbage collector ran",
                      _one(core), remat.wrap_remat))
    rows.append(Patch("<torch nn>", "dot_product_attention",
                      "attention on heads- or batch-split inputs runs on the local blocks (fused kernels "
                      "included); DTensor decomposed the math kernel into dozens of dispatches",
                      _one(torch_nn), attention.wrap_dot_product_attention))
    rows.append(Patch("keras.src.ops.nn", "_rms_normalization",
                      "RMS normalization of a row-wise laid out DTensor runs torch's fused rms_norm on the "
                      "local rows; the composite op decomposed into ~17 DTensor dispatches per norm",
                      _one(keras_ops_nn), norms.wrap_rms_normalization))
    rows.append(Patch("<torch nn>", "sparse_categorical_crossentropy",
                      "logits split along the vocabulary (a vocabulary-split LM head) give their loss "
                      "from each rank's block, never gathered whole (vocabulary-parallel cross-entropy)",
                      _one(torch_nn), losses.wrap_sparse_categorical_crossentropy))
    rows.append(Patch("keras.src.losses.losses.LossFunctionWrapper", "call",
                      "mean squared / absolute error of vocabulary-split logits from each rank's block "
                      "(one all-reduce of a float per position; DTensor took a dozen dispatches)",
                      _one(loss_function_wrapper), losses.wrap_loss_function_call))
    rows.append(Patch("keras.src.trainers.trainer.Trainer", "_compute_loss",
                      "replicated outputs and targets scored as plain tensors (each op of the loss was a "
                      "DTensor dispatch, forward and backward; every rank computes the same values)",
                      _one(base_trainer), local_scoring.wrap_compute_loss))
    rows.append(Patch("keras.src.trainers.trainer.Trainer", "compute_metrics",
                      "as _compute_loss, for the metrics", _one(base_trainer), local_scoring.wrap_compute_metrics))
    for name in ("train_step", "test_step"):
        rows.append(Patch("<torch trainer>", name,
                          "batches laid out on the mesh (replicated where the data axis does not divide "
                          "them); mixed Tensor/DTensor ops and math attention allowed",
                          _one(trainer), steps.wrap_step))
    rows.append(Patch("<torch trainer>", "predict_step",
                      "as train_step; outputs gathered to the host in the step (Keras converts them "
                      "in callback threads, where collectives would interleave across ranks)",
                      _one(trainer), steps.wrap_predict_step))
    for name in ("fit", "evaluate", "predict"):
        rows.append(Patch("<torch trainer>", name,
                          "the host RNGs agreed from rank 0, so shuffled batches match across ranks",
                          _one(trainer), steps.wrap_loop))
    rows.append(Patch("<torch trainer>", "_should_torch_compile",
                      "jit_compile=True under a distribution runs the steps eagerly, with a warning "
                      "(torch.compile cannot trace the sharded step)",
                      _one(trainer), steps.wrap_should_torch_compile))
    rows.append(Patch("<torch trainer>", "_initialize_ddp",
                      "keras-nightly only: DDP cannot take DTensor parameters (grads are already reduced)",
                      lambda: [c for c in [trainer()] if hasattr(c, "_initialize_ddp")],
                      steps.wrap_initialize_ddp))
    rows.append(Patch("<torch optimizers>.TorchParallelOptimizer", "_backend_update_step",
                      "sharded variables' elementwise updates (SGD, Adam, AdamW, ...) run on local shards in "
                      "bounded chunks, not with whole-model _foreach temporaries",
                      _one(torch_parallel_optimizer_class), optimizers.wrap_backend_update_step))
    rows.append(Patch("torch DTensor op dispatcher (the installing thread)", "_allow_implicit_replication",
                      "eager user code (samplers, metrics, custom loops) mixes plain tensors with "
                      "DTensors as replicated values, as JAX's global arrays do",
                      lambda: [DTensor._op_dispatcher], lambda _: True, kind="setting"))
    aten = torch.ops.aten
    rows += [
        Patch("DTensor sharding propagator tables", "aten.embedding_dense_backward.default",
              "the embedding's weight gradient made column-sharded, never full-size Partial",
              lambda: [aten.embedding_dense_backward.default],
              rules.install_embedding_backward_rule, kind="dtensor-op"),
        Patch("DTensor sharding propagator tables", "aten.mm.default",
              "no Partial/Replicate result larger than both inputs (whole weight gradients)",
              lambda: [aten.mm.default], rules.install_no_oversized_mm_rule, kind="dtensor-op"),
        Patch("DTensor sharding propagator tables", "aten.bmm.default",
              "as mm, for batched matmuls (attention)",
              lambda: [aten.bmm.default], rules.install_no_oversized_mm_rule, kind="dtensor-op"),
    ]
    return rows


def _keras_backend_pkg():
    from keras.src import backend as pkg

    return pkg


def before_install_table() -> list[Patch]:
    """The rows `apply_before_install` applies, only where Keras' slot is empty (None)."""
    from shardimpl.keras import before_install

    def fill(original):
        return before_install if original is None else original

    return [
        Patch("keras.src.backend", "distribution_lib",
              "until install(): keras.distribution.initialize() joins the world; other names say "
              "to call install() (stock: None, so initialize() raised AttributeError on NoneType)",
              _one(_keras_backend_pkg), fill),
        Patch("keras.src.distribution.distribution_lib", "distribution_lib",
              "the same, where keras.distribution.initialize() reads it",
              _one(keras_distribution_lib), fill),
    ]


def apply_before_install() -> None:
    """Fill Keras' empty torch ``distribution_lib`` slots (`before_install_table`); nothing on
    another backend or when a slot is taken. Never raises: ``import keras`` must not fail here."""
    try:
        if _keras_backend_pkg().backend() != "torch":
            return
        for patch in before_install_table():
            for target in patch.targets():
                if getattr(target, patch.attribute, None) is None:
                    setattr(target, patch.attribute, patch.replacement(None))
    except Exception as exc:  # e.g. a Keras that moved a name: stock behaviour, with a word
        import warnings

        warnings.warn(f"shardimpl could not prepare keras.distribution.initialize() before install(): "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


_MISSING = object()


def _apply_one(patch: Patch, target) -> tuple:
    if patch.kind == "setting":  # a property (e.g. backed by C state): set, and set back on undo
        original = getattr(target, patch.attribute)
        setattr(target, patch.attribute, patch.replacement(original))
        return ("setting", target, patch.attribute, original)
    if patch.kind == "dtensor-op":
        snapshot = {name: table.get(target, _MISSING) for name, table in rules.strategy_tables().items()}
        record = ("dtensor-op", target, snapshot)
        try:
            patch.replacement(target)
        except BaseException:
            _undo_one(record)
            raise
        rules.clear_sharding_cache()
        return record
    original = getattr(target, patch.attribute, None)
    had_own = patch.attribute in vars(target)
    setattr(target, patch.attribute, patch.replacement(original))
    return ("attribute", target, patch.attribute, had_own, original)


def _undo_one(record: tuple) -> None:
    if record[0] == "setting":
        _, target, attribute, original = record
        setattr(target, attribute, original)
        return
    if record[0] == "dtensor-op":
        _, op, snapshot = record
        for name, table in rules.strategy_tables().items():
            before = snapshot.get(name, _MISSING)
            if before is _MISSING:
                table.pop(op, None)
            else:
                table[op] = before
        rules.clear_sharding_cache()
        return
    _, target, attribute, had_own, original = record
    if had_own:
        setattr(target, attribute, original)
    elif attribute in vars(target):
        delattr(target, attribute)


def apply_all(table: list[Patch]) -> list[tuple]:
    """Apply every row; on any failure undo what was applied and re-raise. Returns undo records."""
    applied: list[tuple] = []
    try:
        for patch in table:
            for target in patch.targets():
                applied.append(_apply_one(patch, target))
    except BaseException:
        undo_all(applied)
        raise
    return applied


def undo_all(applied: list[tuple]) -> None:
    """Undo records in reverse order of application."""
    for record in reversed(applied):
        _undo_one(record)
    applied.clear()


def describe_table() -> str:
    """The table as Markdown (owner | attribute | why), for docs and notes."""
    lines = ["| owner | attribute | why |", "|---|---|---|"]
    for p in patch_table():
        lines.append(f"| {p.owner} | `{p.attribute}` | {p.why} |")
    for p in before_install_table():
        lines.append(f"| {p.owner} | `{p.attribute}` | (from `import shardimpl`, where None) {p.why} |")
    return "\n".join(lines)
