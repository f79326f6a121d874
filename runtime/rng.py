"""Explicit random generators for initial latents and sampler noise.

``TorchGenerator`` reproduces ``torch.randn(..., generator=torch.Generator("cpu").manual_seed(seed))``
bit for bit in NumPy (x86-64 torch build, float32 and float16), so a seed gives the same image as
diffusers on CPU. ``NumpyGenerator`` is NumPy's PCG64 normal stream: faster, but its own numbers.
The facts this port follows are in the team notes TORCH_RNG.md; the kernel is torch's
``ATen/native/cpu/DistributionTemplates.h`` (``normal_fill``) with ``avx_mathfun.h``.
"""

import math

import numpy as np

from sdrt.runtime.errors import InvalidInputError

GENERATOR_KINDS = ("torch", "numpy")

# torch's manual_seed accepts this range; negative seeds wrap modulo 2**64.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

_F32 = np.float32
_F64 = np.float64
_U32 = np.uint32

# Below this many elements torch draws each normal with the scalar double-precision path.
_FILL_MIN_SIZE = 16


def _check_seed(seed):
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not _SEED_MIN <= seed <= _SEED_MAX:
        raise InvalidInputError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    return seed


def _check_shape(shape):
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if (
        isinstance(shape, (str, bytes))
        or not hasattr(shape, "__iter__")
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape)
    ):
        raise InvalidInputError(f"shape must be an int or a sequence of ints, got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"shape must not have negative sizes, got {shape}")
    return shape


def _random_seed():
    """A fresh 63-bit seed from the operating system's entropy."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# Exact float32 arithmetic helpers
# ---------------------------------------------------------------------------------------------


def _fma32(a, b, c):
    """Float32 fused multiply-add ``a * b + c`` with one rounding, for float32 inputs.

    The float64 product of two float32 values is exact, so only the float64 sum rounds before the
    final float32 rounding. That double rounding is wrong only when the float64 sum is inexact and
    lands exactly halfway between two float32 values (or in float32's subnormal range); those lanes
    are redone with TwoSum and round-to-odd, which makes the second rounding exact.
    """
    product = np.multiply(a, b, dtype=_F64)
    total = np.add(product, c, dtype=_F64)
    result = total.astype(_F32)
    bits = total.view(np.int64)
    # Halfway: the 29 bits float32 drops are 1000...0. Tiny: exponent below float32's normal range.
    suspect = (bits & 0x1FFFFFFF) == 0x10000000
    suspect |= (bits & 0x7FF0000000000000) < ((1023 - 126) << 52)
    if suspect.any():
        idx = np.flatnonzero(suspect)
        p = product.reshape(-1)[idx]
        s = total.reshape(-1)[idx]
        q = np.broadcast_to(np.asarray(c, dtype=_F64), total.shape).reshape(-1)[idx]
        # TwoSum (Knuth): err is the exact rounding error of s = p + q.
        qv = s - p
        err = (p - (s - qv)) + (q - qv)
        s_bits = s.view(np.int64).copy()
        to_odd = (err != 0) & ((s_bits & 1) == 0)
        # Step one ulp towards the exact value: up in magnitude when err has the sign of s.
        step = np.where((err > 0) == (s > 0), 1, -1)
        s_bits[to_odd] += step[to_odd]
        np.put(result, idx, s_bits.view(_F64).astype(_F32))
    return result


def _xor_sign(x, sign_bits):
    """Flip the sign of ``x`` where ``sign_bits`` has bit 31 set (float32 XOR, as in the header)."""
    return (x.view(_U32) ^ sign_bits).view(_F32)


# Constants of avx_mathfun.h, as float32.
_ONE = _F32(1.0)
_HALF = _F32(0.5)
_SQRTHF = _F32(0.707106781186547524)
_LOG_P = [_F32(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
)]
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_MINUS_DP = [_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8)]
_SINCOF = [_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1)]
_COSCOF = [_F32(2.443315711809948e-005), _F32(-1.388731625493765e-003), _F32(4.166664568298827e-002)]
_FOPI = _F32(1.27323954473516)  # 4 / pi
_TWO_PI = _F32(2.0 * math.pi)
_MINUS_TWO = _F32(-2.0)


def _log_ps(x):
    """``log256_ps`` of avx_mathfun.h for positive normal float32 input, with GCC's FMA fusion."""
    bits = x.view(_U32)
    e = ((bits >> _U32(23)).astype(np.int32) - 0x7F).astype(_F32) + _ONE
    # Keep the mantissa, as a value in [0.5, 1).
    x = ((bits & _U32(0x807FFFFF)) | _HALF.view(_U32)).view(_F32)
    mask = x < _SQRTHF
    tmp = np.where(mask, x, _F32(0.0))
    x = x - _ONE
    e = e - np.where(mask, _ONE, _F32(0.0))
    x = x + tmp

    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for coefficient in _LOG_P[1:]:
        y = _fma32(y, x, coefficient)
    y = y * x
    y = _fma32(y, z, e * _LOG_Q1)
    y = y - z * _HALF
    x = x + y
    return _fma32(e, _LOG_Q2, x)


def _sincos_ps(x):
    """``sincos256_ps`` of avx_mathfun.h with GCC's FMA fusion; returns (sin, cos)."""
    sign_bit_sin = x.view(_U32) & _U32(0x80000000)
    x = (x.view(_U32) & _U32(0x7FFFFFFF)).view(_F32)

    # j = (trunc(|x| * 4/pi) + 1) & ~1 (the Cephes octant).
    j = ((x * _FOPI).astype(np.int32) + 1) & ~1
    y = j.astype(_F32)
    swap_sign_bit_sin = (j & 4).astype(_U32) << _U32(29)
    poly_mask = (j & 2) == 0

    # Extended precision modular arithmetic: x = ((x - y*DP1) - y*DP2) - y*DP3.
    for minus_dp in _MINUS_DP:
        x = _fma32(y, minus_dp, x)

    sign_bit_cos = (~(j - 2) & 4).astype(_U32) << _U32(29)
    sign_bit_sin = sign_bit_sin ^ swap_sign_bit_sin

    # Cosine polynomial, for 0 <= x <= pi/4.
    z = x * x
    yc = _fma32(np.full_like(z, _COSCOF[0]), z, _COSCOF[1])
    yc = _fma32(yc, z, _COSCOF[2])
    yc = z * yc
    yc = _fma32(z, yc, -(z * _HALF))
    yc = yc + _ONE

    # Sine polynomial.
    ys = _fma32(np.full_like(z, _SINCOF[0]), z, _SINCOF[1])
    ys = _fma32(ys, z, _SINCOF[2])
    ys = z * ys
    ys = _fma32(ys, x, x)

    # Select in the header's order: the sign of zero depends on it.
    zero = _F32(0.0)
    ysin2 = np.where(poly_mask, ys, zero)
    ysin1 = np.where(poly_mask, zero, yc)
    ys = ys - ysin2
    yc = yc - ysin1
    sin = _xor_sign(ysin1 + ysin2, sign_bit_sin)
    cos = _xor_sign(yc + ys, sign_bit_cos)
    return sin, cos


def _box_muller_blocks(uniforms):
    """torch's ``NormalFill16`` on rows of 16 float32 uniforms; returns normals of the same shape."""
    u1 = _ONE - uniforms[:, :8]
    u2 = uniforms[:, 8:]
    radius = np.sqrt(_MINUS_TWO * _log_ps(np.ascontiguousarray(u1)))
    theta = _TWO_PI * u2
    sin, cos = _sincos_ps(np.ascontiguousarray(theta))
    out = np.empty_like(uniforms)
    # fma(n, std=1, mean=0) is n + 0, which turns -0 into +0.
    out[:, :8] = radius * cos + _F32(0.0)
    out[:, 8:] = radius * sin + _F32(0.0)
    return out


def _mt19937_key(seed32):
    """mt19937 ``init_genrand``: the 624-word state for a 32-bit seed."""
    key = [seed32]
    for i in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return np.array(key, dtype=_U32)


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


class TorchGenerator:
    """The stream of ``torch.Generator("cpu").manual_seed(seed)``: ``randn`` matches torch's CPU
    ``torch.randn(shape, generator=g, dtype=dtype)`` bit for bit, call after call."""

    kind = "torch"

    def __init__(self, seed):
        self.seed = _check_seed(seed)
        self._engine = np.random.MT19937()
        self._engine.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt19937_key(self.seed & 0xFFFFFFFF), "pos": 624},
        }
        # The second normal of the last scalar Box-Muller pair (torch's next_double_normal_sample).
        self._cached_normal = None

    def _words(self, count):
        return self._engine.random_raw(count)

    def _uniforms32(self, count):
        return (self._words(count) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _scalar_normal(self):
        """``at::normal_distribution<double>`` with mean 0 and std 1: one double normal."""
        if self._cached_normal is not None:
            normal, self._cached_normal = self._cached_normal, None
            return normal * 1.0 + 0.0
        first, second, third, fourth = (int(w) for w in self._words(4))
        u1 = (((first << 32) | second) & (2**53 - 1)) * 2.0**-53
        u2 = (((third << 32) | fourth) & (2**53 - 1)) * 2.0**-53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta) * 1.0 + 0.0

    def randn(self, shape, dtype=np.float32):
        """Standard normals of ``shape``; float32, or float16 with torch's half rule."""
        shape = _check_shape(shape)
        dtype = np.dtype(dtype) if dtype in (np.float32, np.float16, "float32", "float16") else None
        if dtype is None:
            raise InvalidInputError("TorchGenerator.randn supports dtype float32 or float16 only")
        size = math.prod(shape)
        if size < _FILL_MIN_SIZE:
            # Double normals are rounded to float32 first (and from there to half for float16).
            values = np.array([self._scalar_normal() for _ in range(size)], dtype=_F64)
            return values.astype(_F32).astype(dtype).reshape(shape)

        full_blocks, remainder = divmod(size, 16)
        if dtype == np.float32:
            # All uniforms are drawn first, then the tail block of 16 more overwrites the last 16.
            uniforms = self._uniforms32(size + (16 if remainder else 0))
            blocks = uniforms[: full_blocks * 16]
            tail = uniforms[size:]
        else:
            # Half draws 16 uniforms per block, so the tail block starts right after the full ones.
            blocks = self._uniforms32(full_blocks * 16 + (16 if remainder else 0))
            tail = blocks[full_blocks * 16 :]
            blocks = blocks[: full_blocks * 16]
        rows = np.concatenate([blocks, tail]).reshape(-1, 16)
        normals = _box_muller_blocks(rows).reshape(-1)
        out = np.empty(size, dtype=_F32)
        out[: full_blocks * 16] = normals[: full_blocks * 16]
        if remainder:
            out[size - 16 :] = normals[full_blocks * 16 :]
        return out.astype(dtype, copy=False).reshape(shape)


