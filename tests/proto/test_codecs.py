"""Gradient codecs: what each payload decodes to, error feedback, and malformed payloads.

The rounding references below are written independently of the codecs' bit tricks: a
value is scaled by a power of two so that its last kept bit is the units digit, rounded
by Python's `round` (ties to even), and scaled back, all exact in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from gradfleet.nn.reduce import GradientSum
from gradfleet.proto.codecs import Codec, Residual
from gradfleet.proto.errors import InvalidArgument, Reason

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
BF16_MAX = (2 - 2**-7) * 2.0**127  # 0x7F7F
FP16_MAX = 65504.0
LOSSY = ["bf16", "fp16", "sign", "topk:0.05", "topk:0.3"]
CODECS = ["none", *LOSSY, "topk:1"]

# values where rounding to 16 bits has an edge: ties, saturation, subnormals, signed zero
EDGES = [
    0.0,
    1 + 2**-8,  # a bf16 tie: to 1
    1 + 3 * 2**-8,  # a bf16 tie: to 1 + 2**-6
    1 + 2**-11,  # an fp16 tie: to 1
    2049.0,  # an fp16 tie: to 2048
    2051.0,  # an fp16 tie: to 2052
    FP16_MAX,
    65512.0,  # rounds to 65504
    65519.99609375,  # the largest float32 below 65520, rounds to 65504
    65520.0,  # rounds to Inf in IEEE fp16: sent as 65504
    65536.0,
    1e5,
    2.0**-24,  # fp16's smallest subnormal
    2.0**-25,  # an fp16 tie: to 0
    3 * 2.0**-25,  # an fp16 tie: to 2**-23
    2.0**-14,  # fp16's smallest normal
    BF16_MAX,
    3.39e38,  # past bf16's largest value, short of its overflow threshold
    (2 - 2**-8) * 2.0**127,  # bf16's overflow threshold: a tie that IEEE sends to Inf
    float(np.finfo(np.float32).max),
    2.0**-133,  # bf16's smallest subnormal
    2.0**-134,  # a bf16 tie: to 0
    3 * 2.0**-134,  # a bf16 tie: to 2**-132
    2.0**-126,  # float32's (and bf16's) smallest normal
    2.0**-149,  # float32's smallest subnormal
    1e39,  # past float32: bf16 through float32 saturates
    1e300,
    float(np.finfo(np.float64).max),
    5e-324,  # float64's smallest subnormal
]


def edges(dtype: np.dtype, limit: float = math.inf) -> list[float]:
    """EDGES (and their negatives) that `dtype` holds exactly and that are within `limit`."""
    out = []
    for value in EDGES:
        for signed in (value, -value):
            with np.errstate(over="ignore", under="ignore"):
                held = float(dtype.type(signed))
            if held == signed and math.isfinite(held) and abs(held) <= limit:
                out.append(held)
    return out


def values(dtype: np.dtype, limit: float | None = None) -> st.SearchStrategy[float]:
    """Finite values of `dtype` (subnormals included), within ±limit, and the edge cases."""
    width = 8 * dtype.itemsize
    floats = st.floats(
        min_value=None if limit is None else -limit,
        max_value=limit,
        allow_nan=False,
        allow_infinity=False,
        width=width,
    )
    return st.one_of(floats, st.sampled_from(edges(dtype, limit or math.inf)))


@st.composite
def gradients(draw: st.DrawFn, dtype: np.dtype, limit: float | None = None) -> np.ndarray:
    """A flat gradient: an array of any small shape, flattened as a push flattens it."""
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    return draw(arrays(dtype, shape, elements=values(dtype, limit))).reshape(-1)


DTYPES = st.sampled_from([F32, F64])
# magnitudes whose sums and means stay finite in each dtype (float32 holds the bound exactly)
BOUNDED = {F32: float(np.float32(1e30)), F64: 1e300}


def round_to(x: float, precision: int, min_exponent: int, largest: float) -> float:
    """x rounded to nearest even in a binary format with `precision` significand bits and
    normal numbers from 2**min_exponent on; past `largest` it saturates (never Inf)."""
    if abs(x) >= 2 * largest:  # rounds past `largest` (and Inf would not scale)
        return math.copysign(largest, x)
    if x == 0:
        return x
    _, exponent = math.frexp(x)  # 2**(exponent - 1) <= |x| < 2**exponent
    quantum = max(exponent - precision, min_exponent - precision + 1)  # subnormals: fixed
    rounded = math.ldexp(round(math.ldexp(x, -quantum)), quantum)
    if abs(rounded) > largest:
        rounded = largest
    return math.copysign(rounded, x)  # a value rounded to zero keeps its sign


def bf16_reference(grad: np.ndarray) -> np.ndarray:
    """bfloat16 of each value's float32 (float64 goes through float32, as documented)."""
    with np.errstate(over="ignore"):
        as32 = grad.astype(np.float32).astype(np.float64)
    out = [round_to(float(x), 8, -126, BF16_MAX) for x in as32]
    return np.asarray(out, np.float64).astype(grad.dtype)


