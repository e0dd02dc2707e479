"""Rank-side checks of `shardimpl.tp_einsum.local_einsum` against the whole-tensor einsum."""

from __future__ import annotations


def local_einsum_matches_whole(mesh_shape):
    """For each layout row: output, input and kernel gradients against torch on whole tensors,
    the output's placements, and the all-reduces backward issued."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from shardimpl.tp_einsum import local_einsum

    mesh = init_device_mesh("cpu", mesh_shape)
    rest = [Replicate()] * (mesh.ndim - 1)
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(4, 6, 8, generator=g)
    w_full = torch.randn(8, 2, 5, generator=g)  # "abc,cde->abde": EinsumDense's query projection
    eq = "abc,cde->abde"
    cases = {"column": ([Replicate()], [Shard(1)]), "row": ([Shard(2)], [Shard(0)]),
             "data": ([Shard(0)], [Replicate()]), "replicated": ([Replicate()], [Replicate()]),
             "unsupported": ([Shard(1)], [Shard(0)])}
    counted = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args, **kwargs):
        counted["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    out = {}
    try:
        for name, (px, pw) in cases.items():
            x = distribute_tensor(x_full, mesh, px + rest).requires_grad_()
            w = distribute_tensor(w_full, mesh, pw + rest).requires_grad_()
            counted["all_reduce"] = 0
            y = local_einsum(eq, x, w)
            if y is None:
                out[name] = None
                continue
            # Two layers reading the same input (attention's query and key): one all-reduce.
            y2 = local_einsum(eq, x, w)
            (y.full_tensor().square().sum() + y2.full_tensor().sum()).backward()
            xf, wf = x_full.clone().requires_grad_(), w_full.clone().requires_grad_()
            want = torch.einsum(eq, xf, wf)
            (want.square().sum() + want.sum()).backward()
            out[name] = {"y": float((y.full_tensor() - want).detach().abs().max()),
                         "gx": float((x.grad.full_tensor() - xf.grad).abs().max()),
                         "gw": float((w.grad.full_tensor() - wf.grad).abs().max()),
                         "placements": str(y.placements[0]), "backward_all_reduces": counted["all_reduce"]}
    finally:
        dist.all_reduce = original
    return out
