"""One planned rank: rank 0 of a fake N-rank world builds and trains the model, metered by phase.

Runs in a fresh process (the fake process group is process-global; `bench.tools.plan` starts
one per row). Under `FakeTensorMode` shapes, shards and collectives are real and storage is not;
`PeakMeter` counts the fake tensors' bytes as it counts real ones. The run's live bytes are read
per phase (`PeakMeter.mark`): the build, and each of two train steps' forward (with the loss),
backward and optimizer update. Each phase's peak is the highest live bytes over the whole run
so far within that phase (weights, slots and gradients included), so the run's peak is their
maximum, and `bench.tools.plan` can extrapolate each phase in depth on its own.
"""

from __future__ import annotations

import contextlib
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

__all__ = ["plan_rank", "describe_error", "PHASES"]

#: The run's phases in order; each step's forward ends when its loss is computed.
PHASES = ("build", "forward 1", "backward 1", "update 1", "forward 2", "backward 2", "update 2")


def _strided_shard_bounds_outside_fake_mode() -> None:
    """In this (fresh, planning-only) process, let DTensor compute _StridedShard bounds on real tensors.

    torch 2.13 derives a strided shard's offsets from ``torch.arange(n).tolist()``,
    which FakeTensorMode refuses (a data-dependent output); keras-hub's attention
    einsums produce such placements. The arange is index arithmetic of n integers,
    not model data, so it runs on real memory here. Applied only in plan workers.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.tensor.placement_types import _StridedShard

    original = _StridedShard.local_shard_size_and_offset
    if getattr(original, "_shardimpl_plan", False):
        return

    def bounds(self, *args, **kwargs):
        with unset_fake_temporarily():
            return original(self, *args, **kwargs)

    bounds._shardimpl_plan = True
    _StridedShard.local_shard_size_and_offset = bounds


def plan_rank(family: str, param_bytes, ranks: int, step: bool = True, mesh=None, train=None,
              layers: int | None = None) -> dict:
    """Rank 0 of a fake ``ranks``-rank world: build (and train) the model; peaks of live bytes.

    ``mesh``: None (the family's 1-D mesh) or (B, M) for a ("batch", "model") mesh. ``train``:
    the `TrainConfig`. ``layers``: the transformer built with this many blocks instead of its
    own (`bench.tools.plan` extrapolates from a few). Figures are this rank's; ``phase_peaks``
    gives each phase's peak of the run's live bytes.
    """
    import keras
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import shardimpl
    from bench.harness import training
    from bench.harness.families import build_model, layout_map, model_mesh
    from shardimpl.fsdp import stats as fsdp_stats
    from shardimpl.mesh import to_torch_mesh
    from shardimpl.meters import PeakMeter

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    _strided_shard_bounds_outside_fake_mode()
    shardimpl.install()
    keras_mesh = model_mesh(family, [f"cpu:{r}" for r in range(ranks)], mesh)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map(family, keras_mesh, param_bytes, batch=train.batch, seq=train.seq)))
    to_torch_mesh(keras_mesh)  # mesh and seed agreement outside the fake mode (they read real values)
    start = time.perf_counter()
    row = {"step_error": None, "activation_bytes": None, "gathered_block_bytes": 0, "phase_peaks": {},
           "layers_built": layers}
    shape = {"batch": train.batch, "seq": train.seq, "remat": train.remat == "full"}
    if layers is not None:
        shape["layers"] = layers
    with FakeTensorMode(allow_non_fake_inputs=True), training.dtype_policy(train):
        with PeakMeter("cpu") as run:
            model = build_model(family, param_bytes, **shape)
            row["phase_peaks"]["build"] = row["build_peak_bytes"] = run.peak_since_mark
            row["local_param_bytes"] = sum(_local(v.value) for v in model.weights)
            if step:
                try:
                    data = training.train_data(family, param_bytes, train)
                    training.compile_model(model, family, train)
                    with _phases(model, run, row["phase_peaks"], 1):
                        training.train_step(model, data)  # creates the optimizer's slots, as the harness
                    fsdp_stats().reset()
                    with _phases(model, run, row["phase_peaks"], 2) as kept:
                        training.train_step(model, data)  # a forward beside the last step's gradients
                    row["gathered_block_bytes"] = fsdp_stats().largest_bytes
                    row["activation_bytes"] = kept["bytes"]
                except Exception as exc:  # a layout DTensor cannot run at this N is a result, not a crash
                    row["step_error"] = describe_error(exc)
        if step and row["step_error"] is None:
            row["step_peak_bytes"] = run.result().device_peak_bytes
            row.update(training.model_state_bytes(model))
    row["seconds"] = time.perf_counter() - start
    row["host_peak_rss_bytes"] = _max_rss()
    return row


@contextlib.contextmanager
def _phases(model, run, peaks: dict, step: int):
    """Records, for one Keras train step, the peak of ``run``'s live bytes in its forward (up to
    the loss), its backward and the optimizer's update (Keras' torch step calls
    ``compute_loss`` after the forward and ``optimizer.apply`` after the backward), and yields
    ``{"bytes": ...}``, what the forward keeps for the backward: the live bytes when the loss is
    computed (the forward has run and the last step's gradients are dropped by then) less those
    when the step started, gradients excluded."""
    optimizer, compute_loss, apply = model.optimizer, model.compute_loss, model.optimizer.apply
    grads = sum(_local(v.value.grad) for v in model.trainable_weights if v.value.grad is not None)
    kept = {"bytes": None, "start": run.live_bytes - grads}

    def close(name):
        peaks[f"{name} {step}"] = max(peaks.get(f"{name} {step}", 0), run.peak_since_mark)
        run.mark()

    def wrapped_loss(*args, **kwargs):
        if kept["bytes"] is None:
            kept["bytes"] = run.live_bytes - kept["start"]
        out = compute_loss(*args, **kwargs)
        close("forward")
        return out

    def wrapped_apply(*args, **kwargs):
        close("backward")
        out = apply(*args, **kwargs)
        close("update")
        return out

    run.mark()
    model.compute_loss, optimizer.apply = wrapped_loss, wrapped_apply
    try:
        yield kept
    finally:
        del model.compute_loss
        del optimizer.apply


def _local(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def describe_error(exc: BaseException) -> str:
    """One line that names the cause: the exception's own first line, and its causes' (Keras
    re-raises layer errors with the original message first and call arguments after)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        parts.append(f"{type(exc).__name__}: {first}"[:400])
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def _max_rss() -> int:
    """This (planning) process's peak resident set size so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