def fp16_reference(grad: np.ndarray) -> np.ndarray:
    out = [round_to(float(x), 11, -14, FP16_MAX) for x in grad]
    return np.asarray(out, np.float64).astype(grad.dtype)


def round_trip(codec: Codec, grad: np.ndarray) -> np.ndarray:
    """decode(encode(grad)), after checking the payload's size and that check() takes it."""
    payload = codec.encode(grad)
    assert payload.dtype == np.uint8
    assert payload.size == codec.payload_bytes(grad.size, grad.dtype)
    codec.check(payload, grad.size, grad.dtype)
    decoded = codec.decode(payload, grad.size, grad.dtype)
    assert decoded.dtype == grad.dtype and decoded.shape == grad.shape
    return decoded


def topk_indices(codec: Codec, payload: np.ndarray, size: int) -> np.ndarray:
    k = min(size, max(1, math.ceil(codec.fraction * size)))
    return payload[: 8 * k].view("<i8")


# decode(encode(g)) for each codec


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=DTYPES)
def test_none_is_exact(data: st.DataObject, dtype: np.dtype) -> None:
    grad = data.draw(gradients(dtype))

    decoded = round_trip(Codec.parse("none"), grad)

    assert decoded.tobytes() == grad.tobytes()


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=DTYPES)
def test_bf16_rounds_float32_to_nearest_even_and_never_to_inf(
    data: st.DataObject, dtype: np.dtype
) -> None:
    grad = data.draw(gradients(dtype))

    decoded = round_trip(Codec.parse("bf16"), grad)

    assert decoded.tobytes() == bf16_reference(grad).tobytes()
    assert np.isfinite(decoded).all()


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=DTYPES)
def test_fp16_rounds_as_numpy_does_and_sends_its_largest_value_past_it(
    data: st.DataObject, dtype: np.dtype
) -> None:
    grad = data.draw(gradients(dtype))

    decoded = round_trip(Codec.parse("fp16"), grad)

    with np.errstate(over="ignore"):
        numpy16 = grad.astype(np.float16).astype(dtype)
    numpy16[np.isinf(numpy16)] = np.copysign(FP16_MAX, numpy16[np.isinf(numpy16)])
    assert decoded.tobytes() == numpy16.tobytes()
    assert decoded.tobytes() == fp16_reference(grad).tobytes()


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    dtype=DTYPES,
    fraction=st.one_of(st.floats(1e-6, 1.0), st.sampled_from([0.05, 0.5, 1.0])),
)
def test_topk_keeps_k_largest_magnitudes_and_zeros_elsewhere(
    data: st.DataObject, dtype: np.dtype, fraction: float
) -> None:
    grad = data.draw(gradients(dtype))
    codec = Codec.parse(f"topk:{fraction!r}")
    k = min(grad.size, max(1, math.ceil(codec.fraction * grad.size)))

    decoded = round_trip(codec, grad)

    kept = topk_indices(codec, codec.encode(grad), grad.size)
    rest = np.setdiff1d(np.arange(grad.size), kept)
    assert kept.size == k == np.unique(kept).size
    assert decoded[kept].tobytes() == grad[kept].tobytes()
    assert not decoded[rest].any()
    if rest.size:  # ties at the boundary may go either way
        assert np.abs(grad[kept]).min() >= np.abs(grad[rest]).max()


@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=DTYPES)
def test_sign_sends_each_value_as_plus_or_minus_the_mean_magnitude(
    data: st.DataObject, dtype: np.dtype
) -> None:
    # bounded so that the sum of up to 1728 magnitudes stays finite in the dtype (see
    # test_sign_scale_of_huge_finite_values_is_finite for what happens past that)
    grad = data.draw(gradients(dtype, limit=BOUNDED[dtype]))

    decoded = round_trip(Codec.parse("sign"), grad)

    scale = abs(float(decoded[0]))
    exact_mean = math.fsum(abs(float(x)) for x in grad) / grad.size
    # numpy sums pairwise in the dtype: relative error at most ~(128 + log2 n) units in
    # the last place, under 2e-5 for float32 and 4e-14 for float64 at these sizes; a mean
    # in the subnormal range is rounded to a multiple of the smallest subnormal
    tiny = float(np.finfo(dtype).smallest_subnormal)
    assert scale == pytest.approx(exact_mean, rel=2e-5 if dtype == F32 else 4e-14, abs=tiny)
    expected = np.where(grad < 0, -scale, scale).astype(dtype)
    assert decoded.tobytes() == expected.tobytes()


