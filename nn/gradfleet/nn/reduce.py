"""The arithmetic of one synchronous step: gradients summed in a fixed order, then averaged.

Every backend runs this code (the parameter server, local mode, the tests' reference), so
"the same weights on every backend" is a property of one function, not a promise kept in
three places. The sum is taken in the model's dtype in the order gradients are added
(callers add them in increasing worker order); the mean divides it by the count.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 1 << 16  # elements per pass of the fused mean: the block stays in cache


class GradientSum:
    """An ordered sum of flat gradients in one reusable buffer; `mean()` averages it."""

    def __init__(self, size: int, dtype: np.dtype | str) -> None:
        self.total = np.empty(size, dtype)
        self.count = 0

    def add(self, grad: np.ndarray) -> None:
        """total += grad in place (the first gradient is copied in)."""
        if self.count == 0:
            np.copyto(self.total, grad)
        else:
            with np.errstate(over="ignore"):  # an overflow is reported by mean()
                np.add(self.total, grad, out=self.total)
        self.count += 1

    def add_parts(self, parts: list[tuple[slice | np.ndarray, np.ndarray]], dense: bool) -> None:
        """total += a gradient given as (place, values): blocks covering every element
        (`dense`), or values at distinct indices and zeros elsewhere (the sum `add` gives,
        except that an element left alone keeps the sign of a zero)."""
        first, self.count = self.count == 0, self.count + 1
        if first and not dense:
            self.total.fill(0)
        with np.errstate(over="ignore"):
            for place, values in parts:
                if first:
                    self.total[place] = values
                else:
                    self.total[place] += values

    def mean(self, last: np.ndarray | None = None) -> np.ndarray | None:
        """(total + last) / count, in place, block by block in one pass; None if the sum of
        finite gradients overflowed.

        Each element sees exactly `np.add` then `np.divide`, so blocking changes no bit; it
        only saves a second trip of the sum through memory. Dividing by a power of two is
        multiplying by its exact reciprocal: the same correctly rounded result, cheaper. One
        gradient is its own mean, bit for bit, and is returned as it is (unchecked).
        """
        count = self.count + (last is not None)
        if count == 1:
            return self.total if last is None else last
        size = self.total.size
        block = _BLOCK if size > 2 * _BLOCK else size
        scale: np.ufunc = np.divide
        factor = float(count)
        if count & (count - 1) == 0:
            scale, factor = np.multiply, 1.0 / count
        finite = True
        with np.errstate(over="ignore", invalid="ignore"):
            for lo in range(0, size, block):
                part = self.total[lo : lo + block]
                if last is not None:
                    np.add(part, last[lo : lo + block], out=part)
                scale(part, factor, out=part)
                finite = finite and bool(np.isfinite(part).all())
        return self.total if finite else None

    def clear(self) -> None:
        """Start a new sum (the buffer is reused)."""
        self.count = 0
