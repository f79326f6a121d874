"""sdrt.runtime.rng: TorchGenerator against torch's CPU randn bit for bit, NumpyGenerator, errors."""

import ast
import pathlib
from fractions import Fraction

import numpy as np
import pytest

from sdrt.runtime import rng
from sdrt.runtime.errors import InvalidInputError
from sdrt.runtime.rng import NumpyGenerator, TorchGenerator, make_generator

SEEDS = [0, 1, 42, 2**32 + 5, -1, 2**63 - 1, 2**64 - 1, -(2**63), 0xDEADBEEFCAFEBABE, 1234567890123]
LARGE_SHAPES = [(16 * 1024 + 7,), (1, 4, 64, 64), (2, 4, 96, 128), (1, 4, 8, 8), (3,), ()]


def _torch():
    return pytest.importorskip("torch")


def _bits(array):
    array = np.ascontiguousarray(array).reshape(-1)
    return array.view({4: np.uint32, 2: np.uint16}[array.dtype.itemsize])


def _assert_bit_equal(mine, reference):
    assert mine.shape == reference.shape
    assert mine.dtype == reference.dtype
    mismatched = np.flatnonzero(_bits(mine) != _bits(reference))
    assert mismatched.size == 0, f"{mismatched.size} of {mine.size} differ, first at {mismatched[:5]}"


def _torch_generator(seed):
    return _torch().Generator("cpu").manual_seed(seed)


def _torch_randn(generator, shape, dtype=np.float32):
    torch = _torch()
    torch_dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]
    return torch.randn(shape, generator=generator, dtype=torch_dtype).numpy()


# --- TorchGenerator against torch ------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_every_size_1_to_40_matches_torch(seed):
    for size in range(1, 41):
        _assert_bit_equal(TorchGenerator(seed).randn((size,)), _torch_randn(_torch_generator(seed), (size,)))


@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 + 5, -1, 2**64 - 1])
def test_shapes_match_torch(seed, shape):
    _assert_bit_equal(TorchGenerator(seed).randn(shape), _torch_randn(_torch_generator(seed), shape))


def test_int_shape_is_one_dimensional():
    _assert_bit_equal(TorchGenerator(3).randn(20), _torch_randn(_torch_generator(3), (20,)))


@pytest.mark.parametrize("seed", [0, 42, -1, 2**32 + 5])
def test_mixed_call_sequence_continues_like_torch(seed):
    # Small calls use (and leave) the cached scalar normal; the 16+ path draws around it.
    shapes = [(5,), (100,), (3,), (1, 4, 8, 8), (1,), (17,), (), (15,), (16,), (2, 3), (33,), (1,)]
    mine, reference = TorchGenerator(seed), _torch_generator(seed)
    for shape in shapes:
        _assert_bit_equal(mine.randn(shape), _torch_randn(reference, shape))


def test_random_call_sequences_match_torch():
    choices = np.random.default_rng(0)
    for _ in range(40):
        seed = int(choices.integers(-(2**63), 2**63))
        mine, reference = TorchGenerator(seed), _torch_generator(seed)
        for _ in range(6):
            shape = tuple(int(d) for d in choices.integers(1, 7, size=choices.integers(0, 4)))
            dtype = (np.float32, np.float16)[int(choices.integers(2))]
            _assert_bit_equal(mine.randn(shape, dtype=dtype), _torch_randn(reference, shape, dtype))


@pytest.mark.parametrize("seed", [0, 42, -1])
def test_float16_follows_torch_half_rule(seed):
    for shape in [(size,) for size in range(1, 41)] + [(16 * 1024 + 7,), (1, 4, 64, 64), ()]:
        mine = TorchGenerator(seed).randn(shape, dtype=np.float16)
        _assert_bit_equal(mine, _torch_randn(_torch_generator(seed), shape, np.float16))


def test_float16_differs_from_float32_cast_in_the_tail():
    # Half draws 16 uniforms per block, so its tail block reads other uniforms than float32's.
    half = TorchGenerator(0).randn((40,), dtype=np.float16)
    single = TorchGenerator(0).randn((40,)).astype(np.float16)
    assert np.array_equal(half[:24], single[:24])
    assert not np.array_equal(half[24:], single[24:])


def test_seed_uses_low_32_bits_and_wraps_negatives():
    assert np.array_equal(TorchGenerator(5).randn(64), TorchGenerator(2**32 + 5).randn(64))
    assert np.array_equal(TorchGenerator(-1).randn(64), TorchGenerator(2**64 - 1).randn(64))


def test_empty_shape_draws_nothing():
    generator = TorchGenerator(9)
    assert generator.randn((0, 4)).shape == (0, 4)
    _assert_bit_equal(generator.randn((20,)), _torch_randn(_torch_generator(9), (20,)))


def test_returns_fresh_arrays():
    generator = TorchGenerator(1)
    first = generator.randn((1, 4, 8, 8))
    first_copy = first.copy()
    generator.randn((1, 4, 8, 8))
    assert np.array_equal(first, first_copy)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, "bfloat16"])
def test_torch_generator_rejects_other_dtypes(dtype):
    with pytest.raises(InvalidInputError, match="float32 or float16"):
        TorchGenerator(0).randn((4,), dtype=dtype)