class NumpyGenerator:
    """NumPy's ``Generator(PCG64(seed)).standard_normal``: fast, not torch's numbers."""

    kind = "numpy"

    def __init__(self, seed):
        self.seed = _check_seed(seed)
        # PCG64 wants a non-negative seed; negative ones wrap modulo 2**64 as torch's do.
        self._generator = np.random.Generator(np.random.PCG64(self.seed % 2**64))

    def randn(self, shape, dtype=np.float32):
        """Standard normals of ``shape`` in float32, float64 or float16 (drawn as float32)."""
        shape = _check_shape(shape)
        if dtype in (np.float32, np.float64, "float32", "float64"):
            return self._generator.standard_normal(shape, dtype=dtype)
        if dtype in (np.float16, "float16"):
            return self._generator.standard_normal(shape, dtype=_F32).astype(np.float16)
        raise InvalidInputError("NumpyGenerator.randn supports dtype float32, float64 or float16 only")


class PerImageGenerator:
    """One generator per image of a batch, as diffusers' list of generators: ``randn`` of a batch of N draws
    each image's rows from its own generator (shape (1, ...) each), so image k of a batch made with seeds
    [s0, s1, ...] has the noise of a run of one image with seed s_k."""

    def __init__(self, generators):
        self.generators = tuple(generators)
        self.kind = getattr(self.generators[0], "kind", None)
        self.seeds = [getattr(g, "seed", None) for g in self.generators]
        self.seed = self.seeds[0]

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, dtype=np.float32):
        shape = _check_shape(shape)
        if not shape or shape[0] != len(self.generators):
            raise InvalidInputError(f"a generator per image draws batches of {len(self.generators)} (one per "
                                    f"generator), got shape {shape}")
        return np.concatenate([g.randn((1, *shape[1:]), dtype) for g in self.generators])


def make_generator(seed, kind="torch"):
    """A generator of ``kind`` ("torch" or "numpy"); ``seed=None`` draws a random seed, kept as
    ``.seed`` so the result can be reproduced. A list of seeds gives a PerImageGenerator (one per image)."""
    if isinstance(seed, (list, tuple)):
        return PerImageGenerator([make_generator(s, kind) for s in seed])
    if kind not in GENERATOR_KINDS:
        raise InvalidInputError(f"generator kind must be one of {', '.join(map(repr, GENERATOR_KINDS))}; got {kind!r}")
    if seed is None:
        seed = _random_seed()
    if kind == "torch":
        return TorchGenerator(seed)
    return NumpyGenerator(seed)
