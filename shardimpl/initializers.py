"""Shard-local initializers: generate exactly one rank's slice of a random tensor.

Every element's value is a pure function of the variable's seed and the
element's *global linear index* in the full tensor (a counter-based generator),
so a rank computes exactly the elements of its shard, whatever N and the shard's
shape, and:

* the values are bit-identical for any N, any layout and equal to the unsharded
  draw (an element's value does not depend on who draws it, or next to what);
* the work per rank is proportional to its shard (nothing outside it is drawn),
  and each chunk of the shard is finished while it is in cache, so the shard
  goes through memory once;
* the host holds at most `SCRATCH_BYTES` (1 MiB) of temporaries besides the shard, and a
  shard under 16 MiB 1/16 of its own bytes (256 KiB at least): `scratch_budget`;
* fans (Glorot/He/Lecun) are computed from the *full* shape, as Keras does.

The generator. With ``k1, k2`` derived from the seed and ``c`` a counter, the
64 random bits of ``c`` are splitmix64's finalizer applied to the Weyl sequence
``c * GAMMA + k1``, with ``k2`` added between the finalizer's two multiply rounds
(so two seeds whose Weyl sequences overlap still give unrelated values; splitmix64
on a Weyl sequence is Java's SplittableRandom). It is evaluated with
vectorised int64 torch ops (wrapping multiply, masked shifts, xor) on chunks of
the shard. float32 (and float16/bfloat16, rounded from float32) takes the two
32-bit halves of counter ``c`` for elements ``2c`` and ``2c + 1``; float64 takes
counter ``c`` whole for element ``c``. From a word's top 24 (float64: 53) bits:

* uniform [a, b): ``k * (b - a) / 2**24 + (a + b) / 2`` for ``k`` uniform on
  ``[-2**23, 2**23)`` (an exact integer); rounding may reach ``b`` itself, as
  with any float uniform;
* normal: inverse CDF, ``mean + stddev * sqrt(2) * erfinv(v)`` with ``v = (2m + 1) / 2**24``
  uniform on (-1, 1) (tails reach 5.4 stddev; float64: 8.3);
* truncated normal (Keras: at two stddev): the same with ``v`` scaled by
  ``erf(sqrt(2))``, clamped to ``mean +- 2 stddev`` against rounding.

Values follow Keras' distributions but not Keras' random streams: the same seed
gives the same tensor under shardimpl for every N, not Keras' own numbers. They
are bit-identical on one machine (the torch ops used are elementwise and exact
or position-independent); a little-endian host is assumed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

from shardimpl.seeds import mix_seed, next_seed

__all__ = ["InitSpec", "spec_from_initializer", "fill_local_shard", "SCRATCH_BYTES", "scratch_budget"]

#: Host temporaries of one `fill_local_shard` call, besides the shard: at most 1 MiB.
SCRATCH_BYTES = 1 << 20
#: A small shard's scratch is 1/16 of it, but never under this (fewer, longer chunks: speed).
MIN_SCRATCH_BYTES = 256 << 10


def scratch_budget(shard_bytes: int) -> int:
    """Host scratch for filling a shard of ``shard_bytes``: 1/16 of the shard, between
    `MIN_SCRATCH_BYTES` and `SCRATCH_BYTES`. A fixed 1 MiB was 6 % of a 16 MiB rank's share
    (64 MiB model, N = 4), above FSDP2's build peak of exactly P/N; large shards keep 1 MiB."""
    return min(SCRATCH_BYTES, max(MIN_SCRATCH_BYTES, shard_bytes // 16))

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # Weyl increment: 2**64 / golden ratio, odd
_MUL1 = 0xBF58476D1CE4E5B9  # splitmix64's finalizer multipliers
_MUL2 = 0x94D049BB133111EB
_SQRT2 = math.sqrt(2.0)
# Keras truncates normals at two standard deviations: erfinv's argument stays in (-E, E).
_ERF_SQRT2 = math.erf(_SQRT2)
_KINDS = ("normal", "truncated_normal", "uniform")
# Bytes per row of a chunk for its small index vectors (row numbers, starts, keys, parity).
_ROW_BYTES = 48


@dataclass(frozen=True)
class InitSpec:
    """A distribution shardimpl can draw shard-locally.

    kind: "constant" | "normal" | "truncated_normal" | "uniform".
    a, b: (value, unused) | (mean, stddev) | (mean, stddev) | (minval, maxval).
    seed: 63-bit seed of the counter-based stream (unused for "constant").
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


# --- the counter-based generator -------------------------------------------------------


def _i64(x: int) -> int:
    """``x`` mod 2**64 as a signed int64 (what torch's wrapping int64 ops hold)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


@functools.lru_cache(maxsize=1024)
def _keys(seed: int) -> tuple[int, int]:
    return _i64(mix_seed(seed, 1)), _i64(mix_seed(seed, 2))


def _mix_(x: torch.Tensor, tmp: torch.Tensor, k2: int) -> torch.Tensor:
    """splitmix64's finalizer on int64 ``x`` in place, ``k2`` added between its rounds.

    torch's ``>>`` on int64 is arithmetic, so each logical shift is masked.
    ``tmp`` (same shape) is scratch.
    """
    torch.bitwise_right_shift(x, 30, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_((1 << 34) - 1))
    x.mul_(_i64(_MUL1)).add_(k2)
    torch.bitwise_right_shift(x, 27, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_((1 << 37) - 1))
    x.mul_(_i64(_MUL2))
    torch.bitwise_right_shift(x, 31, out=tmp)
    return x.bitwise_xor_(tmp.bitwise_and_((1 << 33) - 1))


def random_bits(seed: int, counter: int) -> int:
    """The 64 random bits of ``counter`` (Python reference of `_mix_`; tests)."""
    k1, k2 = _keys(seed)
    x = (counter * _GAMMA + k1) & _MASK64
    x ^= x >> 30
    x = (x * _MUL1 + k2) & _MASK64
    x ^= x >> 27
    x = (x * _MUL2) & _MASK64
    return x ^ (x >> 31)


# --- the shard as rows of consecutive global indices -----------------------------------


@dataclass(frozen=True)
class _Rows:
    """A box of the full tensor as ``count`` rows of ``length`` consecutive linear indices.

    Row ``r``'s multi-index over ``dims`` (``(count, stride)`` pairs, major
    first) gives its first index: ``base + sum(i_k * stride_k)``. Row-major order
    of the rows is the box's own memory order, so it views as ``(count, length)``.
    """

    base: int
    dims: tuple[tuple[int, int], ...]
    length: int

    @property
    def count(self) -> int:
        return math.prod(c for c, _ in self.dims)

    def start(self, r: int) -> int:
        s = self.base
        for c, stride in reversed(self.dims):
            r, i = divmod(r, c)
            s += i * stride
        return s

    def starts(self, r0: int, r1: int) -> torch.Tensor:
        idx = torch.arange(r0, r1, dtype=torch.int64)
        out = torch.full_like(idx, self.base)
        for c, stride in reversed(self.dims):
            out.add_(torch.remainder(idx, c).mul_(stride))
            idx = torch.div(idx, c, rounding_mode="floor")
        return out

    def mixed_parity(self) -> bool:
        """Whether rows may start at both even and odd indices (an odd row stride)."""
        return any(stride % 2 for _, stride in self.dims)


#: A contiguous shard is cut into rows of this many elements (keeps the counter ramp small).
_ROW = 4096


def _boxes_of(full_shape, offsets, sizes) -> list[tuple[_Rows, int]]:
    """The shard as one or two `_Rows`, with the flat offset of each in the shard."""
    full = [int(s) for s in full_shape] or [1]
    offs = [int(o) for o in offsets] or [0]
    size = [int(n) for n in sizes] or [1]
    strides = [1] * len(full)
    for k in range(len(full) - 2, -1, -1):
        strides[k] = strides[k + 1] * full[k + 1]
    d = len(full) - 1  # dims after d are whole: a row runs over them
    while d > 0 and size[d] == full[d]:
        d -= 1
    dims: list[tuple[int, int]] = []
    for k in range(d):
        if size[k] == 1:
            continue
        if dims and dims[-1][1] == size[k] * strides[k]:  # whole dim: merge with the one above
            dims[-1] = (dims[-1][0] * size[k], strides[k])
        else:
            dims.append((size[k], strides[k]))
    base = sum(o * s for o, s in zip(offs, strides))
    length = size[d] * strides[d]
    if dims or length <= _ROW:
        return [(_Rows(base, tuple(dims), length), 0)]
    # One long run (row-sharded, or replicated): rows of _ROW, then the remainder.
    k, tail = divmod(length, _ROW)
    boxes = [(_Rows(base, ((k, _ROW),), _ROW), 0)]
    if tail:
        boxes.append((_Rows(base + k * _ROW, (), tail), k * _ROW))
    return boxes


# --- drawing ---------------------------------------------------------------------------


def _counters(n: int, wide: bool, parity) -> int:
    """Counters covering ``n`` consecutive elements starting at ``parity`` (None: either)."""
    if wide:
        return n
    return n // 2 + 1 if parity is None else (n + 1 + parity) // 2


def _scratch_bytes(rows_per_chunk: int, n: int, wide: bool, mixed: bool, stage_itemsize: int) -> int:
    """Host bytes of a chunk of ``rows_per_chunk`` rows of ``n`` elements: every buffer below."""
    p = _counters(n, wide, None)
    return (
        8 * p  # ramp: counter offsets times GAMMA
        + 2 * 8 * rows_per_chunk * p  # the counters' bits, and the shift scratch
        + (4 * rows_per_chunk * n if mixed else 0)  # words realigned for odd-starting rows
        + stage_itemsize * rows_per_chunk * n  # values staged before a cast or device copy
        + _ROW_BYTES * rows_per_chunk  # index vectors: row numbers, starts, keys, parity
    )


def _chunking(rows: _Rows, wide: bool, stage_itemsize: int, budget: int) -> tuple[int, int, bool]:
    """(rows per chunk, elements per chunk row, mixed parity) within ``budget`` bytes of scratch."""
    length = rows.length
    mixed = not wide and rows.count > 1 and rows.mixed_parity()
    one = _scratch_bytes(1, length, wide, mixed, stage_itemsize)
    if one <= budget:
        per_row = _scratch_bytes(2, length, wide, mixed, stage_itemsize) - one
        rc = min(rows.count, max(1, (budget - (one - per_row)) // per_row))
        return rc, length, mixed and rc > 1
    lo, hi = 1, length  # one row at a time, in equal pieces no longer than the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _scratch_bytes(1, mid, wide, False, stage_itemsize) <= budget:
            lo = mid
        else:
            hi = mid - 1
    pieces = -(-length // lo)
    return 1, -(-length // pieces), False


@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor: ``int tensor * it`` computes in ``dtype`` whatever the default dtype.

    Cached (real tensors only: under FakeTensorMode `_Draw.fill` makes a fresh one).
    """
    return torch.tensor(value, dtype=dtype)


class _Draw:
    """One variable's stream, drawn into shard chunks through preallocated scratch."""

    def __init__(self, spec: InitSpec, gen_dtype: torch.dtype):
        self.spec = spec
        self.wide = gen_dtype == torch.float64
        self.gen = gen_dtype
        self.k1, self.k2 = _keys(spec.seed)
        bits = 64 if self.wide else 32
        mantissa = 53 if self.wide else 24
        self.drop = bits - mantissa  # low bits dropped from each word
        if spec.kind == "uniform":
            self.first_mul = (spec.b - spec.a) * 2.0 ** -mantissa
            self.shift = (spec.a + spec.b) / 2.0
        else:  # v = (2m + 1) / 2**mantissa, times erf(sqrt(2)) when truncated
            limit = _ERF_SQRT2 if spec.kind == "truncated_normal" else 1.0
            self.first_mul = limit * 2.0 ** -(bits - 1)
            self.clear_low = -(1 << self.drop)  # keep the top `mantissa` bits ...
            self.set_half = 1 << (self.drop - 1)  # ... then add half a step: 2m + 1

    def to_values(self, w: torch.Tensor, out: torch.Tensor) -> None:
        """Random words ``w`` (int32, or int64 if wide; modified) -> values in ``out``."""
        spec = self.spec
        if spec.kind == "uniform":
            w.bitwise_right_shift_(self.drop)
            torch.mul(w, self.first_mul_t, out=out)
            out.add_(self.shift)
            return
        w.bitwise_and_(self.clear_low).bitwise_or_(self.set_half)
        torch.mul(w, self.first_mul_t, out=out)
        out.erfinv_().mul_(_SQRT2 * spec.b)
        if spec.kind == "truncated_normal":
            out.clamp_(-2.0 * spec.b, 2.0 * spec.b)
        if spec.a != 0.0:
            out.add_(spec.a)

    def fill(self, box: torch.Tensor, rows: _Rows, budget: int) -> None:
        """Fill ``box`` (``rows.count`` x ``rows.length``, on any device) with its values,
        within ``budget`` bytes of host scratch."""
        direct = box.device.type == "cpu" and box.dtype == self.gen
        rc, n, mixed = _chunking(rows, self.wide, 0 if direct else self.gen.itemsize, budget)
        p = _counters(n, self.wide, None)
        # All scratch is allocated here, once: chunks take views of it.
        ramp = torch.arange(p, dtype=torch.int64).mul_(_i64(_GAMMA))
        bits = torch.empty(rc * p, dtype=torch.int64)
        tmp = torch.empty(rc * p, dtype=torch.int64)
        realigned = torch.empty(rc * n, dtype=torch.int32) if mixed else None
        stage = None if direct else torch.empty(rc * n, dtype=self.gen)
        scratch = (ramp, bits, tmp, realigned, stage)
        # Under FakeTensorMode (planning) values do not exist: the first chunk, the
        # largest, gives the whole allocation pattern.
        first_only = _is_fake(box)
        make = torch.tensor if first_only else _scalar
        self.first_mul_t = make(self.first_mul, dtype=self.gen)
        if rc == 1:
            for r in range(rows.count):
                start = rows.start(r)
                for j in range(0, rows.length, n):
                    m = min(n, rows.length - j)
                    self._chunk(box[r:r + 1, j:j + m], *self._row_key(start + j), *scratch)
                    if first_only:
                        return
            return
        for r in range(0, rows.count, rc):
            r1 = min(rows.count, r + rc)
            self._chunk(box[r:r1], *self._row_keys(rows, r, r1, mixed), *scratch)
            if first_only:
                return

    def _row_key(self, start: int) -> tuple[int, int | None]:
        """(key, parity) of one row starting at global index ``start``."""
        if self.wide:
            return _i64(start * _GAMMA + self.k1), None
        return _i64((start >> 1) * _GAMMA + self.k1), start & 1

    def _row_keys(self, rows: _Rows, r0: int, r1: int, mixed: bool):
        """(keys, parity) of rows r0..r1: parity an int, or the rows' odd-start mask if mixed."""
        if r1 == r0 + 1:
            return self._row_key(rows.start(r0))
        if len(rows.dims) == 1 and not mixed:  # starts are affine: base + r * stride
            start, stride = rows.start(r0), rows.dims[0][1]
            step, first = (stride, start) if self.wide else (stride // 2, start >> 1)
            keys = torch.arange(r1 - r0, dtype=torch.int64).mul_(_i64(step * _GAMMA))
            return keys.add_(_i64(first * _GAMMA + self.k1)), None if self.wide else start & 1
        starts = rows.starts(r0, r1)
        parity = None
        if not self.wide:
            parity = torch.bitwise_and(starts, 1).bool() if mixed else rows.start(r0) & 1
            starts.bitwise_right_shift_(1)
        return starts.mul_(_i64(_GAMMA)).add_(self.k1), parity

    def _chunk(self, out, key, parity, ramp, bits, tmp, realigned, stage) -> None:
        """Fill ``out`` (rows x m) from its rows' keys (first counter * GAMMA + k1).

        ``parity``: None (float64: a counter per element), 0 or 1 (where each row
        starts in its first counter's two words), or a bool tensor per row.
        """
        nr, m = out.shape
        mixed = isinstance(parity, torch.Tensor)
        p = _counters(m, self.wide, None if mixed else parity)
        x = bits[: nr * p].view(nr, p)
        if isinstance(key, int):
            torch.add(ramp[:p], key, out=x[0])
        else:
            torch.add(key[:, None], ramp[:p], out=x)
        _mix_(x, tmp[: nr * p].view(nr, p), self.k2)
        if self.wide:
            w = x
        elif not mixed:
            w = x.view(torch.int32)[:, parity:parity + m]
        else:  # rows start at both parities: odd ones take the words one to the right
            words = x.view(torch.int32)
            w = realigned[: nr * m].view(nr, m)
            torch.where(parity[:, None], words[:, 1:m + 1], words[:, :m], out=w)
        if stage is None:
            self.to_values(w, out)
        else:
            values = stage[: nr * m].view(nr, m)
            self.to_values(w, values)
            out.copy_(values)


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def fill_local_shard(spec: InitSpec, full_shape, offsets, sizes, *, dtype, device) -> torch.Tensor:
    """Allocate this shard (``sizes`` at ``offsets`` of ``full_shape``) on ``device`` and fill it.

    Every element is drawn from its global linear index, so the shard equals the
    same slice of the unsharded draw, for every N. Allocates the shard on
    ``device`` plus at most `scratch_budget` (<= `SCRATCH_BYTES`) on the host (freed on return); the
    work is proportional to the shard's elements. No collective.
    """
    local = torch.empty(tuple(sizes), dtype=dtype, device=device)
    if spec.kind == "constant":
        return local.fill_(spec.a)
    if spec.kind not in _KINDS:
        raise ValueError(
            f"InitSpec.kind must be one of {('constant',) + _KINDS}. Received: kind={spec.kind!r}"
        )
    if local.numel() == 0:
        return local
    draw = _Draw(spec, torch.float64 if dtype == torch.float64 else torch.float32)
    budget = scratch_budget(local.numel() * local.element_size())
    flat = local.view(-1)
    for rows, at in _boxes_of(full_shape, offsets, sizes):
        draw.fill(flat[at:at + rows.count * rows.length].view(rows.count, rows.length), rows, budget)
    return local