def test_rng_module_never_imports_torch():
    tree = ast.parse(pathlib.Path(rng.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"math", "numpy", "sdrt"}


# --- the float32 FMA emulation -----------------------------------------------------------------


def _reference_fma32(a, b, c):
    """Correctly rounded float32 a*b + c, from the exact rational value."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))
    neighbours = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    # Nearest, ties to the even significand.
    return min(neighbours, key=lambda v: (abs(Fraction(float(v)) - exact), int(_bits(np.float32(v))[0]) & 1))


def test_fma32_repairs_halfway_double_rounding():
    f32 = np.float32
    cases = [
        # a*b = 1 + 2**-36: the float64 sum 2**24 + 1 is a float32 tie; the true value is above it.
        (f32(1 + 2**-12), f32(1 - 2**-12 + 2**-24), f32(2**24), f32(2**24 + 2)),
        (f32(-(1 + 2**-12)), f32(1 - 2**-12 + 2**-24), f32(-(2**24)), f32(-(2**24 + 2))),
        # a*b = 1 - 2**-33: the float64 sum 2**24 + 3 is a tie; the true value is below it.
        (f32(1 - 2**-11), f32(1 + 2**-11 + 2**-22), f32(2**24 + 2), f32(2**24 + 2)),
    ]
    for a, b, c, expected in cases:
        naive = f32(np.float64(a) * np.float64(b) + np.float64(c))
        assert naive != expected  # the case really is one that double rounding gets wrong
        result = rng._fma32(np.array([a], dtype=f32), b, c)
        assert _bits(result)[0] == _bits(np.array([expected], dtype=f32))[0]
        assert _bits(result)[0] == _bits(np.array([_reference_fma32(a, b, c)], dtype=f32))[0]


def test_fma32_matches_exact_rounding_on_random_and_subnormal_inputs():
    choices = np.random.default_rng(1)
    a = choices.standard_normal(3000).astype(np.float32)
    b = choices.standard_normal(3000).astype(np.float32)
    # Cancelling, tiny and generic addends.
    c = np.concatenate([
        -(a[:1000] * b[:1000]) * np.float32(1 + 2**-20),
        choices.standard_normal(1000).astype(np.float32) * np.float32(2**-30),
        choices.standard_normal(1000).astype(np.float32),
    ]).astype(np.float32)
    a[-50:] *= np.float32(2**-70)
    b[-50:] *= np.float32(2**-70)
    c[-50:] *= np.float32(2**-140)
    result = rng._fma32(a, b, c)
    expected = np.array([_reference_fma32(x, y, z) for x, y, z in zip(a, b, c)], dtype=np.float32)
    assert np.array_equal(_bits(result), _bits(expected))


# --- NumpyGenerator ---------------------------------------------------------------------------


def test_numpy_generator_is_pcg64_standard_normal():
    expected = np.random.Generator(np.random.PCG64(42)).standard_normal((1, 4, 8, 8), dtype=np.float32)
    result = NumpyGenerator(42).randn((1, 4, 8, 8))
    assert result.dtype == np.float32 and result.shape == (1, 4, 8, 8)
    assert np.array_equal(result, expected)


def test_numpy_generator_is_deterministic_per_seed_and_continues():
    first, second = NumpyGenerator(7), NumpyGenerator(7)
    assert np.array_equal(first.randn((3, 5)), second.randn((3, 5)))
    assert np.array_equal(first.randn(10), second.randn(10))
    assert not np.array_equal(NumpyGenerator(7).randn(10), NumpyGenerator(8).randn(10))
    assert not np.array_equal(first.randn(10), NumpyGenerator(7).randn(10))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_numpy_generator_dtypes(dtype):
    result = NumpyGenerator(-3).randn((2, 3), dtype=dtype)
    assert result.dtype == dtype and result.shape == (2, 3)
    assert np.isfinite(result).all()


# --- make_generator and input errors ----------------------------------------------------------


@pytest.mark.parametrize("kind, cls", [("torch", TorchGenerator), ("numpy", NumpyGenerator)])
def test_make_generator_kinds(kind, cls):
    generator = make_generator(11, kind)
    assert isinstance(generator, cls)
    assert generator.kind == kind and generator.seed == 11
    assert np.array_equal(generator.randn(20), cls(11).randn(20))


def test_make_generator_defaults_to_torch():
    assert make_generator(0).kind == "torch"


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_random_seed_is_recorded_and_reproduces(kind):
    generator = make_generator(None, kind)
    assert isinstance(generator.seed, int) and 0 <= generator.seed < 2**63
    assert np.array_equal(generator.randn(32), make_generator(generator.seed, kind).randn(32))


def test_make_generator_rejects_unknown_kind():
    with pytest.raises(InvalidInputError, match="'torch', 'numpy'.*'cuda'"):
        make_generator(0, "cuda")


@pytest.mark.parametrize("seed", [1.5, "1", True, 2**64, -(2**63) - 1])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_bad_seeds_are_rejected(seed, kind):
    with pytest.raises(InvalidInputError, match="seed"):
        make_generator(seed, kind)


@pytest.mark.parametrize("cls", [TorchGenerator, NumpyGenerator])
@pytest.mark.parametrize("shape", [(2, -1), "abc", (1.5, 2)])
def test_bad_shapes_are_rejected(cls, shape):
    with pytest.raises(InvalidInputError, match="shape"):
        cls(0).randn(shape)


def test_numpy_generator_rejects_other_dtypes():
    with pytest.raises(InvalidInputError, match="dtype"):
        NumpyGenerator(0).randn((2,), dtype=np.int32)
