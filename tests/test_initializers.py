"""The counter-based shard-local generator: slices, statistics, memory and work, single process.

Every statistical check uses fixed seeds, so it is deterministic; thresholds sit
about five standard errors (or a 1e-4 significance level) from the expected value.
"""

from __future__ import annotations

import math
import os
from itertools import product

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

import shardimpl.initializers as inits
from shardimpl.initializers import SCRATCH_BYTES, InitSpec, fill_local_shard, random_bits, scratch_budget
from shardimpl.layout import local_shard_bounds, shard_slices
from shardimpl.memory import PeakMeter

SPECS = {
    "uniform": InitSpec("uniform", -1.0, 3.0, 11),
    "normal": InitSpec("normal", 0.5, 2.0, 12),
    "truncated_normal": InitSpec("truncated_normal", -0.25, 1.5, 13),
}
N_STAT = 1 << 20  # elements per statistical draw (the KS test sorts a quarter of that)


def _full(spec, shape, dtype=torch.float32):
    return fill_local_shard(spec, shape, (0,) * len(shape), shape, dtype=dtype, device="cpu")


def _shard(spec, shape, offsets, sizes, dtype=torch.float32):
    return fill_local_shard(spec, shape, offsets, sizes, dtype=dtype, device="cpu")


def _every_shard(shape, mesh_shape, placements):
    for coord in product(*(range(k) for k in mesh_shape)):
        yield local_shard_bounds(shape, mesh_shape, placements, coord)


LAYOUTS = [  # (shape, mesh shape, placements): row, column, both, several axes, uneven and empty
    ((13,), (4,), (Shard(0),)),
    ((5, 7), (4,), (Shard(0),)),
    ((5, 7), (3,), (Shard(1),)),
    ((700, 530), (7,), (Shard(1),)),
    ((64, 4101), (3,), (Shard(0),)),
    ((3, 4099), (2, 2), (Shard(1), Shard(1))),
    ((9, 3, 4), (2, 3), (Shard(0), Shard(2))),
    ((9, 3, 4), (2, 3), (Shard(2), Shard(1))),
    ((6, 5, 4, 3), (2, 2), (Shard(1), Shard(3))),
    ((6, 5, 4, 3), (3, 2), (Shard(0), Replicate())),
    ((2, 3, 5, 1031), (4,), (Shard(3),)),
    ((1, 1), (2,), (Shard(1),)),
]


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,mesh_shape,placements", LAYOUTS, ids=lambda v: str(v))
def test_every_shard_is_the_same_slice_of_the_unsharded_draw(kind, dtype, shape, mesh_shape, placements):
    full = _full(SPECS[kind], shape, dtype)
    for offsets, sizes in _every_shard(shape, mesh_shape, placements):
        local = _shard(SPECS[kind], shape, offsets, sizes, dtype)
        assert local.shape == sizes and local.dtype == dtype
        assert torch.equal(local, full[shard_slices(offsets, sizes)]), (offsets, sizes)


@pytest.mark.parametrize("budget", [400, 5000])
def test_small_scratch_budgets_change_chunking_but_not_values(monkeypatch, budget):
    """Many chunks, rows split in pieces, mixed row parities, staged casts: same bits."""
    shapes = [((70, 53), (3,), (Shard(1),)), ((9000,), (3,), (Shard(0),)), ((5, 3, 2049), (2, 2), (Shard(0), Shard(2)))]
    expected = {(s, d): _full(SPECS["truncated_normal"], s, d) for s, _, _ in shapes for d in (torch.float32, torch.float16)}
    monkeypatch.setattr(inits, "SCRATCH_BYTES", budget)
    for shape, mesh_shape, placements in shapes:
        for dtype in (torch.float32, torch.float16):
            for offsets, sizes in _every_shard(shape, mesh_shape, placements):
                local = _shard(SPECS["truncated_normal"], shape, offsets, sizes, dtype)
                assert torch.equal(local, expected[(shape, dtype)][shard_slices(offsets, sizes)])


def test_values_are_the_reference_generator_bits():
    """float64 element c is counter c's top 53 bits; float32 elements 2c, 2c+1 its low, high words."""

    def signed(x, bits):
        return x - (1 << bits) if x >> (bits - 1) else x

    spec = InitSpec("uniform", -0.5, 0.5, 42)
    wide = _full(spec, (3, 7), torch.float64).flatten().tolist()
    assert wide == [(signed(random_bits(42, c), 64) >> 11) * 2.0 ** -53 for c in range(21)]
    narrow = _full(spec, (3, 7)).flatten().tolist()
    words = [signed((random_bits(42, g >> 1) >> (32 * (g & 1))) & 0xFFFFFFFF, 32) for g in range(21)]
    assert narrow == [(w >> 8) * 2.0 ** -24 for w in words]


def test_half_precision_is_the_float32_draw_rounded():
    spec = SPECS["normal"]
    f32 = _full(spec, (33, 65))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(_full(spec, (33, 65), dtype), f32.to(dtype))


# --- distributions ----------------------------------------------------------------------


