"""Single-process checks of the pure parts: shard bounds, placements, N-invariance, errors.

The counter-based generator's own checks (slices, statistics, memory, work) are in
`test_initializers.py`.
"""

from __future__ import annotations

import math
import os
from itertools import product

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
from keras import initializers
from keras.distribution import DeviceMesh, TensorLayout
from torch.distributed.tensor import Replicate, Shard

import shardimpl
from shardimpl.initializers import fill_local_shard, spec_from_initializer
from shardimpl.layout import axes_to_placements, local_shard_bounds


def _nested_chunk(full, mesh_shape, placements, coord):
    """The reference: apply torch.chunk per sharding mesh axis, in mesh order."""
    piece = full
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            chunks = torch.chunk(piece, mesh_shape[m], dim=p.dim)
            if coord[m] < len(chunks):
                piece = chunks[coord[m]]
            else:
                size = list(piece.shape)
                size[p.dim] = 0
                piece = piece.new_empty(size)
    return piece


@pytest.mark.parametrize("shape", [(5, 7), (1, 3), (0, 4), (13,), (9, 3, 4), (2, 2)])
@pytest.mark.parametrize(
    "mesh_shape,placements",
    [
        ((4,), (Shard(0),)),
        ((3,), (Shard(-1 + 1),)),
        ((2, 2), (Shard(0), Replicate())),
        ((2, 2), (Shard(0), Shard(0))),
        ((2, 3), (Replicate(), Shard(0))),
    ],
)
def test_local_shard_bounds_match_nested_torch_chunk(shape, mesh_shape, placements):
    full = torch.arange(math.prod(shape)).reshape(shape)
    for coord in product(*(range(k) for k in mesh_shape)):
        offsets, sizes = local_shard_bounds(shape, mesh_shape, placements, coord)
        expected = _nested_chunk(full, mesh_shape, placements, coord)
        assert tuple(expected.shape) == sizes
        if expected.numel():
            got = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
            assert torch.equal(got, expected)


def test_axes_to_placements_puts_each_dim_on_its_mesh_axis():
    names = ["batch", "model"]
    assert axes_to_placements((None, "model"), names, 2, "w") == (Replicate(), Shard(1))
    assert axes_to_placements(("model", "batch"), names, 2, "w") == (Shard(1), Shard(0))
    assert axes_to_placements((("batch", "model"), None), names, 2, "w") == (Shard(0), Shard(0))
    assert axes_to_placements((None, None), names, 2, "w") == (Replicate(), Replicate())


ALL_BUILTINS = [
    initializers.RandomNormal(mean=1.0, stddev=0.5, seed=1),
    initializers.RandomUniform(minval=-2.0, maxval=4.0, seed=2),
    initializers.TruncatedNormal(stddev=3.0, seed=3),
    initializers.GlorotUniform(seed=4),
    initializers.GlorotNormal(seed=5),
    initializers.HeUniform(seed=6),
    initializers.HeNormal(seed=7),
    initializers.LecunUniform(seed=8),
    initializers.LecunNormal(seed=9),
    initializers.VarianceScaling(scale=0.3, mode="fan_avg", distribution="untruncated_normal", seed=10),
    initializers.Zeros(),
    initializers.Ones(),
    initializers.Constant(0.75),
]


