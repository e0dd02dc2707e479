"""Rank-side checks of FSDP x TP on a 2-D ("batch", "model") mesh (`shardimpl.fsdp`).

Each function runs on every rank of a (2, 2) world (or on one process for the
unsharded reference) and returns plain data for `test_fsdp.py` to compare.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

MESH = (2, 2)
SIZE = 1 << 20  # 1 MiB of parameters: mlp width 256; transformer d_model 56, 2 blocks, vocab 1752
STEPS_DATA = 32  # samples: 4 global batches of 8
SEQ = 16  # tokens per sequence (the harness' default is longer; the checks need no more)
MiB = 1 << 20


def _data(family, seed=5):
    from bench.harness.families import BATCH, sample_batch, sample_targets

    parts = range(STEPS_DATA // BATCH)
    x = np.concatenate([sample_batch(family, SIZE, seed + i, seq=SEQ).numpy() for i in parts])
    y = np.concatenate([sample_targets(family, SIZE, seed + i, seq=SEQ).numpy() for i in parts])
    return x, y


def _compile(model, family):
    import keras

    loss = "mse" if family == "mlp" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss)


def _set_2d(family):
    import keras

    import shardimpl
    from bench.harness.families import layout_map, model_mesh

    shardimpl.install()
    mesh = model_mesh(family, keras.distribution.list_devices(), MESH)
    dist = keras.distribution.ModelParallel(layout_map=layout_map(family, mesh, SIZE, seq=SEQ), batch_dim_name="batch")
    keras.distribution.set_distribution(dist)
    return dist


def _placements(model):
    out = {}
    for v in model.weights:
        t = v.value
        out[v.path] = (str(tuple(t.placements)), int(t.to_local().numel()), int(t.numel()))
    return out


def _grads(model, family, batch):
    """A direct call and loss.backward() (the bench's step): every gradient, gathered."""
    from torch.distributed.tensor import DTensor

    out = model(batch)
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads, layouts_kept = {}, True
    for v in model.trainable_weights:
        g = v.value.grad
        if isinstance(g, DTensor):
            layouts_kept &= tuple(g.placements) == tuple(v.value.placements)
            g = g.full_tensor()
        grads[v.path] = g.detach().cpu().numpy()
        v.value.grad = None
    return float(loss.detach()), grads, layouts_kept


def fsdp_run(family):
    """fit and a custom loop on the (2, 2) mesh with the family's 2-D LayoutMap."""
    import keras

    import shardimpl.fsdp as fsdp
    from bench.harness.families import build_model, sample_batch
    from shardimpl.keras.fsdp import gather_axis
    from shardimpl.keras.steps import data_axis
    from shardimpl.meters import PeakMeter

    dist = _set_2d(family)
    keras.utils.set_random_seed(11)
    model = build_model(family, SIZE, seq=SEQ)
    initial = model.get_weights()
    out = {"initial": initial, "data_axis": data_axis(dist), "placements": _placements(model)}
    # Split along "batch" on a dim of their own: gathered while their layer runs (embedding
    # tables excepted: a lookup moves ids instead).
    out["gathered"] = sorted(v.path for v in model.weights
                             if gather_axis(v.value, dist) is not None and not v.path.endswith("embeddings"))

    # The custom loop first (no optimizer state yet): gradients land in the variables' layouts.
    batch = sample_batch(family, SIZE, 1, seq=SEQ)
    before = fsdp.stats().forward, fsdp.stats().backward, fsdp.stats().tokens
    out["loop_loss"], out["grads"], out["grad_layouts_kept"] = _grads(model, family, batch)
    after = fsdp.stats().forward, fsdp.stats().backward, fsdp.stats().tokens
    out["gathers"] = [a - b for a, b in zip(after, before)]

    # The forward keeps no gathered weight alive for the backward: tokens, not blocks.
    with PeakMeter("cpu") as meter:
        kept = model(batch)
        kept = (kept.float() ** 2).mean()
    out["forward_live_end"] = meter.result().live_bytes_end
    out["forward_peak"] = meter.result().device_peak_bytes
    out["gathered_alive_after_forward"] = fsdp.live_gathered()
    kept.backward()
    for v in model.trainable_weights:
        v.value.grad = None
    del kept

    out.update(_fit_from(model, family, initial))
    out["optimizer_local"] = int(sum(v.value.to_local().numel() for v in model.optimizer.variables
                                     if hasattr(v.value, "to_local")))
    out["optimizer_full"] = int(sum(v.value.numel() for v in model.optimizer.variables if hasattr(v.value, "to_local")))
    return out


def _fit_from(model, family, initial) -> dict:
    """Compile, reset to ``initial``, fit two epochs, evaluate, predict, read the weights."""
    _compile(model, family)
    model.set_weights(initial)
    x, y = _data(family)
    hist = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return {"loss": hist.history["loss"],
            "evaluate": float(model.evaluate(x, y, batch_size=8, verbose=0)),
            "predict": model.predict(x[:8], batch_size=8, verbose=0),
            "weights": model.get_weights()}


def reference_run(family, initial):
    """The same model, unsharded with stock Keras in one process, from the same weights."""
    import keras

    from bench.harness.families import build_model, sample_batch

    keras.distribution.set_distribution(None)
    model = build_model(family, SIZE, seq=SEQ)
    model.set_weights(initial)
    batch = sample_batch(family, SIZE, 1, seq=SEQ)
    out = {}
    out["loop_loss"], out["grads"], _ = _grads(model, family, batch)
    out.update(_fit_from(model, family, initial))
    return out


def core_checks():
    """The torch-only pieces on the (2, 2) torch mesh: gather along one axis, relayout, tokens."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import shardimpl.fsdp as fsdp

    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("batch", "model"))
    rank = dist.get_rank()
    out = {}
    # Uneven (5 and 7 over 2) on dims 0, 1 and 2, data axis on each.
    full = torch.arange(5 * 7 * 3, dtype=torch.float32).reshape(5, 7, 3)
    cases = {"dim0": [Shard(0), Shard(1)], "dim1": [Shard(1), Shard(0)], "dim2": [Shard(2), Shard(0)]}
    gathered_ok = {}
    for name, placements in cases.items():
        x = distribute_tensor(full, mesh, placements)
        g = fsdp.gather_for_compute(x, 0)
        gathered_ok[name] = (tuple(g.placements) == fsdp.gathered_placements(placements, 0)
                             and torch.equal(g.full_tensor(), full)
                             and torch.equal(g.to_local(), x.redistribute(mesh, g.placements).to_local()))
    out["gathered_ok"] = gathered_ok
    # Backward: a gradient that is a sum over "batch" (Partial) is reduce-scattered back; a
    # replicated one is sliced; the result has the parameter's layout and the right values.
    param = distribute_tensor(full, mesh, [Shard(0), Shard(1)]).requires_grad_()
    g = fsdp.gather_for_compute(param, 0)
    b = mesh.get_coordinate()[0]
    sum_over_batch = DTensor.from_local(torch.full(g.to_local().shape, float(b + 1)), mesh, [Partial(), Shard(1)],
                                        run_check=False, shape=g.shape, stride=g.stride())
    g.backward(sum_over_batch)
    out["grad_layout"] = str(tuple(param.grad.placements))
    out["grad_values"] = sorted(set(param.grad.full_tensor().reshape(-1).tolist()))  # 1 + 2 everywhere
    replicated = distribute_tensor(full, mesh, [Shard(0), Shard(1)]).requires_grad_()
    fsdp.gather_for_compute(replicated, 0).sum().backward()
    out["grad_replicated_layout"] = str(tuple(replicated.grad.placements))
    out["grad_replicated_values"] = sorted(set(replicated.grad.full_tensor().reshape(-1).tolist()))
    # relayout: one axis at a time, never through a whole gather.
    local = torch.full((4, 6), float(rank))
    part = DTensor.from_local(local, mesh, [Partial(), Shard(1)], run_check=False)
    moved = fsdp.relayout(part, [Shard(0), Shard(1)])
    want = part.redistribute(mesh, [Replicate(), Replicate()]).redistribute(mesh, [Shard(0), Shard(1)])
    out["relayout_partial"] = bool(torch.equal(moved.to_local(), want.to_local()))
    wrong_dim = distribute_tensor(full, mesh, [Replicate(), Shard(0)])
    moved = fsdp.relayout(wrong_dim, [Shard(0), Shard(1)])
    out["relayout_shard_move"] = bool(torch.equal(moved.full_tensor(), full)) and \
        tuple(moved.placements) == (Shard(0), Shard(1))
    # Tokens: an op saving the gathered weight (or a view) saves a token; backward re-gathers.
    w = distribute_tensor(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), mesh,
                          [Shard(0), Shard(1)]).requires_grad_()
    xin = distribute_tensor(torch.randn(3, 6, generator=torch.Generator().manual_seed(1)), mesh,
                            [Replicate(), Replicate()]).requires_grad_()
    before = fsdp.stats().tokens, fsdp.stats().backward
    with fsdp.regather_hooks():
        y = xin @ fsdp.gather_for_compute(w, 0).t().t()  # a view of the gathered weight
    y.sum().backward()
    out["tokens"] = [fsdp.stats().tokens - before[0], fsdp.stats().backward - before[1]]
    ref_w = w.full_tensor().detach()
    ref_x = xin.full_tensor().detach()
    out["token_grads_ok"] = bool(torch.allclose(w.grad.full_tensor(), ref_x.sum(0, keepdim=True).t().expand(6, 4))
                                 and torch.allclose(xin.grad.full_tensor(), ref_w.sum(1).expand(3, 6)))
    return out
