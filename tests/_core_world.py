"""Rank-side checks for the core, batched so one spawned world answers many cases.

Each function runs on every rank of a world started by `shardimpl.launch.run`
and returns plain data (bools, numbers); the tests assert on it in the parent.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard

import shardimpl
from shardimpl.initializers import fill_local_shard, spec_from_initializer
from shardimpl.meters import PeakMeter

DTYPES = ["float32", "float64", "bfloat16", "float16", "int64", "int32", "uint8", "bool"]
SEEDED_INITIALIZERS = [
    ("RandomNormal", {"mean": 0.5, "stddev": 2.0}),
    ("RandomUniform", {"minval": -3.0, "maxval": 1.0}),
    ("TruncatedNormal", {"mean": 0.0, "stddev": 0.5}),
    ("GlorotUniform", {}),
    ("GlorotNormal", {}),
    ("HeUniform", {}),
    ("HeNormal", {}),
    ("LecunUniform", {}),
    ("LecunNormal", {}),
    ("VarianceScaling", {"scale": 2.0, "mode": "fan_out", "distribution": "untruncated_normal"}),
]
CONSTANT_INITIALIZERS = [("Zeros", {}), ("Ones", {}), ("Constant", {"value": 3.25})]
# Shapes chosen to give uneven and empty shards for N = 3 and 4 (5 rows over 4 ranks: 2, 2, 1, 0).
SHAPES = [(5, 7), (37, 3), (2, 9), (1030, 260)]
# Initializer-only shapes: odd strides (rows starting at both parities), a 4-D kernel.
INIT_SHAPES = [(3, 5, 7), (3, 3, 5, 6)]


def _mesh_1d(name="model"):
    from keras.distribution import DeviceMesh

    n = dist.get_world_size()
    return DeviceMesh((n,), [name], [f"cpu:{i}" for i in range(n)])


def _layouts_1d(mesh, ndim):
    from keras.distribution import TensorLayout

    out = {"replicated": TensorLayout((None,) * ndim, mesh)}
    for d in range(ndim):
        axes = [None] * ndim
        axes[d] = "model"
        out[f"dim{d}"] = TensorLayout(tuple(axes), mesh)
    return out


def reference_full(init_name, kwargs, shape, dtype, seed):
    """The full tensor as one unsharded process generates it (offsets 0, the whole shape)."""
    from keras import initializers

    init = getattr(initializers, init_name)(**kwargs, **({"seed": seed} if seed is not None else {}))
    spec = spec_from_initializer(init, shape)
    return fill_local_shard(spec, shape, (0,) * len(shape), shape, dtype=getattr(torch, dtype), device="cpu")


def roundtrip_cases():
    """Exact gather round trips: dtypes x shapes x layouts, plus every built-in initializer."""
    from keras import initializers

    mesh = _mesh_1d()
    results = {}
    gen = torch.Generator().manual_seed(1234)
    for shape in SHAPES:
        for lname, layout in _layouts_1d(mesh, len(shape)).items():
            for dtype in DTYPES:
                full = (torch.randn(shape, generator=gen) * 50).to(getattr(torch, dtype))
                v = shardimpl.distribute_variable(full, layout, name=f"t_{dtype}")
                got = shardimpl.all_gather_variable(v)
                results[f"tensor/{shape}/{lname}/{dtype}"] = bool(
                    got.dtype == full.dtype and torch.equal(got, full)
                )
            arr = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
            v = shardimpl.distribute_variable(arr, layout, name="np")
            results[f"numpy/{shape}/{lname}"] = bool(torch.equal(shardimpl.all_gather_variable(v), torch.from_numpy(arr)))
            for init_name, kwargs in SEEDED_INITIALIZERS + CONSTANT_INITIALIZERS:
                seed = 7 if (init_name, kwargs) in SEEDED_INITIALIZERS else None
                init = getattr(initializers, init_name)(**kwargs, **({"seed": seed} if seed else {}))
                v = shardimpl.distribute_variable(init, layout, shape=shape, dtype="float32", name=init_name)
                got = shardimpl.all_gather_variable(v)
                ref = reference_full(init_name, kwargs, shape, "float32", seed)
                # N-invariance: the reference is what a single process draws.
                results[f"init/{shape}/{lname}/{init_name}"] = bool(torch.equal(got, ref))
    results.update(init_rank_and_dtype_cases(mesh))
    return results


def init_rank_and_dtype_cases(mesh):
    """3-D and 4-D initializer-built variables in three dtypes, each dim sharded in turn."""
    from keras import initializers

    results = {}
    for shape in INIT_SHAPES:
        for lname, layout in _layouts_1d(mesh, len(shape)).items():
            for dtype in ("float32", "bfloat16", "float64"):
                for init_name in ("GlorotUniform", "TruncatedNormal"):
                    init = getattr(initializers, init_name)(seed=21)
                    v = shardimpl.distribute_variable(init, layout, shape=shape, dtype=dtype, name=init_name)
                    ref = reference_full(init_name, {}, shape, dtype, 21)
                    got = shardimpl.all_gather_variable(v)
                    results[f"init/{shape}/{lname}/{dtype}/{init_name}"] = bool(torch.equal(got, ref))
    return results


def local_shapes():
    """Each rank's local shape for a (5, 7) tensor sharded on dim 0 (uneven, maybe empty)."""
    from keras import initializers

    mesh = _mesh_1d()
    layout = _layouts_1d(mesh, 2)["dim0"]
    v = shardimpl.distribute_variable(initializers.Ones(), layout, shape=(5, 7), dtype="float32")
    return tuple(v.to_local().shape)


