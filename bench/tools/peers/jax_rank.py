"""The keras-jax peer's own process: one scenario on N JAX devices, one JSON result on stdout.

Runs inside the keras-jax virtualenv (Keras 3.15.1 on JAX, no torch), started by
`bench.tools.peers.keras_jax` with ``KERAS_BACKEND=jax`` and, on CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N devices in this one process):

    python -m bench.tools.peers.jax_rank --family mlp --param-bytes 67108864 --ranks 2 \
        --device cpu --data batch.npz

It builds the family's model under ``ModelParallel`` with the family's LayoutMap on a mesh of
the N devices (`bench.harness.families`: the same model, map and mesh functions the harness
uses), then measures:

* per device, the bytes of the variables it holds (the arrays' addressable shards);
* per device, the build peak: the allocator's ``peak_bytes_in_use`` where JAX reports one (GPU),
  else the largest sum of live JAX arrays on that device, sampled each time Keras places a
  variable (so a full variable made on one device before it is split is seen);
* the train step the harness runs (`bench.harness.training`: the same optimizer, dtype policy,
  remat, sequence and batch, the family's loss on the harness' targets), as one ``jax.jit`` function over Keras' stateless calls with the variables'
  own shardings kept and the state donated; XLA's memory analysis of that compiled step (per
  device: arguments, outputs, aliased, temporaries), the allocator's lifetime peak where JAX
  reports one (it has no reset), and the median time of ``--steps`` steps after a warm-up.

Build figures are above what was live before the build, as the harness' meters count a
block's peak above its entry.

The input batch and its targets come from the harness (``--data``, saved by the parent from
`bench.harness.families.sample_batch`), replicated on every device as the harness' ranks each
hold it whole.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

__all__ = ["main", "measure"]


def _device_bytes(arrays) -> dict[int, int]:
    """{device id: bytes} of the distinct buffers behind the arrays' addressable shards.

    Buffers are counted once: a shard's ``data`` is itself a live array on the same buffer,
    so `jax.live_arrays` lists it beside its parent once it has been looked at.
    """
    out: dict[int, int] = {}
    seen = set()
    for a in arrays:
        for shard in a.addressable_shards:
            key = (shard.device.id, shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


class LiveArrayPeaks:
    """The largest per-device sum of live JAX arrays seen at each `sample` call, above what was
    live when it was made (as the harness' meters count a block's peak above its entry)."""

    def __init__(self):
        self.base = self._live()
        self.peaks: dict[int, int] = {}

    @staticmethod
    def _live() -> dict[int, int]:
        import jax

        return _device_bytes(a for a in jax.live_arrays() if not a.is_deleted())

    def sample(self) -> None:
        for dev, nbytes in self._live().items():
            self.peaks[dev] = max(self.peaks.get(dev, 0), nbytes - self.base.get(dev, 0))


def _sampling_at_placement(peaks: LiveArrayPeaks):
    """A context that samples live arrays each time Keras places a variable's value.

    Keras 3.15's JAX variable places its value in ``JaxVariable._direct_assign`` (the full value
    made by the initializer is still referenced by its caller then) or, for large variables,
    in ``_initialize_with_initializer`` (one jitted initializer straight into its shards).
    These names are private: if they move, this raises rather than measuring nothing.
    """
    import contextlib

    from keras.src.backend.jax import core

    cls = core.JaxVariable
    names = ("_direct_assign", "_initialize_with_initializer")
    missing = [n for n in names if not hasattr(cls, n)]
    if missing:
        raise RuntimeError(f"keras-jax peer: keras.src.backend.jax.core.JaxVariable has no {missing}; "
                           "this runner samples build memory there and supports Keras 3.15. "
                           "Pin keras==3.15.1 in the keras-jax virtualenv.")

    @contextlib.contextmanager
    def ctx():
        originals = {n: getattr(cls, n) for n in names}

        def wrap(fn):
            def sampled(self, *a, **k):
                result = fn(self, *a, **k)
                peaks.sample()
                return result
            return sampled

        for n in names:
            setattr(cls, n, wrap(originals[n]))
        try:
            yield
        finally:
            for n, fn in originals.items():
                setattr(cls, n, fn)
    return ctx()


def _allocator_stats(devices, key) -> dict[int, int] | None:
    """{device id: memory_stats()[key]} where every device reports it (GPU), else None (CPU)."""
    stats = {d.id: d.memory_stats() for d in devices}
    if any(not s or key not in s for s in stats.values()):
        return None
    return {i: s[key] for i, s in stats.items()}


def _load_batch(path):
    """(inputs, targets) saved by the parent: inputs as "x" or under their names, targets as "y"."""
    import numpy as np

    with np.load(path) as data:
        names = [k for k in data.keys() if k != "y"]
        x = data["x"] if names == ["x"] else {k: data[k] for k in names}
        return x, data["y"]


def _xla_memory(compiled) -> dict | None:
    """XLA's per-device memory analysis of the compiled step, or None where JAX has none."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # not implemented on some platforms
        return None
    if ma is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(ma, f)) for f in fields if hasattr(ma, f)}
    # Live at once at worst: the arguments, the outputs not written into donated arguments, the temporaries.
    out["step_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _train_step(model, optimizer, loss_object):
    """The harness' step as one pure function of (trainable, non-trainable, optimizer) state."""
    import jax

    def loss_fn(trainable, non_trainable, x, y):
        out, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_object(y, out), non_trainable

    def step(state, data):
        x, y = data
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    return step


def measure(family: str, param_bytes: int, ranks: int, device: str, batch_path: str | None,
            steps: int = 3, train=None) -> dict:
    import jax
    import keras

    from bench.harness.families import build_model, layout_map, model_mesh
    from bench.harness.training import DEFAULT, dtype_policy

    train = train or DEFAULT
    shape = {"batch": train.batch, "seq": train.seq, "remat": train.remat == "full"}

    kind = "gpu" if device == "cuda" else "cpu"
    devices = [d for d in jax.devices() if d.platform == kind][:ranks]
    if len(devices) < ranks:
        raise RuntimeError(f"keras-jax peer: N = {ranks} needs {ranks} JAX {kind} devices; this process has "
                           f"{len(devices)} ({jax.devices()}). On CPU set "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={ranks}.")
    # First use of Keras, XLA and the initializers, as the harness warms up; without the map, whose
    # splits need not divide the small model's dims evenly (JAX, unlike DTensor, requires that).
    with dtype_policy(train):
        build_model(family, max(param_bytes // 64, 1 << 16), **shape)
    names = keras.distribution.list_devices(kind)[:ranks]
    mesh = model_mesh(family, names)
    lm = layout_map(family, mesh, param_bytes, batch=train.batch, seq=train.seq)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
    gc.collect()
    in_use = _allocator_stats(devices, "bytes_in_use")
    peaks = LiveArrayPeaks()
    start = time.perf_counter()
    with _sampling_at_placement(peaks), dtype_policy(train):
        model = build_model(family, param_bytes, **shape)
    init_seconds = time.perf_counter() - start
    held = _device_bytes(v.value for v in model.weights)
    ids = [d.id for d in devices]
    out = {"devices": [str(d) for d in devices], "platform": devices[0].platform,
           "jax": jax.__version__, "keras": keras.__version__, "init_seconds": init_seconds,
           "model_bytes": sum(int(v.value.nbytes) for v in model.weights),
           "variable_bytes": [held.get(i, 0) for i in ids],
           "build_live_peak_bytes": [peaks.peaks.get(i, 0) for i in ids],
           "build_allocator_peak_bytes": None, "step": None}
    alloc = _allocator_stats(devices, "peak_bytes_in_use")
    if alloc and in_use:  # the allocator's peak since start-up, less what was in use before the build
        out["build_allocator_peak_bytes"] = [alloc[i] - in_use[i] for i in ids]
    if batch_path:
        with dtype_policy(train):
            out["step"] = _measure_step(model, mesh, devices, _load_batch(batch_path), steps, family, train)
    return out


def _measure_step(model, mesh, devices, batch, steps: int, family: str, train) -> dict:
    import jax

    from bench.harness.training import make_loss, make_optimizer

    optimizer = make_optimizer(train)
    optimizer.build(model.trainable_variables)
    replicated = jax.sharding.NamedSharding(mesh.backend_mesh, jax.sharding.PartitionSpec())
    x = jax.tree_util.tree_map(lambda a: jax.device_put(a, replicated), batch)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, state)
    start = time.perf_counter()
    compiled = jax.jit(_train_step(model, optimizer, make_loss(family)), donate_argnums=0,
                       out_shardings=(None, shardings)).lower(state, x).compile()
    compile_seconds = time.perf_counter() - start
    loss, state = compiled(state, x)  # warm-up: the first call pays for buffers and thread pools
    loss.block_until_ready()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, state = compiled(state, x)
        jax.block_until_ready((loss, state))
        times.append(time.perf_counter() - start)
    ids = [d.id for d in devices]
    alloc = _allocator_stats(devices, "peak_bytes_in_use")
    return {"compile_seconds": compile_seconds, "step_seconds": statistics.median(times),
            "steps_per_second": steps / sum(times), "loss": float(loss),
            "xla": _xla_memory(compiled),
            "allocator_lifetime_peak_bytes": [alloc[i] for i in ids] if alloc else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tools.peers.jax_rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True)
    p.add_argument("--param-bytes", type=int, required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", default=None, help="the harness' inputs and targets (.npz); without it, no step")
    p.add_argument("--steps", type=int, default=3)
    from bench.cli import add_train_options, train_config
    from bench.harness.training import DEFAULT

    add_train_options(p, DEFAULT)
    args = p.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "jax":
        p.error(f"KERAS_BACKEND must be jax here. Received: {os.environ.get('KERAS_BACKEND')!r}")
    result = measure(args.family, args.param_bytes, args.ranks, args.device, args.data, args.steps,
                     train_config(args))
    sys.stdout.write("\nJAX_PEER_RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
