"""Rank-side checks of the vocabulary-parallel cross-entropy (`shardimpl.vocab_parallel`) and of
Keras' sparse cross-entropy on a vocabulary-split LM head (`shardimpl.keras.losses`)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")


def cross_entropy_matches_torch(mesh_shape):
    """Loss per position and the logits' gradient against torch's cross_entropy on the whole
    logits, for even and uneven vocabularies, float32 and bfloat16, 1-D and (batch, model) meshes;
    plus the bytes the function keeps for backward."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from shardimpl import vocab_parallel
    from shardimpl.meters import PeakMeter

    mesh = init_device_mesh("cpu", mesh_shape)
    out = {}
    for vocab in (16, 7):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(vocab)
            logits = (torch.randn(4, 6, vocab, generator=g) * 3).to(dtype)
            target = torch.randint(0, vocab, (4, 6), generator=g)
            placements = (Shard(2),) if len(mesh_shape) == 1 else (Shard(0), Shard(2))
            dist_logits = distribute_tensor(logits.detach().clone(), mesh, placements).requires_grad_()
            loss = vocab_parallel.cross_entropy(dist_logits, target)
            whole = logits.detach().clone().float().requires_grad_()
            ref = F.cross_entropy(whole.movedim(2, 1), target, reduction="none")
            weights = torch.rand(4, 6, generator=g)
            (loss * distribute_tensor(weights, mesh, loss.placements)).sum().backward()
            (ref * weights).sum().backward()
            key = f"vocab{vocab}-{str(dtype).split('.')[-1]}"
            out[key] = {
                "loss": float((loss.full_tensor() - ref).abs().max()),
                "grad": float((dist_logits.grad.full_tensor().float() - whole.grad).abs().max()),
                "loss_placements": str(tuple(loss.placements)),
                "grad_placements_kept": tuple(dist_logits.grad.placements) == placements,
            }
    # What it keeps for backward: the local block's float32 exponentials, not the whole logits.
    big = distribute_tensor(torch.randn(8, 64, 1024), mesh, (Shard(2),) if len(mesh_shape) == 1
                            else (Shard(0), Shard(2))).requires_grad_()
    target = torch.randint(0, 1024, (8, 64))
    with PeakMeter("cpu", trace_python=False) as meter:
        loss = vocab_parallel.cross_entropy(big, target)
    out["kept_bytes"] = meter.result().live_bytes_end
    out["local_logits_bytes"] = big.to_local().numel() * 4
    out["whole_logits_bytes"] = big.numel() * 4
    del loss
    out["not_split"] = vocab_parallel.vocab_axis(distribute_tensor(torch.randn(4, 8), mesh, (Replicate(),) * len(mesh_shape)))
    try:
        vocab_parallel.cross_entropy(distribute_tensor(torch.randn(4, 8), mesh, (Replicate(),) * len(mesh_shape)),
                                     torch.zeros(4, dtype=torch.long))
        out["error"] = None
    except ValueError as exc:
        out["error"] = str(exc)
    return out


def keras_transformer_losses(sharded: bool, initial=None, steps: int = 3):
    """Train-step losses of the transformer family (vocabulary-split LM head under shardimpl),
    from ``initial`` weights when given; stock Keras in one process when not ``sharded``."""
    import keras

    import shardimpl
    from bench.harness import training
    from bench.harness.families import build_model, layout_map, model_mesh
    from shardimpl import vocab_parallel

    calls = {"n": 0}
    original = vocab_parallel.cross_entropy

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    vocab_parallel.cross_entropy = counted
    size, train = 1 << 20, training.TrainConfig(optimizer="sgd", seq=16, batch=4)
    if sharded:
        shardimpl.install()
        mesh = model_mesh("transformer", keras.distribution.list_devices())
        keras.distribution.set_distribution(keras.distribution.ModelParallel(
            layout_map=layout_map("transformer", mesh, size, batch=train.batch, seq=train.seq)))
    else:
        keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(3)
    model = build_model("transformer", size, batch=train.batch, seq=train.seq)
    start = model.get_weights()
    if initial is not None:
        model.set_weights(initial)
    training.compile_model(model, "transformer", train)
    x, y = training.train_data("transformer", size, train)
    losses = [float(model.train_on_batch(x.numpy(), y.numpy())) for _ in range(steps)]
    return {"losses": losses, "weights": model.get_weights(), "initial": start, "vocab_parallel_calls": calls["n"]}


def argmax_matches_torch(mesh_shape):
    """`vocab_parallel.argmax` against torch.argmax on the whole logits: even and uneven
    vocabularies, a tie across the ranks' blocks, a NaN, float32 and bfloat16, 1-D and (batch,
    model) meshes; what it gathers (bytes), its placements, and its error for other layouts."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from shardimpl import vocab_parallel

    mesh = init_device_mesh("cpu", mesh_shape)
    placements = (Shard(2),) if len(mesh_shape) == 1 else (Shard(0), Shard(2))
    gathered = []
    original = dist.all_gather_single

    def counting(output, input, *args, **kwargs):
        gathered.append(output.numel() * output.element_size())
        return original(output, input, *args, **kwargs)

    dist.all_gather_single = counting
    out = {}
    try:
        for vocab in (16, 7):
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(vocab)
                logits = torch.randn(4, 6, vocab, generator=g).to(dtype)
                logits[0, 0, :] = 1.0  # every entry equal: the first index wins
                logits[1, 1, vocab - 1] = logits[1, 1, 0] = 9.0  # a tie across the first and the last block
                logits[2, 2, vocab // 2 + 1] = float("nan")  # NaN counts as the largest, as torch's
                ids = vocab_parallel.argmax(distribute_tensor(logits, mesh, placements), dtype=torch.int32)
                key = f"vocab{vocab}-{str(dtype).split('.')[-1]}"
                out[key] = {"equal": bool(torch.equal(ids.full_tensor(), logits.argmax(-1).int())),
                            "dtype": str(ids.dtype), "placements": str(tuple(ids.placements))}
        gathered.clear()
        vocab_parallel.argmax(distribute_tensor(torch.randn(8, 64, 1024), mesh, placements))
        out["gathered_bytes"] = sum(gathered)
    finally:
        dist.all_gather_single = original
    try:
        vocab_parallel.argmax(distribute_tensor(torch.randn(4, 8), mesh, (Replicate(),) * len(mesh_shape)))
        out["error"] = None
    except ValueError as exc:
        out["error"] = str(exc)
    return out