def replicated_unseeded_checksum():
    """Unseeded initializers on a replicated layout: every rank must draw the same values."""
    from keras import initializers

    mesh = _mesh_1d()
    layout = _layouts_1d(mesh, 2)["replicated"]
    sums = []
    for init in (initializers.GlorotUniform(), initializers.RandomNormal(), initializers.Orthogonal()):
        v = shardimpl.distribute_variable(init, layout, shape=(64, 48), dtype="float32", name="rep")
        local = v.to_local()
        sums.append(local.double().sum().item())
        sums.append(float(local.double().pow(2).sum().item()))
    # An unseeded sharded variable: shards must come from one stream too.
    sharded = shardimpl.distribute_variable(initializers.RandomNormal(), _layouts_1d(mesh, 2)["dim0"],
                                            shape=(64, 48), dtype="float32")
    full = shardimpl.all_gather_variable(sharded)
    sums.append(full.double().sum().item())
    return sums


def memory_during_creation(rows, cols, dtype="float32"):
    """Peak live bytes of distributing a (rows, cols) initializer-built variable on this rank."""
    from keras import initializers

    mesh = _mesh_1d()
    layouts = _layouts_1d(mesh, 2)
    shardimpl.distribute_variable("zeros", layouts["dim1"], shape=(2, 2), dtype=dtype)  # warm the mesh
    out = {}
    for lname in ("dim0", "dim1"):
        for init in (initializers.GlorotUniform(seed=3), initializers.TruncatedNormal(seed=4)):
            with PeakMeter("cpu") as m:
                v = shardimpl.distribute_variable(init, layouts[lname], shape=(rows, cols), dtype=dtype)
            local_bytes = v.to_local().numel() * v.to_local().element_size()
            out[f"{lname}/{type(init).__name__}"] = (m.result().device_peak_bytes, local_bytes)
            del v
    return out


def dst_gather_memory(rows, cols):
    """Peak live bytes of all_gather_variable(dst=0) on each rank, and whether values are right."""
    from keras import initializers

    mesh = _mesh_1d()
    layout = _layouts_1d(mesh, 2)["dim1"]
    v = shardimpl.distribute_variable(initializers.HeNormal(seed=11), layout, shape=(rows, cols), dtype="float32")
    with PeakMeter("cpu") as m:
        got = shardimpl.all_gather_variable(v, dst=0)
    ref = reference_full("HeNormal", {}, (rows, cols), "float32", 11)
    correct = torch.equal(got, ref) if got is not None else None
    return {"peak": m.result().device_peak_bytes, "got_full": got is not None, "correct": correct}


def comm_counts():
    """Creation issues no collective; a gather one agreement all-reduce, then one broadcast per distinct shard."""
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = _mesh_1d()
    layouts = _layouts_1d(mesh, 2)
    shardimpl.distribute_variable("zeros", layouts["dim0"], shape=(2, 2), dtype="float32")  # warm the mesh
    with CommDebugMode() as create_mode:
        v = shardimpl.distribute_variable("glorot_uniform", layouts["dim0"], shape=(64, 8), dtype="float32")
        r = shardimpl.distribute_variable("he_normal", layouts["replicated"], shape=(16, 8), dtype="float32")
    with CommDebugMode() as gather_mode:
        shardimpl.all_gather_variable(v)
    with CommDebugMode() as replicated_mode:
        shardimpl.all_gather_variable(r)
    by_op = {str(op).split(".")[-1]: int(c) for op, c in gather_mode.get_comm_counts().items()}
    return (create_mode.get_total_counts(), gather_mode.get_total_counts(), replicated_mode.get_total_counts(),
            by_op)


