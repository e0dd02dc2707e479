"""Rank-side halves of the reliability tests: faults injected on one rank, every rank must end.

Each function runs many cases in one world. Faults are agreed (`shardimpl.agree`),
so after a case fails on every rank the world is still in step and the next
case runs in the same world. Each case records, per rank, how it ended and how
long it took.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import torch
import torch.distributed as dist


def _case(results, name, fn):
    start = time.monotonic()
    try:
        value = fn()
        results[name] = {"ok": True, "value": value, "seconds": time.monotonic() - start}
    except Exception as exc:
        results[name] = {"ok": False, "type": type(exc).__name__, "error": str(exc)[:2000],
                         "seconds": time.monotonic() - start}


def _mesh_1d():
    from keras.distribution import DeviceMesh

    n = dist.get_world_size()
    return DeviceMesh((n,), ["model"], [f"cpu:{i}" for i in range(n)])


def gather_and_create_faults():
    """Items 1, 4, 11, 14: wrong placements, bad dst/device, differing replicas, lossy casts, gpu meshes."""
    from keras.distribution import DeviceMesh, TensorLayout
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    import shardimpl
    from shardimpl.create import CHECK_REPLICATED_ENV

    rank, n = dist.get_rank(), dist.get_world_size()
    out = {}
    mesh = _mesh_1d()
    tmesh = shardimpl.to_torch_mesh(mesh)
    sharded = TensorLayout((None, "model"), mesh)
    replicated = TensorLayout((None, None), mesh)
    full = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    v = shardimpl.distribute_variable(full, sharded, name="v")

    # 1. Partial and _StridedShard are gathered right, not as if replicated.
    p = DTensor.from_local(torch.full((2, 2), float(rank + 1)), tmesh, [Partial()], run_check=False)
    _case(out, "partial", lambda: (shardimpl.gather_variable(p).tolist(), p.full_tensor().tolist()))
    _case(out, "partial_dst0", lambda: (lambda g: None if g is None else g.tolist())(
        shardimpl.gather_variable(p, dst=0)))
    big = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    s = distribute_tensor(big, tmesh, [_StridedShard(0, split_factor=2)])
    _case(out, "strided", lambda: bool(torch.equal(shardimpl.gather_variable(s), big)
                                       and torch.equal(s.full_tensor(), big)))
    _case(out, "strided_dst0", lambda: (lambda g: None if g is None else bool(torch.equal(g, big)))(
        shardimpl.gather_variable(s, dst=0)))
    ps = DTensor.from_local(torch.full((4, 3), float(rank + 1)), tmesh, [Partial()], run_check=False)
    _case(out, "plain_shard_still_exact", lambda: bool(torch.equal(shardimpl.gather_variable(v), full)))

    # 4. dst and device are validated, and the ranks agree before any data moves.
    _case(out, "dst_out_of_range", lambda: shardimpl.gather_variable(v, dst=5))
    _case(out, "dst_differs", lambda: shardimpl.gather_variable(v, dst=rank))
    _case(out, "dst_bad_on_rank1_only", lambda: shardimpl.gather_variable(v, dst=7 if rank == 1 else 0))
    _case(out, "cuda_device", lambda: shardimpl.gather_variable(v, device="cuda", dst=0))
    _case(out, "partial_after_faults", lambda: shardimpl.gather_variable(ps).sum().item())
    _case(out, "gather_after_faults", lambda: bool(torch.equal(shardimpl.gather_variable(v), full)))

    # 11. Replicas that differ: caught with check_replicated (or the env var); lossy casts refused.
    same = np.arange(16, dtype="float32").reshape(4, 4)
    differs = same + rank
    _case(out, "replicated_same_checked", lambda: bool(torch.equal(
        shardimpl.distribute_variable(same, replicated, name="r", check_replicated=True).to_local(),
        torch.from_numpy(same))))
    _case(out, "replicated_differs_checked",
          lambda: shardimpl.distribute_variable(differs, replicated, name="r", check_replicated=True))
    _case(out, "sharded_differs_checked",
          lambda: shardimpl.distribute_variable(differs, sharded, name="k", check_replicated=True))
    os.environ[CHECK_REPLICATED_ENV] = "1"
    try:
        _case(out, "replicated_differs_env", lambda: shardimpl.distribute_variable(differs, replicated, name="r"))
    finally:
        del os.environ[CHECK_REPLICATED_ENV]
    _case(out, "replicated_differs_unchecked",
          lambda: shardimpl.distribute_variable(differs, replicated, name="r").to_local()[0, 0].item())
    _case(out, "nan_to_int32", lambda: shardimpl.distribute_variable(
        np.array([[np.nan, 1.0], [2.0, 3.0]]), replicated, dtype="int32", name="steps"))
    _case(out, "1e10_to_int32", lambda: shardimpl.distribute_variable(
        torch.tensor([[1e10, 1.0], [2.0, 3.0]]), replicated, dtype="int32", name="steps"))
    _case(out, "int_cast_in_range_ok", lambda: shardimpl.distribute_variable(
        torch.tensor([[1.0, -7.0], [2.0, 3.0]]), replicated, dtype="int32", name="steps").to_local().tolist())
    nan_on_rank1 = np.array([[np.nan if rank == 1 else 0.0, 1.0], [2.0, 3.0]])
    _case(out, "nan_on_rank1_only_checked", lambda: shardimpl.distribute_variable(
        nan_on_rank1, replicated, dtype="int32", name="steps", check_replicated=True))

    # 14. gpu:R devices on a torch without CUDA.
    gpu_mesh = DeviceMesh((n,), ["model"], [f"gpu:{i}" for i in range(n)])
    _case(out, "gpu_mesh_without_cuda",
          lambda: shardimpl.distribute_variable(full, TensorLayout((None, "model"), gpu_mesh), name="g"))
    _case(out, "final_gather_ok", lambda: bool(torch.equal(shardimpl.gather_variable(v), full)))
    return out


def _listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def keras_save_faults(folder):
    """Items 2 and 3: a rank-local error inside model.save, legacy .h5 saving."""
    import tempfile

    import keras

    import _keras_world
    import shardimpl
    from shardimpl.keras import saving

    rank = dist.get_rank()
    private_tmp = os.path.join(folder, f"tmp-rank{rank}")
    os.makedirs(private_tmp, exist_ok=True)
    tempfile.tempdir = private_tmp  # where the non-zero ranks' placeholders go
    _keras_world._set_model_parallel("mlp")
    base = _keras_world.build("mlp")

    fail_on = {"config": None, "variables": None}

    @keras.saving.register_keras_serializable(package="reliab")
    class Faulty(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

        def call(self, x):
            return x * self.scale

        def get_config(self):
            if fail_on["config"] == rank:
                raise RuntimeError(f"get_config refuses on rank {rank} (injected)")
            return super().get_config()

        def save_own_variables(self, store):
            if fail_on["variables"] == rank:
                raise OSError(f"disk full on rank {rank} (injected)")
            super().save_own_variables(store)

    model = keras.Sequential([keras.Input((_keras_world.FEATURES,)), base, Faulty(name="faulty")])
    expected = [w.copy() for w in model.get_weights()]
    out = {}

    def save(name, **fail):
        fail_on.update({"config": None, "variables": None, **fail})
        try:
            model.save(os.path.join(folder, name))
        finally:
            fail_on.update({"config": None, "variables": None})
        return saving.last_save_wrote()

    _case(out, "get_config_raises_on_rank1", lambda: save("a.keras", config=1))
    _case(out, "get_config_raises_on_rank0", lambda: save("a.keras", config=0))
    _case(out, "save_own_variables_raises_on_rank1_mid_walk", lambda: save("a.keras", variables=1))
    _case(out, "save_own_variables_raises_on_rank0_mid_walk", lambda: save("a.keras", variables=0))
    _case(out, "h5_get_config_raises_on_rank1", lambda: save("a.h5", config=1))
    real_replace = os.replace

    def replace_fails_on_rank0():
        def broken(src, dst):
            if rank == 0 and str(dst).endswith("a.keras"):
                raise PermissionError(f"read-only folder (injected): {dst}")
            return real_replace(src, dst)

        os.replace = broken
        try:
            return save("a.keras")
        finally:
            os.replace = real_replace

    _case(out, "rename_fails_on_rank0", replace_fails_on_rank0)
    dist.barrier()  # every rank returned from its failed saves (rank 0 removes its folder before)
    out["files_after_faults"] = [f for f in _listing(folder) if not f.startswith("tmp-rank")]
    out["private_tmp_after_faults"] = _listing(private_tmp)
    dist.barrier()
    _case(out, "keras_ok", lambda: save("ok.keras"))
    _case(out, "h5_ok", lambda: save("ok.h5"))
    dist.barrier()

    def loads_back(name):
        loaded = keras.saving.load_model(os.path.join(folder, name), compile=False)
        got = loaded.get_weights()
        return len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))

    _case(out, "keras_loads_back", lambda: loads_back("ok.keras"))
    _case(out, "h5_loads_back", lambda: loads_back("ok.h5"))
    out["files"] = [f for f in _listing(folder) if not f.startswith("tmp-rank")]
    out["private_tmp"] = _listing(private_tmp)
    shardimpl.uninstall()
    return out


def sharded_checkpoint_faults(folder):
    """Item 10: a failure on rank 0 during the swap, a rank-local bad state dict, legacy folders."""
    import torch.distributed.checkpoint as dcp
    from keras.distribution import TensorLayout

    import shardimpl
    from shardimpl import checkpoint

    rank = dist.get_rank()
    mesh = _mesh_1d()
    layout = TensorLayout((None, "model"), mesh)
    path = os.path.join(folder, "ckpt")
    out = {}

    def state(value):
        return {"w": shardimpl.distribute_variable(torch.full((4, 6), float(value)), layout, name="w")}

    def saved_value(at):
        target = state(-1.0)
        shardimpl.load_sharded(target, at)
        return float(shardimpl.gather_variable(target["w"])[0, 0])

    _case(out, "save_v1", lambda: shardimpl.save_sharded(state(1.0), path))
    real_commit = checkpoint._commit

    def commit_fails(*args):
        raise OSError("rename refused (injected on rank 0)")

    checkpoint._commit = commit_fails if rank == 0 else real_commit
    try:
        _case(out, "swap_fails_on_rank0", lambda: shardimpl.save_sharded(state(2.0), path))
    finally:
        checkpoint._commit = real_commit
    _case(out, "path_still_v1", lambda: saved_value(path))
    bad = state(3.0)
    if rank == 1:
        bad["extra"] = "not a tensor"
    _case(out, "bad_state_dict_on_rank1", lambda: shardimpl.save_sharded(bad, path))
    _case(out, "save_v4", lambda: shardimpl.save_sharded(state(4.0), path))
    _case(out, "path_is_v4", lambda: saved_value(path))
    # A folder checkpoint written the old way (DCP straight into path) loads, and is replaced atomically.
    legacy = os.path.join(folder, "legacy")
    dcp.save(state(5.0), checkpoint_id=legacy)
    dist.barrier()
    _case(out, "legacy_folder_loads", lambda: saved_value(legacy))
    _case(out, "save_over_legacy_folder", lambda: shardimpl.save_sharded(state(6.0), legacy))
    _case(out, "legacy_path_is_v6", lambda: saved_value(legacy))
    _case(out, "missing_on_rank1_only", lambda: saved_value(path if rank == 0 else os.path.join(folder, "nope")))
    dist.barrier()
    out["files"] = _listing(folder)
    out["links"] = {name: os.path.islink(os.path.join(folder, name)) for name in ("ckpt", "legacy")}
    return out


def sleep_then_return(seconds):
    time.sleep(seconds)
    return "awake"