@pytest.mark.parametrize("init", ALL_BUILTINS, ids=lambda i: type(i).__name__)
@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_shards_stitch_to_the_same_bits_for_every_n(init, n):
    shape = (700, 530)  # several chunks, uneven for 3, 4 and 7, odd width
    spec = spec_from_initializer(init, shape)
    full = fill_local_shard(spec, shape, (0, 0), shape, dtype=torch.float32, device="cpu")
    for placements in [(Shard(0),), (Shard(1),)]:
        stitched = torch.empty(shape)
        for r in range(n):
            offsets, sizes = local_shard_bounds(shape, (n,), placements, (r,))
            local = fill_local_shard(spec, shape, offsets, sizes, dtype=torch.float32, device="cpu")
            stitched[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = local
        assert torch.equal(stitched, full)


def _fans(shape):
    return shape[0], shape[1]


@pytest.mark.parametrize(
    "init,check",
    [
        (initializers.GlorotUniform(seed=1), lambda x, fi, fo: x.abs().max() <= math.sqrt(6 / (fi + fo))),
        (initializers.HeUniform(seed=1), lambda x, fi, fo: x.abs().max() <= math.sqrt(6 / fi)),
        (initializers.HeNormal(seed=1), lambda x, fi, fo: x.abs().max() <= 2 * math.sqrt(2 / fi) / 0.8796 + 1e-6),
        (initializers.LecunNormal(seed=1), lambda x, fi, fo: abs(x.std() - math.sqrt(1 / fi)) < 0.02 * math.sqrt(1 / fi)),
        (initializers.GlorotNormal(seed=1), lambda x, fi, fo: abs(x.std() - math.sqrt(2 / (fi + fo))) < 0.02 * math.sqrt(2 / (fi + fo))),
        (initializers.RandomNormal(mean=3.0, stddev=2.0, seed=1), lambda x, fi, fo: abs(x.mean() - 3) < 0.02 and abs(x.std() - 2) < 0.02),
        (initializers.RandomUniform(-1.0, 3.0, seed=1), lambda x, fi, fo: x.min() >= -1 and x.max() <= 3 and abs(x.mean() - 1) < 0.02),
        (initializers.TruncatedNormal(stddev=1.0, seed=1), lambda x, fi, fo: x.abs().max() <= 2.0 and abs(x.std() - 0.8796) < 0.01),
    ],
    ids=lambda v: type(v).__name__ if not callable(v) or isinstance(v, initializers.Initializer) else "",
)
def test_distributions_use_fans_of_the_full_shape(init, check):
    shape = (512, 384)
    spec = spec_from_initializer(init, shape)
    x = fill_local_shard(spec, shape, (0, 0), shape, dtype=torch.float64, device="cpu")
    assert bool(check(x, *_fans(shape)))


def test_different_seeds_and_variables_draw_different_values():
    a = shardimpl.distribute_variable(initializers.GlorotUniform(seed=1), _one_rank_layout(2), shape=(64, 64), dtype="float32")
    b = shardimpl.distribute_variable(initializers.GlorotUniform(seed=2), _one_rank_layout(2), shape=(64, 64), dtype="float32")
    c = shardimpl.distribute_variable("glorot_uniform", _one_rank_layout(2), shape=(64, 64), dtype="float32")
    d = shardimpl.distribute_variable("glorot_uniform", _one_rank_layout(2), shape=(64, 64), dtype="float32")
    assert not torch.equal(a.to_local(), b.to_local())
    assert not torch.equal(c.to_local(), d.to_local())


def _one_rank_layout(ndim, axes=None):
    mesh = DeviceMesh((1,), ["model"], ["cpu:0"])
    return TensorLayout(axes or (None,) * (ndim - 1) + ("model",), mesh)


def test_single_rank_without_process_group_works_and_returns_dtensor():
    from torch.distributed.tensor import DTensor

    v = shardimpl.distribute_variable(np.ones((3, 4), np.float32), _one_rank_layout(2))
    assert isinstance(v, DTensor) and v.shape == (3, 4)
    assert torch.equal(shardimpl.all_gather_variable(v), torch.ones(3, 4))


def test_meta_value_gives_uninitialized_shard_of_right_shape():
    v = shardimpl.distribute_variable(torch.empty(6, 4, device="meta"), _one_rank_layout(2))
    assert v.to_local().device.type == "cpu" and tuple(v.shape) == (6, 4)


def test_fallback_initializer_warns_once_naming_the_variable():
    init = initializers.Orthogonal(seed=3)
    with pytest.warns(UserWarning, match="'dense/kernel'.*Orthogonal"):
        v = shardimpl.distribute_variable(init, _one_rank_layout(2), shape=(8, 8), dtype="float32", name="dense/kernel")
    q = shardimpl.all_gather_variable(v)
    assert torch.allclose(q.T @ q, torch.eye(8), atol=1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shardimpl.distribute_variable(init, _one_rank_layout(2), shape=(8, 8), dtype="float32", name="dense/kernel")


def test_debug_log_has_one_line_per_variable_and_is_silent_by_default(caplog):
    with caplog.at_level("WARNING", logger="shardimpl"):
        shardimpl.distribute_variable("ones", _one_rank_layout(2), shape=(4, 4), dtype="float32", name="quiet")
    assert not caplog.records
    with caplog.at_level("DEBUG", logger="shardimpl"):
        v = shardimpl.distribute_variable("he_normal", _one_rank_layout(2), shape=(4, 8), dtype="float32", name="d/k")
        shardimpl.all_gather_variable(v, name="d/k")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "name=d/k" in lines[0] and "full_shape=(4, 8)" in lines[0] and "full_bytes=128" in lines[0]
    assert "local_bytes=128" in lines[0] and "path=shard-local" in lines[0]
    assert "bytes=128" in lines[1] and "dst=all" in lines[1]


# --- errors: what must hold, what was received, the fix ---------------------------------


def test_unknown_mesh_axis_is_refused():
    from shardimpl.mesh import resolve_layout

    mesh = DeviceMesh((1,), ["model"], ["cpu:0"])
    layout = TensorLayout((None, None))
    layout._axes = (None, "expert")  # bypass Keras' own check to reach ours
    layout._device_mesh = mesh
    with pytest.raises(ValueError, match="mesh axis 'expert'.*does not have"):
        resolve_layout(layout, (4, 4), name="moe/kernel")


def test_layout_rank_different_from_tensor_rank_is_refused():
    with pytest.raises(ValueError, match="variable 'w'.*2 entries but the tensor has rank 3"):
        shardimpl.distribute_variable(torch.zeros(2, 3, 4), _one_rank_layout(2), name="w")


def test_one_mesh_axis_for_two_dims_is_refused():
    with pytest.raises(ValueError, match="mesh axis 'model' shards two tensor dims"):
        shardimpl.distribute_variable(torch.zeros(2, 2), _one_rank_layout(2, ("model", "model")), name="w")


def test_multi_device_mesh_without_process_group_is_refused(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    mesh = DeviceMesh((2,), ["model"], ["cpu:0", "cpu:1"])
    with pytest.raises(ValueError, match="no torch.distributed process group is initialized"):
        shardimpl.distribute_variable(torch.zeros(4, 4), TensorLayout((None, "model"), mesh), name="w")


def test_initializer_without_shape_or_dtype_is_refused():
    with pytest.raises(ValueError, match="variable 'k'.*needs shape= and dtype="):
        shardimpl.distribute_variable("glorot_uniform", _one_rank_layout(2), shape=(4, 4), name="k")
    with pytest.raises(ValueError, match="needs shape= and dtype="):
        shardimpl.distribute_variable(initializers.Zeros(), _one_rank_layout(2), dtype="float32")


def test_bad_device_name_and_missing_mesh_are_refused():
    with pytest.raises(ValueError, match="'cpu:R' or 'gpu:R'"):
        shardimpl.distribute_variable(torch.zeros(2), TensorLayout(("m",), DeviceMesh((1,), ["m"], ["tpu0"])))
    with pytest.raises(ValueError, match="has no device_mesh"):
        shardimpl.distribute_variable(torch.zeros(2), TensorLayout(("m",)))
    with pytest.raises(TypeError, match="layout must be a keras.distribution.TensorLayout"):
        shardimpl.distribute_variable(torch.zeros(2), ("m",))
