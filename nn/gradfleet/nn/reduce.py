"""The arithmetic of one synchronous step: gradients summed in a fixed order, then averaged.

Every backend runs this code (the parameter server, local mode, the tests' reference), so
"the same weights on every backend" is a property of one function, not a promise kept in
three places. The sum is taken in the model's dtype in the order gradients are added
(callers add them in increasing worker order); the mean divides it by the count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BLOCK = 1 << 16  # elements per pass of the fused mean: the block stays in cache

Pieces = Sequence[tuple[slice, np.ndarray]]  # (where, values) that tile a gradient


class GradientSum:
    """An ordered sum of flat gradients in one reusable buffer; `mean()` averages it. Its
    overflow (finite gradients' only way to a non-finite mean) is read from NumPy's flag."""

    def __init__(self, size: int, dtype: np.dtype | str) -> None:
        self.total = np.empty(size, dtype)
        self.count, self.overflowed = 0, False

    def _overflow(self, *_: object) -> None:
        self.overflowed = True

    def add(self, grad: np.ndarray | Pieces) -> None:
        """total += grad, an array or its pieces, in place (the first is copied in)."""
        self.add_parts([(slice(None), grad)] if isinstance(grad, np.ndarray) else grad)

    def add_parts(
        self, parts: Sequence[tuple[slice | np.ndarray, np.ndarray]], dense: bool = True
    ) -> np.ndarray:
        """total += a gradient given as (place, values): blocks covering every element
        (`dense`), or values at distinct indices and zeros elsewhere (the sum `add` gives,
        except that an element left alone keeps the sign of a zero); returns the total."""
        first, self.count = self.count == 0, self.count + 1
        if first and not dense:
            self.total.fill(0)
        with np.errstate(over="call", call=self._overflow):  # mean() reports it
            for place, values in parts:
                if first:
                    self.total[place] = values
                else:
                    self.total[place] += values
        return self.total

    def mean(self, last: np.ndarray | Pieces | None = None) -> np.ndarray | None:
        """(total + last) / count in place, block by block in one pass (`last`: an array or
        the pieces that tile it); None if the sum overflowed. Blocking changes no bit (each
        element sees `np.add` then `np.divide`); dividing by a power of two is multiplying by
        its exact reciprocal. One gradient is its own mean, returned as it is."""
        size = self.total.size
        pieces = [(slice(0, size), last)] if isinstance(last, np.ndarray) else last
        count = self.count + (last is not None)
        if count == 1 and isinstance(last, np.ndarray):
            return last
        if count == 1:  # pieces are assembled first
            return self.total if pieces is None else self.add_parts(pieces)
        power_of_two = count & (count - 1) == 0
        scale, factor = (np.multiply, 1.0 / count) if power_of_two else (np.divide, count)
        with np.errstate(over="call", call=self._overflow, invalid="ignore"):
            for place, values in pieces or [(slice(0, size), None)]:
                start, stop = place.start or 0, size if place.stop is None else place.stop
                for lo in range(start, stop, _BLOCK):
                    part = self.total[lo : min(lo + _BLOCK, stop)]
                    if values is not None:
                        np.add(part, values[lo - start : lo - start + part.size], out=part)
                    scale(part, factor, out=part)
        return None if self.overflowed else self.total

    def clear(self) -> None:
        """Start a new sum (the buffer is reused)."""
        self.count, self.overflowed = 0, False