def mesh_2x2_cases():
    """A 2x2 ("batch", "model") mesh: dims on different axes, one dim on both axes."""
    from keras import initializers
    from keras.distribution import DeviceMesh, TensorLayout
    from torch.distributed.device_mesh import DeviceMesh as TorchMesh

    mesh = DeviceMesh((2, 2), ["batch", "model"], [f"cpu:{i}" for i in range(4)])
    results = {}
    full = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    for axes in [("batch", "model"), ("model", "batch"), ("batch", None), (None, "model")]:
        v = shardimpl.distribute_variable(full, TensorLayout(axes, mesh))
        results[f"tensor/{axes}"] = bool(torch.equal(shardimpl.all_gather_variable(v), full))
        init = initializers.GlorotUniform(seed=5)
        v = shardimpl.distribute_variable(init, TensorLayout(axes, mesh), shape=(7, 5), dtype="float32")
        ref = reference_full("GlorotUniform", {}, (7, 5), "float32", 5)
        results[f"init/{axes}"] = bool(torch.equal(shardimpl.all_gather_variable(v), ref))
    # Dim 0 split over both axes (batch major): DTensor's [Shard(0), Shard(0)].
    tmesh = TorchMesh("cpu", torch.arange(4).reshape(2, 2), mesh_dim_names=("batch", "model"))
    layout = shardimpl.TorchLayout(tmesh, (Shard(0), Shard(0)))
    big = torch.arange(9 * 3, dtype=torch.float64).reshape(9, 3)
    v = shardimpl.distribute_variable(big, layout)
    results["both_axes/tensor"] = bool(torch.equal(shardimpl.all_gather_variable(v), big))
    results["both_axes/local_rows"] = tuple(v.to_local().shape)
    v = shardimpl.distribute_variable(initializers.HeUniform(seed=9), layout, shape=(9, 3), dtype="float64")
    ref = reference_full("HeUniform", {}, (9, 3), "float64", 9)
    results["both_axes/init"] = bool(torch.equal(shardimpl.all_gather_variable(v), ref))
    # DTensor agrees with us on who holds what: compare with torch's own distribute_tensor.
    from torch.distributed.tensor import distribute_tensor

    theirs = distribute_tensor(big, tmesh, [Shard(0), Shard(0)]).to_local()
    # The same layout said the Keras way, once the hook lets an entry name two axes.
    with shardimpl.installed():
        keras_layout = TensorLayout((("batch", "model"), None), mesh)
        kv = shardimpl.distribute_variable(big, keras_layout)
    results["both_axes/keras_layout"] = bool(
        tuple(kv.placements) == (Shard(0), Shard(0))
        and torch.equal(kv.to_local(), shardimpl.distribute_variable(big, layout).to_local())
        and torch.equal(shardimpl.all_gather_variable(kv), big)
    )
    results["both_axes/matches_dtensor"] = bool(
        torch.equal(theirs, shardimpl.distribute_variable(big, layout).to_local())
    )
    return results


def distributed_errors():
    """Errors that need a live world: mesh size != world size."""
    from keras.distribution import DeviceMesh, TensorLayout

    n = dist.get_world_size()
    mesh = DeviceMesh((n + 1,), ["model"], [f"cpu:{i}" for i in range(n + 1)])
    try:
        shardimpl.distribute_variable(torch.zeros(4, 4), TensorLayout((None, "model"), mesh), name="w")
    except ValueError as exc:
        return str(exc)
    return None


def matches_dtensor_placement():
    """Our shard of each rank equals torch's distribute_tensor shard, for uneven 1-D layouts."""
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh_1d()
    ok = {}
    for shape in SHAPES:
        full = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        for lname, layout in _layouts_1d(mesh, len(shape)).items():
            ours = shardimpl.distribute_variable(full, layout)
            theirs = distribute_tensor(full, ours.device_mesh, ours.placements)
            ok[f"{shape}/{lname}"] = bool(torch.equal(ours.to_local(), theirs.to_local()))
    return ok


def reshard_cases():
    """Shard(a) -> Shard(b) point to point: exact, and no rank holds the full tensor."""
    from torch.distributed.tensor import distribute_tensor

    from shardimpl.reshard import reshard_p2p

    mesh = shardimpl.to_torch_mesh(_mesh_1d())
    out = {}
    for shape in [(7, 10), (1030, 260), (3, 2), (6, 5, 4)]:
        full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
        for a in range(len(shape)):
            for b in range(len(shape)):
                if a == b:
                    continue
                x = distribute_tensor(full, mesh, [Shard(a)])
                with PeakMeter("cpu") as m:
                    y = reshard_p2p(x, (Shard(b),))
                want = distribute_tensor(full, mesh, [Shard(b)]).to_local()
                out[f"{shape}/{a}->{b}"] = (bool(torch.equal(y.to_local(), want)), m.result().device_peak_bytes,
                                            math.prod(shape) * 4)
    return out


def everything(rows, cols):
    """The whole batch for one world: one spawn answers every core test for this N."""
    out = {
        "roundtrip": roundtrip_cases(),
        "local_shape": local_shapes(),
        "replicated": replicated_unseeded_checksum(),
        "memory": memory_during_creation(rows, cols),
        "dst": dst_gather_memory(rows, cols),
        "comm": comm_counts(),
        "errors": distributed_errors(),
        "dtensor": matches_dtensor_placement(),
        "reshard": reshard_cases(),
    }
    if dist.get_world_size() == 4:
        out["mesh2x2"] = mesh_2x2_cases()
    return out
