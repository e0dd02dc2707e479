"""Stock Keras layers on one rank's shapes with the hand-written step's collectives added.

The speed target of shardimpl's sharded step is the hand-written tensor-parallel step
(`bench.tools.tp_reference`: plain torch, Megatron's f and g). Two things separate them: what
shardimpl itself costs, and what Keras costs over plain torch (its layers' ``__call__``, the
Functional graph, ``compute_loss``, metrics, the trainer and optimizer). `megatron_model` measures
the second alone: on each of N ranks, the stock Keras model of that rank's blocks
(`bench.harness.rank_local`) with exactly the reference's collectives put in by hand, as a user
would write Megatron in Keras: f before each column-split layer that reads a computed
activation, g after each row-split one,
the vocabulary-split embedding's masked lookup and g, and the reference's loss (mean squared
logits, summed over the ranks for the report). No DTensor, no shardimpl. A sharded step can come
no closer to the reference than this step does without cutting Keras' own work.

`load_blocks` copies each rank's blocks of a whole model's weights in, so that tests can check the
step against stock Keras (`tests/test_tp_reference.py`).
"""

from __future__ import annotations

__all__ = ["LABEL", "megatron_model", "megatron_loss", "load_blocks"]

LABEL = "Keras + f/g by hand"  # how the speed tools name this variant


def _world():
    from bench.tools.tp_reference import _world

    return _world()


def _column_dense():
    """A Dense subclass for a column block (keras imported only when a model is built)."""
    import keras

    from bench.tools.tp_reference import megatron_f

    class ColumnDense(keras.layers.Dense):
        """Dense on a column block: its input through f (the input's gradient summed over ranks)."""

        def call(self, inputs, training=None):
            return super().call(megatron_f(inputs))

    return ColumnDense


def _mlp(param_bytes):
    import keras
    from keras import ops

    from bench.harness.families import BATCH, DEPTH, dims_for
    from bench.tools.tp_reference import megatron_g

    ColumnDense = _column_dense()

    class RowDense(keras.layers.Dense):
        """Dense on a row block: the matmul's partial sums through g, then the bias and activation."""

        def call(self, inputs, training=None):
            x = megatron_g(ops.matmul(inputs, self.kernel))
            if self.bias is not None:
                x = ops.add(x, self.bias)
            return self.activation(x) if self.activation is not None else x

    _, world = _world()
    width = dims_for("mlp", param_bytes)["width"]
    inputs = keras.Input((width,), batch_size=BATCH)
    x = inputs
    for i in range(DEPTH):  # as the reference: column-split even layers (f from the second on), row-split odd ones
        kind = RowDense if i % 2 else (ColumnDense if i else keras.layers.Dense)
        x = kind(width if i % 2 else width // world, activation="relu" if i < DEPTH - 1 else None,
                 name=f"dense_{i}")(x)
    return keras.Model(inputs, x, name="mlp_megatron")


def _transformer(param_bytes):
    import keras
    import torch

    from bench.harness.families import BATCH, SEQ, dims_for
    from bench.harness.rank_local import _transformer_dims
    from bench.harness.transformer import _block_class, block_names
    from bench.tools.tp_reference import megatron_f, megatron_g

    rank, world = _world()
    Block = _block_class()

    class MegatronBlock(Block):
        """The family's block on its heads / N and ffn / N: f before attention and the MLP, g after."""

        def call(self, x):
            h = megatron_f(self.norm1(x))
            x = x + megatron_g(self.attn(h, h, use_causal_mask=True))
            h = megatron_f(self.norm2(x))
            return x + megatron_g(self.mlp_down(self.mlp_gate(h) * self.mlp_up(h)))

    class VocabEmbedding(keras.layers.Embedding):
        """This rank's rows of the table: ids outside them look up zeros; the rows summed by g."""

        def __init__(self, start, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start = start

        def call(self, inputs):
            ids = torch.as_tensor(inputs).long() - self.start
            outside = (ids < 0) | (ids >= self.input_dim)
            rows = super().call(ids.masked_fill(outside, 0))
            return megatron_g(rows.masked_fill(outside.unsqueeze(-1), 0.0))

    dims = _transformer_dims(param_bytes, world)
    vocab = dims_for("transformer", param_bytes)["vocab"]
    tokens = keras.Input((SEQ,), batch_size=BATCH, dtype="int32")
    x = VocabEmbedding(rank * dims["vocab"], dims["vocab"], dims["d_model"], name="token_embedding")(tokens)
    for name in block_names(dims):
        x = MegatronBlock(dims, name=name)(x)
    x = keras.layers.RMSNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = _column_dense()(vocab // world, use_bias=False, name="lm_head")(x)
    return keras.Model(tokens, logits, name="transformer_megatron")


def megatron_model(family: str, param_bytes):
    """This rank's Keras model of ``family`` with the reference's collectives (module docstring);
    torch.distributed initialised with the ranks it splits over."""
    if family == "mlp":
        return _mlp(param_bytes)
    if family == "transformer":
        return _transformer(param_bytes)
    raise ValueError(f"megatron_model: no Keras Megatron model for family {family!r}; it has mlp and transformer.")


def megatron_loss(family: str):
    """The loss `megatron_model` is compiled with: the reference's. The mlp's output is whole:
    mean squared error. The transformer's logits are split by vocabulary: each rank's squared
    logits over the whole vocabulary's count, summed over the ranks by g (the reported loss is the
    global mean; each rank's gradient is its own block's, as the reference's)."""
    if family == "mlp":
        return "mse"
    from keras import ops

    from bench.tools.tp_reference import megatron_g

    _, world = _world()

    def split_logits_mse(y_true, y_pred):
        return megatron_g(ops.mean(ops.square(y_pred - y_true), axis=-1) / world)

    return split_logits_mse


def load_blocks(model, weights: dict, lm) -> None:
    """Assign ``model`` (this rank's) its blocks of ``weights`` ({variable path: whole array}),
    cut along each axis ``lm`` (the family's LayoutMap on a ("model",) mesh) maps to "model"."""
    import numpy as np

    rank, world = _world()
    for v in model.weights:
        full = np.asarray(weights[v.path])
        layout = lm[v.path]
        for axis, name in enumerate(layout.axes if layout is not None else ()):
            if name == "model":
                full = np.array_split(full, world, axis=axis)[rank]
        v.assign(full)
