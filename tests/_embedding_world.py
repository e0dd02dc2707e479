"""Rank-side checks of `shardimpl.embedding.embedding_lookup` and the torch DTensor defect it avoids."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor


def torch_defect():
    """Does torch's own vocabulary-split lookup still fail when its output feeds two reductions?"""
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    torch.manual_seed(0)
    w = distribute_tensor(torch.randn(10, 4), mesh, [Shard(0)])
    ids = DTensor.from_local(torch.tensor([[1, 7, 3]]), mesh, [Replicate()])
    y = torch.nn.functional.embedding(ids, w)
    try:
        (y + 1).full_tensor()
        (y - 1).full_tensor()
    except AssertionError:
        return "AssertionError"
    return "ok"


def lookup_matches_torch(mesh_shape):
    """Forward and table gradient of embedding_lookup vs plain torch, for several table layouts."""
    from shardimpl.embedding import embedding_lookup

    names = ("batch", "model")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(1)
    full_w = torch.randn(37, 8)
    ids_full = torch.randint(-37, 37, (4, 5))
    results = {}
    layouts = {"vocab": [Shard(0)] * len(mesh_shape), "hidden": [Shard(1)] * len(mesh_shape),
               "replicated": [Replicate()] * len(mesh_shape)}
    if len(mesh_shape) == 2:
        layouts["keras-hub (model, batch)"] = [Shard(1), Shard(0)]
        layouts["vocab over model, ids over batch"] = [Replicate(), Shard(0)]
    for name, placements in layouts.items():
        for ids_split in (False, True) if len(mesh_shape) == 2 else (False,):
            w = distribute_tensor(full_w.clone(), mesh, placements).requires_grad_()
            ids = ids_full
            if ids_split:
                ids = distribute_tensor(ids_full, mesh, [Shard(0), Replicate()])
            out = embedding_lookup(ids, w)
            (out.full_tensor() * torch.arange(8.0)).sum().backward()
            ref_w = full_w.clone().requires_grad_()
            ref = torch.nn.functional.embedding(torch.where(ids_full < 0, ids_full + 37, ids_full), ref_w)
            (ref * torch.arange(8.0)).sum().backward()
            grad = w.grad
            results[f"{name}{' ids-split' if ids_split else ''}"] = {
                "forward": float((out.full_tensor() - ref).abs().max()),
                "grad": float((grad.full_tensor() - ref_w.grad).abs().max()),
                "grad_layout_kept": tuple(grad.placements) == tuple(w.placements)
                or any(isinstance(p, Replicate) for p in w.placements),
                "grad_local_numel": grad.to_local().numel(),
                "table_local_numel": w.to_local().numel(),
            }
    return results
