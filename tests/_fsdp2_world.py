"""Rank-side checks of the fsdp2 peer (`bench.tools.peers.fsdp2`): its measured rows' figures and
its train step on given full weights."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")


def _load_full_weights(model, full: dict) -> None:
    """Copy this rank's dim-0 shard of each full array into FSDP2's sharded parameters (FSDP2
    shards dim 0 as torch.chunk cuts it)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for name, p in model.named_parameters():
            chunks = torch.chunk(torch.from_numpy(full[name]), world, dim=0)
            if rank < len(chunks):
                p.to_local().copy_(chunks[rank])


def measured_and_trained(measured, trained, full_weights, steps):
    """``measured`` (a Scenario) through the peer's own rank measurement, then ``trained``'s model
    sharded by the peer with ``full_weights`` loaded: the losses of ``steps`` train steps."""
    from bench.tools.peers import fsdp2
    from bench.tools.peers.torch_families import family_loss

    out = {"measured": fsdp2.measure_rank(measured)}
    model = fsdp2.build_sharded(trained.family, trained.param_bytes, trained.train, "cpu")
    _load_full_weights(model, full_weights)
    optimizer = fsdp2.torch_optimizer(model.parameters(), trained.train)
    data = fsdp2.batch_for(trained, "cpu")
    loss = family_loss(trained.family)
    out["losses"] = [fsdp2.train_step(model, optimizer, data, loss) for _ in range(steps)]
    return out
