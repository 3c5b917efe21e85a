"""The sync step's arithmetic: a gradient given as pieces averages exactly as one array."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradfleet.nn.reduce import GradientSum

SIZE = 200_003  # several blocks of the fused mean, and a ragged tail


def gradients(count: int, dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [(rng.standard_normal(SIZE) * 10.0**w).astype(dtype) for w in range(count)]


def as_pieces(grad: np.ndarray, cuts: list[int]) -> list[tuple[slice, np.ndarray]]:
    """`grad` cut at `cuts`, the pieces in reverse order (chunks arrive in any order)."""
    bounds = [0, *cuts, SIZE]
    return [(slice(a, b), grad[a:b].copy()) for a, b in itertools.pairwise(bounds)][::-1]


def mean_of(grads: list[np.ndarray], last: object) -> np.ndarray:
    total = GradientSum(SIZE, grads[0].dtype)
    for grad in grads[:-1]:
        total.add(grad)
    result = total.mean(last)  # type: ignore[arg-type]
    assert result is not None
    return result.copy()


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_last_gradient_in_pieces_gives_the_mean_bit_for_bit(count: int, dtype: str) -> None:
    grads = gradients(count, dtype)
    whole = mean_of(grads, grads[-1])
    in_pieces = mean_of(grads, as_pieces(grads[-1], [1, 65_536, 70_000, 131_072]))
    reference = grads[0].copy()
    for grad in grads[1:]:
        reference += grad
    reference /= count

    assert in_pieces.tobytes() == whole.tobytes() == reference.tobytes()


def test_gradients_added_in_pieces_sum_as_arrays() -> None:
    grads = gradients(3, "float32")
    by_arrays, by_pieces = GradientSum(SIZE, "float32"), GradientSum(SIZE, "float32")
    for grad in grads:
        by_arrays.add(grad)
        by_pieces.add_parts(as_pieces(grad, [99_999]))

    assert by_pieces.total.tobytes() == by_arrays.total.tobytes()
    assert by_pieces.count == by_arrays.count == 3


def test_an_overflowing_sum_in_pieces_is_reported() -> None:
    big = np.full(SIZE, np.finfo(np.float32).max, dtype=np.float32)
    total = GradientSum(SIZE, "float32")
    total.add(big)

    assert total.mean(as_pieces(big, [SIZE // 2])) is None


@pytest.mark.parametrize("where", [0, 65_535, 65_536, SIZE - 1])
def test_an_overflow_while_adding_is_reported_by_the_mean(where: int) -> None:
    big = np.zeros(SIZE, np.float32)
    big[where] = np.finfo(np.float32).max
    total = GradientSum(SIZE, "float32")
    total.add(big)
    total.add(as_pieces(big, [SIZE // 3]))  # one element overflows here

    assert total.mean(np.ones(SIZE, np.float32)) is None


def test_sums_near_the_limit_are_not_overflows() -> None:
    near = np.full(SIZE, np.finfo(np.float32).max / 2, dtype=np.float32)
    total = GradientSum(SIZE, "float32")
    total.add(near)
    mean = total.mean(-near)

    assert mean is not None and not mean.any()


def test_a_cleared_sum_forgets_an_earlier_overflow() -> None:
    big = np.full(SIZE, np.finfo(np.float32).max, dtype=np.float32)
    total = GradientSum(SIZE, "float32")
    total.add(big)
    total.add(big)
    total.clear()
    total.add(np.ones(SIZE, np.float32))

    mean = total.mean(np.full(SIZE, 3, np.float32))
    assert mean is not None and (mean == 2).all()