def test_sign_scale_of_huge_finite_values_is_finite() -> None:
    # the mean magnitude of finite values is a finite value of the same dtype
    grad = np.array([3e38, 3e38, -1.0], np.float32)
    codec = Codec.parse("sign")

    payload = codec.encode(grad)

    assert np.isfinite(codec.decode(payload, grad.size, F32)).all()
    codec.check(payload, grad.size, F32)  # what a worker encodes, the server takes


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", ["bf16", "fp16", "sign"])
def test_payloads_over_several_decode_blocks(name: str, dtype: np.dtype) -> None:
    # 64k elements are decoded at once: two full blocks and a ragged third
    grad = np.random.default_rng(5).standard_normal(2 * 65536 + 13).astype(dtype) * 1e3
    codec = Codec.parse(name)

    decoded = round_trip(codec, grad)

    if name == "sign":
        scale = abs(decoded[0])
        expected = np.where(grad < 0, -scale, scale).astype(dtype)
    else:  # elementwise: each piece on its own decodes to the same values
        expected = np.concatenate([round_trip(codec, piece) for piece in np.array_split(grad, 13)])
    assert decoded.tobytes() == expected.tobytes()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), dtype=DTYPES)
def test_topk_of_everything_is_none(data: st.DataObject, dtype: np.dtype) -> None:
    grad = data.draw(gradients(dtype))

    everything = round_trip(Codec.parse("topk:1"), grad)

    assert everything.tobytes() == round_trip(Codec.parse("none"), grad).tobytes()
    assert Codec.parse("topk:1").lossless


# error feedback


@settings(max_examples=120, deadline=None)
@given(
    name=st.sampled_from(CODECS),
    dtype=DTYPES,
    steps=st.integers(1, 40),
    size=st.integers(1, 40),
    data=st.data(),
)
def test_error_feedback_loses_nothing_over_many_steps(
    name: str, dtype: np.dtype, steps: int, size: int, data: st.DataObject
) -> None:
    grads = data.draw(arrays(dtype, (steps, size), elements=values(dtype, limit=1e6)))
    codec = Codec.parse(name)
    residual = Residual(codec, size, dtype)
    unit = float(np.finfo(dtype).eps) / 2  # the unit roundoff of one add or subtract
    sent = np.zeros((steps, size))
    bound = np.zeros(size)

    for step, grad in enumerate(grads):
        before = np.abs(residual.values.astype(np.float64))
        payload = residual.encode(grad, step)
        sent[step] = codec.decode(payload, size, dtype)
        # corrected = fl(residual + grad) errs by at most unit·(|residual| + |grad|), and
        # residual' = fl(corrected - sent) by at most unit·|residual'|; these errors are all
        # that separates sum(sent) + residual from sum(grads)
        bound += unit * (before + np.abs(grad) + np.abs(residual.values))

    final = residual.values.astype(np.float64)
    for j in range(size):  # fsum: the exact sum, rounded once
        error = math.fsum([*sent[:, j], final[j], *(-grads[:, j].astype(np.float64))])
        assert abs(error) <= 1.001 * bound[j], (j, error, bound[j])


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_encoding_a_step_again_returns_its_payload_and_changes_nothing(
    name: str, dtype: np.dtype
) -> None:
    rng = np.random.default_rng(2)
    g0, g1, g2 = (rng.standard_normal(300).astype(dtype) for _ in range(3))
    codec = Codec.parse(name)
    retried, straight = Residual(codec, 300, dtype), Residual(codec, 300, dtype)
    retried.encode(g0, step=0)
    first = retried.encode(g1, step=1).copy()
    kept = retried.values.copy()

    again = retried.encode(g1, step=1)
    changed = retried.encode(g2, step=1)  # a retry of step 1 sends step 1's payload
    values_after_retries = retried.values.copy()
    next_step = retried.encode(g2, step=2)

    assert again.tobytes() == first.tobytes() == changed.tobytes()
    assert values_after_retries.tobytes() == kept.tobytes()
    straight.encode(g0, step=0)
    straight.encode(g1, step=1)
    assert next_step.tobytes() == straight.encode(g2, step=2).tobytes()
    assert retried.values.tobytes() == straight.values.tobytes()


