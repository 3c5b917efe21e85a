"""Finite-difference gradient checking: the oracle every derivative rule is tested against."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradfleet.nn.tensor import Tensor


class GradcheckError(ValueError):
    """Analytic and numeric gradients disagree; the message names the worst element."""


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Any],
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    seed: int = 0,
) -> bool:
    """Compare ``fn``'s backward pass with central differences, in float64.

    ``fn`` takes one Tensor per input and returns a Tensor. A non-scalar output is
    reduced with fixed random weights so every output element is checked. Returns True,
    or raises GradcheckError naming the input, the worst index and both values.
    """
    arrays = [np.array(x.data if isinstance(x, Tensor) else x, dtype=np.float64) for x in inputs]
    probe = fn(*[Tensor(a) for a in arrays])
    weights = np.random.default_rng(seed).standard_normal(probe.shape)

    def objective(values: list[np.ndarray]) -> float:
        out = fn(*[Tensor(v) for v in values])
        return float(np.sum(out.data * weights))

    leaves = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = fn(*leaves)
    out.backward(weights)
    for position, (array, leaf) in enumerate(zip(arrays, leaves, strict=True)):
        analytic = leaf.grad if leaf.grad is not None else np.zeros_like(array)
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            original = array[index]
            array[index] = original + eps
            plus = objective(arrays)
            array[index] = original - eps
            minus = objective(arrays)
            array[index] = original
            numeric[index] = (plus - minus) / (2 * eps)
        error = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
        if array.size and error.max() > 0:
            worst = np.unravel_index(int(np.argmax(error)), array.shape)
            raise GradcheckError(
                f"gradient of input {position} at index {tuple(int(i) for i in worst)}: "
                f"analytic {analytic[worst]:.10g}, numeric {numeric[worst]:.10g} "
                f"(tolerance atol={atol}, rtol={rtol})"
            )
    return True