def _cdf(kind, spec, x):
    if kind == "uniform":
        return (x - spec.a) / (spec.b - spec.a)
    z = (x - spec.a) / spec.b
    phi = 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))
    if kind == "normal":
        return phi
    lo, hi = 0.5 * (1 + math.erf(-math.sqrt(2))), 0.5 * (1 + math.erf(math.sqrt(2)))
    return (phi - lo) / (hi - lo)


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kolmogorov_smirnov_against_the_exact_distribution(kind, dtype):
    spec = SPECS[kind]
    x = _full(spec, (512, N_STAT // 2048), dtype).flatten().double().sort().values
    n = x.numel()
    f = _cdf(kind, spec, x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - f, f - (i - 1) / n).max().item()
    assert d < math.sqrt(-math.log(1e-4 / 2) / (2 * n)), d  # KS critical value at alpha = 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_and_ranges(dtype):
    n = N_STAT
    u = _full(SPECS["uniform"], (n,), dtype).double()
    assert -1.0 <= u.min() < -1.0 + 1e-4 and 3.0 - 1e-4 < u.max() <= 3.0
    assert abs(u.mean() - 1.0) < 5 * (4 / math.sqrt(12)) / math.sqrt(n)
    assert abs(u.var() - 16 / 12) < 5 * 1.193 / math.sqrt(n)
    z = (_full(SPECS["normal"], (n,), dtype).double() - 0.5) / 2.0
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(z.pow(3).mean()) < 5 * math.sqrt(15 / n)  # skewness
    assert abs(z.pow(4).mean() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    assert z.abs().max() > 4.5  # the tails are there (erfinv reaches 5.4 sigma in float32)
    t = (_full(SPECS["truncated_normal"], (n,), dtype).double() + 0.25) / 1.5
    assert t.abs().max() <= 2.0 and t.abs().max() > 1.999
    assert abs(t.std() - 0.87962566103423978) < 5 * 0.63 / math.sqrt(n)
    assert abs(t.mean()) < 5 * 0.88 / math.sqrt(n)


def _chi2_bound(cells):
    return cells - 1 + 5 * math.sqrt(2 * (cells - 1))


def _uniform01(shape, seed, dtype=torch.float32):
    return _full(InitSpec("uniform", 0.0, 1.0, seed), shape, dtype).double()


def test_uniform_histogram_and_every_bit_are_balanced():
    u = _uniform01((N_STAT,), 5)
    counts = torch.bincount((u * 1024).long(), minlength=1024).double()
    expected = u.numel() / 1024
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert 1023 - 5 * math.sqrt(2046) < chi2 < _chi2_bound(1024), chi2
    k = (u * 2 ** 24).int()  # the 24 random bits of each value
    ones = torch.tensor([((k >> b) & 1).sum().item() for b in range(24)], dtype=torch.float64)
    assert ((ones - u.numel() / 2).abs() < 5 * math.sqrt(u.numel() / 4)).all(), ones


def _pair_chi2(a, b, bins=32):
    cells = (a * bins).long() * bins + (b * bins).long()
    counts = torch.bincount(cells, minlength=bins * bins).double()
    expected = a.numel() / bins**2
    return ((counts - expected) ** 2 / expected).sum().item()


def test_neighbours_rows_and_seeds_are_independent():
    """Joint histograms (32 x 32) and correlations of element pairs that share structure."""
    shape = (512, 1024)
    x = _uniform01(shape, 7)
    pairs = {  # built one at a time: the test process keeps a small heap
        "same counter (2c, 2c+1)": lambda: (x[:, 0::2], x[:, 1::2]),
        "adjacent counters (2c+1, 2c+2)": lambda: (x[:, 1:-1:2], x[:, 2::2]),
        "vertical neighbours": lambda: (x[:-1], x[1:]),
        "seeds 7 and 8": lambda: (x, _uniform01(shape, 8)),
        "seed 7 float32 and float64": lambda: (x, _uniform01(shape, 7, torch.float64)),
        "lag 4096": lambda: (x.flatten()[:-4096], x.flatten()[4096:]),
    }
    for name, make in pairs.items():
        a, b = (t.flatten() for t in make())
        assert _pair_chi2(a, b) < _chi2_bound(1024), name
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel()), (name, corr)
        del a, b


def test_every_counter_bit_flips_every_output_bit_half_the_time():
    """Strict avalanche of the mixer: flipping one of 64 input bits flips each output bit w.p. 1/2."""
    n = 4096
    x = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    base = inits._mix_(x.clone(), torch.empty_like(x), 12345)
    worst = 0.0
    for i in range(64):
        flipped = inits._mix_(x ^ inits._i64(1 << i), torch.empty_like(x), 12345) ^ base
        p = torch.stack([(flipped >> j) & 1 for j in range(64)]).double().mean(1)
        worst = max(worst, (p - 0.5).abs().max().item())
    assert worst < 0.045, worst  # 64 x 64 proportions of 4096 draws: sd 0.0078, max ~0.03


def test_distinct_seeds_give_distinct_values():
    draws = [_full(InitSpec("uniform", 0.0, 1.0, s), (4096,)) for s in range(64)]
    for i in range(len(draws)):
        for j in range(i):
            assert (draws[i] == draws[j]).sum() <= 2  # 24-bit values: ~0.0002 equal by chance


# --- memory, work, planning, devices ---------------------------------------------------------

MEMORY_CASES = [  # shards of 1-3 MiB: several chunks each
    ((2048, 1024), (2,), (Shard(0),)),
    ((1024, 2048), (2,), (Shard(1),)),
    ((4095, 4095), (1024,), (Shard(1),)),
    ((64, 63, 65, 3), (2, 2), (Shard(1), Shard(3))),
    ((100001, 7), (2,), (Shard(1),)),
    ((3, 300001), (2,), (Shard(1),)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_creation_holds_at_most_the_shard_plus_scratch(dtype):
    for shape, mesh_shape, placements in MEMORY_CASES:
        offsets, sizes = local_shard_bounds(shape, mesh_shape, placements, (0,) * len(mesh_shape))
        spec = SPECS["uniform" if dtype == torch.float64 else "truncated_normal"]
        with PeakMeter("cpu") as m:
            local = _shard(spec, shape, offsets, sizes, dtype)
        shard_bytes = local.numel() * local.element_size()
        assert shard_bytes <= m.result().device_peak_bytes <= shard_bytes + scratch_budget(shard_bytes), shape


def test_a_small_shard_gets_a_scratch_of_a_sixteenth_of_it():
    """A 4 MiB shard (a 64 MiB model's layer on 4 ranks) fills within 256 KiB of scratch, not 1 MiB:
    a rank's build peak stays within 2 % of P/N, as FSDP2's meta-device build does."""
    shape = (1024, 4096)
    offsets, sizes = local_shard_bounds(shape, (4,), (Shard(1),), (0,))
    with PeakMeter("cpu") as m:
        local = _shard(SPECS["truncated_normal"], shape, offsets, sizes, torch.float32)
    shard_bytes = local.numel() * local.element_size()
    assert scratch_budget(shard_bytes) == 256 << 10
    assert m.result().device_peak_bytes <= shard_bytes * 1.0625
    assert scratch_budget(64 << 20) == SCRATCH_BYTES


def test_fake_tensor_planning_allocates_like_a_real_draw():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for shape, mesh_shape, placements in MEMORY_CASES:
        offsets, sizes = local_shard_bounds(shape, mesh_shape, placements, (0,) * len(mesh_shape))
        with PeakMeter("cpu") as real:
            _shard(SPECS["normal"], shape, offsets, sizes)
        with FakeTensorMode(), PeakMeter("cpu") as fake:
            local = _shard(SPECS["normal"], shape, offsets, sizes)
        assert tuple(local.shape) == tuple(sizes)
        assert abs(fake.result().device_peak_bytes - real.result().device_peak_bytes) <= 64, shape


@pytest.mark.parametrize("n", [16, 1024, 4096])
@pytest.mark.parametrize("dim", [0, 1])
def test_work_is_the_shard_only(monkeypatch, n, dim):
    """Counters hashed per rank: half the shard (float32), plus at most one per row."""
    hashed = []
    mix = inits._mix_
    monkeypatch.setattr(inits, "_mix_", lambda x, tmp, k2: (hashed.append(x.numel()), mix(x, tmp, k2))[1])
    shape = (4096, 4096)
    offsets, sizes = local_shard_bounds(shape, (n,), (Shard(dim),), (0,))
    local = _shard(SPECS["uniform"], shape, offsets, sizes)
    rows = sizes[0] if dim == 1 else local.numel() // 4096
    assert local.numel() / 2 <= sum(hashed) <= local.numel() / 2 + rows
    hashed.clear()
    _shard(SPECS["uniform"], shape, offsets, sizes, torch.float64)
    assert sum(hashed) == local.numel()


def test_erfinv_is_position_independent():
    """Shards start anywhere in a vectorised loop: erfinv must not depend on the position."""
    v = torch.linspace(-0.9999, 0.9999, 100003)
    whole = torch.erfinv(v)
    for start, stop in [(1, 7), (3, 50001), (17, 100003), (5, 38), (99990, 100003)]:
        assert torch.equal(torch.erfinv(v[start:stop].clone()), whole[start:stop])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_shard_holds_the_host_draw():
    shape = (300, 257)
    offsets, sizes = local_shard_bounds(shape, (3,), (Shard(1),), (1,))
    for dtype in (torch.float32, torch.bfloat16):
        local = fill_local_shard(SPECS["normal"], shape, offsets, sizes, dtype=dtype, device="cuda")
        assert local.device.type == "cuda"
        assert torch.equal(local.cpu(), _full(SPECS["normal"], shape, dtype)[shard_slices(offsets, sizes)])


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="InitSpec.kind must be one of.*Received: kind='gamma'"):
        fill_local_shard(InitSpec("gamma", 1.0), (2, 2), (0, 0), (2, 2), dtype=torch.float32, device="cpu")
