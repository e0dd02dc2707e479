"""Rank-side checks of sharded checkpoints (torch.distributed.checkpoint)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")



SIZE = 4 << 20  # 4 MiB of parameters: the payload dominates the files' metadata


def _trained_model(sharded: bool):
    import keras

    import shardimpl
    from bench.harness import families

    if sharded:
        shardimpl.install()
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=families.layout_map("mlp", mesh)))
    model = families.build_model("mlp", SIZE)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    x = families.sample_batch("mlp", SIZE)
    model.train_on_batch(x.numpy(), x.numpy())
    return model


def save(folder, fail_rank=None):
    """Save a trained sharded model; with fail_rank, that rank's write raises mid-save."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    import shardimpl
    from shardimpl.meters import PeakMeter

    model = _trained_model(sharded=True)
    if fail_rank is not None:
        model.set_weights([w + 1.0 for w in model.get_weights()])  # different from the saved one
        if dist.get_rank() == fail_rank:
            def broken(self, plan, planner):
                raise OSError("disk full (injected)")

            FileSystemWriter.write_data = broken
    local = sum(v.value.to_local().numel() * 4 for v in model.weights + model.optimizer.variables
                if hasattr(v.value, "to_local"))
    error = None
    with PeakMeter("cpu") as m:
        try:
            shardimpl.save_sharded(model, folder, optimizer=True)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            error = f"{type(exc).__name__}: {exc}"[-600:]
    return {"weights": model.get_weights(), "peak": m.result().device_peak_bytes,
            "local_bytes": local, "error": error}


def load(folder, sharded=True):
    import shardimpl

    model = _trained_model(sharded=sharded)  # other values than the saved ones
    before = model.get_weights()
    shardimpl.load_sharded(model, folder, optimizer=True)
    slots = [v.numpy() for v in model.optimizer.variables if "momentum" in v.path]
    return {"weights": model.get_weights(), "before": before, "slots": slots}
