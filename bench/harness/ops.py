"""Rank-side operations timed by the asv and pytest-benchmark suites.

Each runs on every rank of a `shardimpl.launch.World` and returns this rank's
measurements, so the parent can time the call and record per-rank peaks: both
of `PeakMeter`'s figures, ``peak_bytes`` (torch's allocator, exact to the byte
and deterministic) and ``host_peak_bytes`` (the whole process, torch or not;
page-granular, within about 1 MiB from run to run). The calls are timed, so the
meters read the host figure's resident view only (``trace_python=False``:
tracing Python's allocations would be timed too).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["distribute_once", "gather_once", "variable_shape"]

_cache: dict = {}


def variable_shape(size_mib: int) -> tuple[int, int]:
    """A float32 kernel of ``size_mib`` MiB: 1024 rows x (size_mib x 256) columns."""
    return (1024, int(size_mib) * 256)


def _layout(device: str):
    import keras
    import torch.distributed as dist

    kind = "gpu" if device == "cuda" else "cpu"
    devices = [f"{kind}:{r}" for r in range(dist.get_world_size())]
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    return keras.distribution.TensorLayout((None, "model"), mesh)


def distribute_once(size_mib: int, device: str = "cpu") -> dict:
    """Create a sharded GlorotUniform kernel of ``size_mib`` MiB; returns peaks and shard bytes."""
    import shardimpl
    from shardimpl.meters import PeakMeter

    layout = _layout(device)
    _cache.pop("var", None)
    with PeakMeter("cuda" if device == "cuda" else "cpu", trace_python=False) as m:
        v = shardimpl.distribute_variable("glorot_uniform", layout, shape=variable_shape(size_mib),
                                          dtype="float32", name="bench/kernel")
    _cache["var"] = v
    local = v.to_local()
    return {"peak_bytes": m.result().device_peak_bytes, "host_peak_bytes": m.result().host_peak_bytes,
            "local_bytes": local.numel() * local.element_size()}


def gather_once(size_mib: int, device: str = "cpu") -> dict:
    """Gather the kernel made by `distribute_once` to rank 0's host memory."""
    import torch.distributed as dist

    import shardimpl
    from shardimpl.meters import PeakMeter

    v = _cache.get("var")
    if v is None or tuple(v.shape) != variable_shape(size_mib):
        distribute_once(size_mib, device)
        v = _cache["var"]
    with PeakMeter("cpu", trace_python=False) as m:
        full = shardimpl.all_gather_variable(v, device="cpu", dst=0, name="bench/kernel")
    ok = full is None or tuple(full.shape) == tuple(v.shape)
    del full
    dist.barrier()
    return {"peak_bytes": m.result().device_peak_bytes, "host_peak_bytes": m.result().host_peak_bytes,
            "ok": bool(ok)}
