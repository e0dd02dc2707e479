"""Shard-local initializers: generate exactly one rank's slice of a random tensor.

The full tensor is cut into a fixed grid of tiles that depends only on its
shape (never on the number of ranks). Tile ``i`` is drawn from a CPU generator
seeded with ``mix_seed(seed, i)``; a rank draws only the tiles that meet its
shard and copies the overlap into the shard. So:

* the values are bit-identical for any N (a tile is the same wherever it lands);
* the host holds one tile (at most `TILE_NUMEL` elements) besides the shard;
* fans (Glorot/He/Lecun) are computed from the *full* shape, as Keras does.

Values follow Keras' distributions but not Keras' random streams: the same seed
gives the same tensor under shardimpl for every N, not Keras' own numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice, product

import torch

from shardimpl.seeds import mix_seed, next_seed

__all__ = ["InitSpec", "spec_from_initializer", "fill_local_shard", "tile_shape", "TILE_NUMEL"]

#: Elements per tile: 2**18 (1 MiB of float32 values drawn at a time).
TILE_NUMEL = 1 << 18
_SQRT2 = math.sqrt(2.0)
# Keras truncates normals at two standard deviations.
_LO = 0.5 * (1.0 + math.erf(-2.0 / _SQRT2))
_HI = 0.5 * (1.0 + math.erf(2.0 / _SQRT2))


@dataclass(frozen=True)
class InitSpec:
    """A distribution shardimpl can draw shard-locally.

    kind: "constant" | "normal" | "truncated_normal" | "uniform".
    a, b: (value, unused) | (mean, stddev) | (mean, stddev) | (minval, maxval).
    seed: 63-bit seed of the tile grid (unused for "constant").
    """

    kind: str
    a: float
    b: float = 0.0
    seed: int = 0


def _resolve_seed(init) -> int:
    seed = getattr(init, "_init_seed", None)
    if isinstance(seed, int) and not isinstance(seed, bool):
        return mix_seed(seed)
    return next_seed()


def _variance_scaling(init, shape) -> InitSpec:
    from keras.src.initializers.random_initializers import compute_fans

    fan_in, fan_out = compute_fans(
        shape,
        input_axes=getattr(init, "input_axes", None),
        output_axes=getattr(init, "output_axes", None),
    )
    scale = float(init.scale)
    if init.mode == "fan_in":
        scale /= max(1.0, fan_in)
    elif init.mode == "fan_out":
        scale /= max(1.0, fan_out)
    else:
        scale /= max(1.0, (fan_in + fan_out) / 2.0)
    seed = _resolve_seed(init)
    if init.distribution == "truncated_normal":
        return InitSpec("truncated_normal", 0.0, math.sqrt(scale) / 0.87962566103423978, seed)
    if init.distribution == "untruncated_normal":
        return InitSpec("normal", 0.0, math.sqrt(scale), seed)
    limit = math.sqrt(3.0 * scale)
    return InitSpec("uniform", -limit, limit, seed)


def spec_from_initializer(init, shape) -> InitSpec | None:
    """The `InitSpec` of a Keras built-in initializer, or None if it has no shard-local form.

    Exact classes only: a user's subclass may override ``__call__``.
    """
    from keras import initializers as ki

    cls = type(init)
    if cls is ki.Zeros:
        return InitSpec("constant", 0.0)
    if cls is ki.Ones:
        return InitSpec("constant", 1.0)
    if cls is ki.Constant:
        value = init.value
        if hasattr(value, "shape") and tuple(getattr(value, "shape", ())) != ():
            return None
        return InitSpec("constant", float(value))
    if cls is ki.RandomNormal:
        return InitSpec("normal", float(init.mean), float(init.stddev), _resolve_seed(init))
    if cls is ki.TruncatedNormal:
        return InitSpec("truncated_normal", float(init.mean), float(init.stddev), _resolve_seed(init))
    if cls is ki.RandomUniform:
        return InitSpec("uniform", float(init.minval), float(init.maxval), _resolve_seed(init))
    variance_scaling = (
        ki.VarianceScaling, ki.GlorotNormal, ki.GlorotUniform, ki.HeNormal,
        ki.HeUniform, ki.LecunNormal, ki.LecunUniform,
    )
    if cls in variance_scaling:
        return _variance_scaling(init, shape)
    return None


def tile_shape(shape) -> tuple[int, ...]:
    """The tile of the fixed grid: halve the longest extent until <= TILE_NUMEL elements."""
    tile = [max(int(s), 1) for s in shape]
    while math.prod(tile) > TILE_NUMEL:
        i = max(range(len(tile)), key=lambda j: tile[j])
        tile[i] = math.ceil(tile[i] / 2)
    return tuple(tile)


def _draw_tile(spec: InitSpec, extent, index: int, gen_dtype) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(mix_seed(spec.seed, index))
    if spec.kind == "normal":
        return torch.randn(extent, generator=g, dtype=gen_dtype).mul_(spec.b).add_(spec.a)
    if spec.kind == "uniform":
        t = torch.rand(extent, generator=g, dtype=gen_dtype)
        return t.mul_(spec.b - spec.a).add_(spec.a)
    if spec.kind == "truncated_normal":
        # Inverse CDF of the normal restricted to [-2, 2]: no rejection loop,
        # so every tile consumes a fixed amount of the stream.
        t = torch.rand(extent, generator=g, dtype=gen_dtype)
        t.mul_(_HI - _LO).add_(_LO).mul_(2.0).sub_(1.0).erfinv_().mul_(_SQRT2)
        return t.clamp_(-2.0, 2.0).mul_(spec.b).add_(spec.a)
    raise ValueError(f"unknown InitSpec kind {spec.kind!r}")


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def fill_local_shard(spec: InitSpec, full_shape, offsets, sizes, *, dtype, device) -> torch.Tensor:
    """Allocate this shard (``sizes`` at ``offsets`` of ``full_shape``) on ``device`` and fill it.

    Allocates the shard on ``device`` plus one tile on the host at a time.
    No collective.
    """
    local = torch.empty(tuple(sizes), dtype=dtype, device=device)
    if spec.kind == "constant":
        return local.fill_(spec.a)
    if local.numel() == 0:
        return local
    gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    full_shape = tuple(int(s) for s in full_shape)
    tile = tile_shape(full_shape)
    grid = [math.ceil(s / t) for s, t in zip(full_shape, tile)]
    ranges = [
        range(o // t, math.ceil((o + n) / t)) for o, n, t in zip(offsets, sizes, tile)
    ]
    tiles = product(*ranges)
    if _is_fake(local):
        # Under FakeTensorMode (planning) values do not exist: one tile gives the same
        # allocation pattern (the shard plus one tile) as drawing them all.
        tiles = islice(tiles, 1)
    for idx in tiles:
        origin = [i * t for i, t in zip(idx, tile)]
        extent = [min(t, s - o) for t, s, o in zip(tile, full_shape, origin)]
        linear = 0
        for i, g in zip(idx, grid):
            linear = linear * g + i
        values = _draw_tile(spec, extent, linear, gen_dtype)
        lo = [max(o, so) for o, so in zip(origin, offsets)]
        hi = [min(o + e, so + n) for o, e, so, n in zip(origin, extent, offsets, sizes)]
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
        dst = tuple(slice(a - so, b - so) for a, b, so in zip(lo, hi, offsets))
        local[dst].copy_(values[src])
        del values
    return local