def test_topk_of_everything_through_error_feedback_sends_the_gradient() -> None:
    grad = np.random.default_rng(3).standard_normal(50)
    residual = Residual(Codec.parse("topk:1"), 50, F64)

    sent = [Codec.parse("topk:1").decode(residual.encode(grad, s), 50, F64) for s in range(3)]

    assert all(s.tobytes() == grad.tobytes() for s in sent)
    assert not residual.values.any()


# parsing


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (None, "none"),
        ("", "none"),
        ("none", "none"),
        (" BF16 ", "bf16"),
        ("fp16", "fp16"),
        ("sign", "sign"),
        ("topk:0.05", "topk:0.05"),
        ("TopK:0.5", "topk:0.5"),
        ("topk:1", "topk:1"),
        ("topk:1e-3", "topk:0.001"),
    ],
)
def test_parse_gives_a_canonical_name_that_parses_back(text: str | None, name: str) -> None:
    codec = Codec.parse(text)

    assert str(codec) == name
    assert Codec.parse(str(codec)) == codec


@pytest.mark.parametrize(
    "text",
    ["gzip", "topk:0", "topk:1.5", "topk:abc", "topk:", "topk:-0.1", "topk:nan", "bf16:2", "fp8"],
)
def test_parse_refuses_unknown_codecs_in_one_line(text: str) -> None:
    with pytest.raises(ValueError) as err:
        Codec.parse(text)

    message = str(err.value)
    assert "\n" not in message
    assert repr(text) in message
    assert "topk" in message  # names what would be accepted


# check(): malformed payloads refused before anything is used

SIZE = 20


def payload_of(name: str, dtype: np.dtype = F64) -> np.ndarray:
    """A valid payload of a 20-element gradient (topk:0.25 keeps 5), as a writable copy."""
    grad = np.random.default_rng(4).standard_normal(SIZE).astype(dtype)
    return Codec.parse(name).encode(grad).copy()


def with_halves(name: str, bits: int) -> np.ndarray:
    payload = payload_of(name)
    payload.view("<u2")[7] = bits
    return payload


def with_scale(value: float) -> np.ndarray:
    payload = payload_of("sign")
    payload[:8].view("<f8")[0] = value
    return payload


def with_indices(change: dict[int, int]) -> np.ndarray:
    payload = payload_of("topk:0.25")
    indices = payload[:40].view("<i8")
    indices[:] = [2, 5, 9, 13, 17]
    for place, index in change.items():
        indices[place] = index
    return payload


def with_topk_value(value: float) -> np.ndarray:
    payload = payload_of("topk:0.25")
    payload[40:].view("<f8")[2] = value
    return payload


def with_value(value: float) -> np.ndarray:
    payload = payload_of("none")
    payload.view("<f8")[3] = value
    return payload


BAD = Reason.BAD_BYTES
NON_FINITE = Reason.NON_FINITE
CHECK_CASES = [
    *[(f"{n} one byte short", n, payload_of(n)[:-1], BAD) for n in ["none", *LOSSY]],
    *[(f"{n} one byte long", n, np.append(payload_of(n), 0), BAD) for n in ["none", *LOSSY]],
    ("fp16 with float32's byte count", "fp16", payload_of("none", F32), BAD),
    ("bf16 +Inf", "bf16", with_halves("bf16", 0x7F80), NON_FINITE),
    ("bf16 -Inf", "bf16", with_halves("bf16", 0xFF80), NON_FINITE),
    ("bf16 NaN", "bf16", with_halves("bf16", 0x7FC0), NON_FINITE),
    ("bf16 negative NaN", "bf16", with_halves("bf16", 0xFFFF), NON_FINITE),
    ("fp16 +Inf", "fp16", with_halves("fp16", 0x7C00), NON_FINITE),
    ("fp16 -Inf", "fp16", with_halves("fp16", 0xFC00), NON_FINITE),
    ("fp16 NaN", "fp16", with_halves("fp16", 0x7E00), NON_FINITE),
    ("fp16 signalling NaN", "fp16", with_halves("fp16", 0x7C01), NON_FINITE),
    ("sign NaN scale", "sign", with_scale(math.nan), NON_FINITE),
    ("sign Inf scale", "sign", with_scale(math.inf), NON_FINITE),
    ("sign negative scale", "sign", with_scale(-1.0), NON_FINITE),
    ("topk negative index", "topk:0.25", with_indices({0: -1}), BAD),
    ("topk index = size", "topk:0.25", with_indices({4: SIZE}), BAD),
    ("topk index far out", "topk:0.25", with_indices({4: 2**62}), BAD),
    ("topk repeated index", "topk:0.25", with_indices({2: 5}), BAD),
    ("topk decreasing", "topk:0.25", with_indices({1: 9, 2: 5}), BAD),
    ("topk first past the last", "topk:0.25", with_indices({0: 18}), BAD),
    # increasing only if the difference wraps around in int64
    ("topk wrapping indices", "topk:0.25", with_indices({3: 2**63 - 1, 4: -(2**63)}), BAD),
    ("topk NaN value", "topk:0.25", with_topk_value(math.nan), NON_FINITE),
    ("topk Inf value", "topk:0.25", with_topk_value(-math.inf), NON_FINITE),
    ("none NaN", "none", with_value(math.nan), NON_FINITE),
]


