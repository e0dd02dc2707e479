"""LayoutMaps other than the family's own: for peers that cannot run the family's, and for comparison.

* ``family``: the family's own map (`bench.harness.families.layout_map`).
* ``whole-stream``: the family's own map with the residual stream whole between layers (no
  sequence parallelism; the transformer's and the keras-hub families' maps split it otherwise):
  its figures beside the family's show what splitting the sequence saves and costs.
* ``width-split``: the families' previous 1-D maps, from before the transformer's map split its
  embedding by vocabulary and pinned the row-split layers' outputs replicated (Megatron's
  residual stream). keras-nightly's torch ModelParallel cannot run that map (it mixes a plain
  tensor with a DTensor in the step: ``x2=torch.Tensor(shape=[8, 16, 916])``); it can run this one.
  Every kernel is split on one dim over "model": the token embedding by width, attention by
  heads where they divide evenly over the ranks (else by width), the MLP's up/gate kernels by
  column and its down kernel by row, the LM head by vocabulary, the mlp family's kernels all
  by column (its map before column/row alternation). No activation layouts: the backend chooses.
  Norms and biases of row-split kernels stay replicated.

The rules are regular expressions over layer paths, written to match both the current layer
names (``block{b}_ln1``, ``block{b}_attn/{query,key,value,attention_output}``,
``block{b}_mlp_up``, ``block{b}_mlp_down``, ``dense_{i}``) and the Llama-shaped ones
(``block{b}_mlp_gate``, ``lm_head``; ``block{b}_norm*`` and ``final_norm`` stay replicated as
every norm does). A path no rule matches stays replicated.
"""

from __future__ import annotations

__all__ = ["LAYOUTS", "peer_layout_map", "width_split_map"]

LAYOUTS = ("family", "whole-stream", "width-split")


def _model_ranks(mesh) -> int:
    names = list(mesh.axis_names)
    if "model" not in names:
        raise ValueError(f"A width-split map needs a mesh with a 'model' axis. Received: axis_names={names}.")
    return int(mesh.shape[names.index("model")])


def _heads_divide(family: str, param_bytes, ranks: int) -> bool:
    """Whether every attention kernel's heads (query heads, and key/value heads where the
    family has fewer of them) divide evenly over ``ranks``; False where the dims do not say."""
    if not param_bytes:
        return False
    from bench.harness.families import dims_for

    try:
        dims = dims_for(family, param_bytes)
    except ValueError:
        return False
    heads = [dims[k] for k in ("heads", "kv_heads", "num_key_value_heads") if dims.get(k)]
    return bool(heads) and all(h % ranks == 0 for h in heads)


def width_split_map(family: str, mesh, param_bytes: int | None = None):
    """The families' previous 1-D map over the mesh's "model" axis (see the module docstring)."""
    import keras

    ranks = _model_ranks(mesh)
    lm = keras.distribution.LayoutMap(mesh)
    if family == "mlp":
        lm[r".*dense_\d+/kernel"] = (None, "model")
        lm[r".*dense_\d+/bias"] = ("model",)
        return lm
    if family != "transformer":
        raise ValueError(f"width-split maps exist for the families mlp and transformer. Received: family={family!r}; "
                         "use the family's own map (layouts 'family').")
    lm[r".*token_embedding/embeddings"] = (None, "model")
    if _heads_divide(family, param_bytes, ranks):
        lm[r".*attn/(query|key|value)/kernel"] = (None, "model", None)
        lm[r".*attn/(query|key|value)/bias"] = ("model", None)
        lm[r".*attn/attention_output/kernel"] = ("model", None, None)
    else:
        lm[r".*attn/(query|key|value)/kernel"] = ("model", None, None)
        lm[r".*attn/attention_output/kernel"] = (None, None, "model")
    lm[r".*mlp_(up|gate)/kernel"] = (None, "model")
    lm[r".*mlp_(up|gate)/bias"] = ("model",)
    lm[r".*mlp_down/kernel"] = ("model", None)
    lm[r".*lm_head/kernel"] = (None, "model")
    lm[r".*lm_head/bias"] = ("model",)
    return lm


def peer_layout_map(layouts: str, family: str, mesh, param_bytes: int | None = None, *, batch: int | None = None,
                    seq: int | None = None):
    """The LayoutMap named ``layouts`` (one of `LAYOUTS`) for ``family`` on ``mesh``."""
    if layouts == "family":
        from bench.harness.families import layout_map

        return layout_map(family, mesh, param_bytes, batch=batch, seq=seq)
    if layouts == "whole-stream":  # the family's map with the residual stream whole: no sequence parallelism
        from bench.harness.families import layout_map

        return layout_map(family, mesh, param_bytes, batch=batch, seq=None)
    if layouts == "width-split":
        return width_split_map(family, mesh, param_bytes)
    raise ValueError(f"layouts must be one of {', '.join(LAYOUTS)}. Received: layouts={layouts!r}.")