@pytest.mark.parametrize(
    ("name", "payload", "reason"), [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES]
)
def test_check_refuses_a_malformed_payload_with_its_reason(
    name: str, payload: np.ndarray, reason: Reason
) -> None:
    codec = Codec.parse(name)

    with pytest.raises(InvalidArgument) as err:
        codec.check(payload, SIZE, F64)

    assert err.value.reason is reason
    assert err.value.message.endswith(".") and "\n" not in err.value.message


# the server's sum of a payload


def canonical_zero(values: np.ndarray) -> bytes:
    """The bytes with -0.0 read as 0.0 (x + 0.0 changes no other value);
    test_add_parts_keeps_the_sign_of_zero_as_add_does pins the zeros."""
    return (values + 0.0).tobytes()


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(CODECS),
    dtype=DTYPES,
    count=st.integers(1, 4),
    size=st.integers(1, 60),
    data=st.data(),
)
def test_add_parts_equals_add_of_the_decoded_gradient(
    name: str, dtype: np.dtype, count: int, size: int, data: st.DataObject
) -> None:
    grads = data.draw(arrays(dtype, (count, size), elements=values(dtype, BOUNDED[dtype])))
    codec = Codec.parse(name)
    by_parts, by_arrays = GradientSum(size, dtype), GradientSum(size, dtype)

    for grad in grads:
        payload = codec.encode(grad)
        by_parts.add_parts(codec.parts(payload, size, dtype), codec.dense)
        by_arrays.add(codec.decode(payload, size, dtype))
        assert canonical_zero(by_parts.total) == canonical_zero(by_arrays.total)

    parts_mean, arrays_mean = by_parts.mean(), by_arrays.mean()
    assert parts_mean is not None and arrays_mean is not None
    assert canonical_zero(parts_mean) == canonical_zero(arrays_mean)


@pytest.mark.parametrize("name", ["none", "bf16", "fp16", "sign"])
def test_add_parts_over_several_blocks_equals_add(name: str) -> None:
    rng = np.random.default_rng(6)
    size = 2 * 65536 + 7
    codec = Codec.parse(name)
    by_parts, by_arrays = GradientSum(size, F32), GradientSum(size, F32)

    for _ in range(3):
        payload = codec.encode(rng.standard_normal(size).astype(np.float32))
        by_parts.add_parts(codec.parts(payload, size, F32), codec.dense)
        by_arrays.add(codec.decode(payload, size, F32))

    assert by_parts.total.tobytes() == by_arrays.total.tobytes()


def test_add_parts_equals_add_up_to_the_sign_of_zero() -> None:
    # a sum that is -0.0 where the next topk payload has no index: add adds the decoded
    # array's +0.0 there (-0.0 + 0.0 is 0.0), add_parts leaves the element alone
    codec = Codec.parse("topk:0.5")
    first = codec.encode(np.array([-0.0, -0.0]))
    (chosen,) = topk_indices(codec, first, 2)
    other = 1 - chosen
    second_grad = np.zeros(2)
    second_grad[other] = 1.0
    second = codec.encode(second_grad)
    by_parts, by_arrays = GradientSum(2, F64), GradientSum(2, F64)

    for payload in (first, second):
        by_parts.add_parts(codec.parts(payload, 2, F64), codec.dense)
        by_arrays.add(codec.decode(payload, 2, F64))

    assert np.array_equal(by_parts.total, by_arrays.total)  # -0.0 == 0.0
    assert np.signbit(by_parts.total[chosen]) and not np.signbit(by_arrays.total[chosen])
