"""Gradient codecs: fewer bytes on the wire, with error feedback on the worker.

A codec turns a flat gradient into a payload (bytes) and back. ``none`` is the
gradient's own bytes. The lossy ones:

* ``bf16`` / ``fp16``: each value rounded to nearest even in 16 bits. fp16 holds at most
  65504 in magnitude: larger values are sent as ±65504 (never as Inf) and the rest stays
  in the residual.
* ``topk:<fraction>``: the k = ceil(fraction x n) largest values by magnitude, as sorted
  element indices (int64) followed by their values (the model's dtype).
* ``sign``: one bit per element (set for a negative value) and one scale, the mean
  magnitude (EF-signSGD): each element is sent as ±scale.

Error feedback (`Residual`): what a lossy payload did not carry is added to the worker's
next gradient, so nothing is lost for good. A worker that restarts starts with a zero
residual: what it had not yet sent is lost, at most one step's rounding error per worker.

The server decodes a payload straight into its sum, block by block (`add_to`), with no
full-size array per push, and refuses malformed ones (`check`) before anything is added.
Every backend runs this same code, so local mode and the parameter server compute the
same numbers for every codec.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradfleet.proto.errors import InvalidArgument, Reason

_BLOCK = 1 << 16  # elements decoded at once into the sum
BF16_MAX = (2 - 2**-7) * 2.0**127  # bfloat16's largest finite value
FP16_MAX = float(np.finfo(np.float16).max)
_FP16_MIN_NORMAL = 2.0**-14
# every float16 bit pattern's value: a table is faster than NumPy's own conversion, which
# takes a slow path for subnormals (and small gradients are mostly subnormal in fp16)
with np.errstate(invalid="ignore"):
    _FP16_VALUES = {
        np.dtype(t): np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(t)
        for t in (np.float32, np.float64)
    }


@dataclass(frozen=True)
class Codec:
    """A named codec; `fraction` only for topk."""

    name: str
    fraction: float = 1.0

    @classmethod
    @functools.lru_cache(maxsize=64)  # every push names its codec; a Codec never changes
    def parse(cls, text: str | None) -> Codec:
        """From its name ("none", "bf16", "fp16", "sign", "topk:0.01"); ValueError else."""
        text = (text or "none").strip().lower()
        name, _, argument = text.partition(":")
        if name == "topk":
            try:
                fraction = float(argument)
            except ValueError:
                fraction = math.nan
            if not 0 < fraction <= 1:
                raise ValueError(f"topk needs a fraction in (0, 1], e.g. topk:0.01; got {text!r}.")
            return cls("topk", fraction)
        if name not in ("none", "bf16", "fp16", "sign") or argument:
            raise ValueError(
                f"unknown compression {text!r}: choose none, bf16, fp16, sign or topk:<fraction>."
            )
        return cls(name)

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.name == "topk" else self.name

    @property
    def lossless(self) -> bool:
        return self.name == "none" or (self.name == "topk" and self.fraction >= 1)

    @property
    def elementwise(self) -> bool:
        """Whether each part of a gradient can be encoded on its own (for overlap)."""
        return self.name in ("none", "bf16", "fp16")

    def element_bytes(self, dtype: np.dtype) -> int:
        """Payload bytes per element of an elementwise codec: element i's are at i x this."""
        assert self.elementwise, f"{self} payloads are not laid out per element"
        return dtype.itemsize if self.name == "none" else 2

    def payload_bytes(self, size: int, dtype: np.dtype) -> int:
        """The payload's byte count for a gradient of `size` elements."""
        if self.name == "none":
            return size * dtype.itemsize
        if self.name in ("bf16", "fp16"):
            return 2 * size
        if self.name == "sign":
            return dtype.itemsize + (size + 7) // 8
        return self._k(size) * (8 + dtype.itemsize)

    def _k(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size)))

    def encode(self, grad: np.ndarray) -> np.ndarray:
        """The payload of a flat, finite gradient, as a uint8 array."""
        if self.name == "none":
            return grad.view(np.uint8)
        if self.name == "bf16":  # rounded to nearest even; beyond bf16, its largest value
            return np.clip(grad, -BF16_MAX, BF16_MAX).astype(_bf16()).view(np.uint8)
        if self.name == "fp16":
            return _to_fp16_bits(grad).view(np.uint8)
        if self.name == "sign":
            # summed in float64: a float32 sum of huge finite values would overflow
            scale = np.asarray([np.abs(grad).mean(dtype=np.float64)], dtype=grad.dtype)
            bits = np.packbits(grad < 0, bitorder="little")
            return np.concatenate([scale.view(np.uint8), bits])
        k = self._k(grad.size)
        indices = np.sort(np.argpartition(np.abs(grad), grad.size - k)[grad.size - k :])
        return np.concatenate([indices.astype("<i8").view(np.uint8), grad[indices].view(np.uint8)])

    @property
    def dense(self) -> bool:
        """Whether a decoded payload's parts cover every element (topk's: its indices)."""
        return self.name != "topk"

    def decode(self, payload: np.ndarray, size: int, dtype: np.dtype) -> np.ndarray:
        """The gradient a payload stands for (a new array)."""
        out = np.empty(size, dtype) if self.dense else np.zeros(size, dtype)
        for place, values in self.parts(payload, size, dtype):
            out[place] = values
        return out

    def parts(
        self, payload: np.ndarray, size: int, dtype: np.dtype
    ) -> list[tuple[slice | np.ndarray, np.ndarray]]:
        """The decoded gradient as (place, values) blocks of at most 64k elements (topk:
        its indices and values), for adding into a sum without a full-size array."""
        if self.name == "none":
            return [(slice(0, size), payload.view(dtype))]
        if self.name == "topk":
            k = self._k(size)
            indices = payload[: 8 * k].view("<i8")
            return [(indices, payload[8 * k :].view(dtype))]
        parts: list[tuple[slice | np.ndarray, np.ndarray]] = []
        if self.name == "sign":
            scale = payload[: dtype.itemsize].view(dtype)[0]
            bits = payload[dtype.itemsize :]
            for lo in range(0, size, _BLOCK):
                hi = min(size, lo + _BLOCK)
                negative = np.unpackbits(bits[lo // 8 : (hi + 7) // 8], bitorder="little")
                signs = np.where(negative[: hi - lo].astype(bool), -scale, scale).astype(dtype)
                parts.append((slice(lo, hi), signs))
            return parts
        if self.name == "bf16":  # NumPy widens bfloat16 exactly wherever it is used
            return [(slice(0, size), payload.view(_bf16()))]
        table = _FP16_VALUES[np.dtype(dtype)]
        halves = payload.view("<u2")
        for lo in range(0, size, _BLOCK):
            block = halves[lo : lo + _BLOCK]
            parts.append((slice(lo, lo + block.size), np.take(table, block)))
        return parts

    def check(self, payload: np.ndarray, size: int, dtype: np.dtype) -> None:
        """Refuse a malformed payload (InvalidArgument) before anything of it is used."""
        if payload.size != self.payload_bytes(size, dtype):
            raise _bad(
                f"a {self} payload of {size} elements has "
                f"{self.payload_bytes(size, dtype)} bytes, got {payload.size}."
            )
        if self.name in ("bf16", "fp16"):
            exponent = 0x7F80 if self.name == "bf16" else 0x7C00
            if ((payload.view("<u2") & exponent) == exponent).any():
                raise InvalidArgument(
                    f"the {self} gradient contains NaN or Inf values.", Reason.NON_FINITE
                )
        elif self.name == "sign":
            scale = payload[: dtype.itemsize].view(dtype)[0]
            if not math.isfinite(scale) or scale < 0:
                raise InvalidArgument(
                    "the sign payload's scale is not a finite magnitude.", Reason.NON_FINITE
                )
        elif self.name == "topk":
            k = self._k(size)
            indices = payload[: 8 * k].view("<i8")
            if ((indices < 0) | (indices >= size)).any():
                raise _bad(f"a topk index lies outside the gradient's {size} elements.")
            if (indices[1:] <= indices[:-1]).any():
                raise _bad("topk indices must be increasing, with no index repeated.")
            if not np.isfinite(payload[8 * k :].view(dtype)).all():
                raise InvalidArgument(
                    "the topk gradient contains NaN or Inf values.", Reason.NON_FINITE
                )
        elif not np.isfinite(payload.view(dtype)).all():
            raise InvalidArgument("the gradient contains NaN or Inf values.", Reason.NON_FINITE)


NO_CODEC = Codec("none")


@functools.cache
def _bf16() -> np.dtype:
    """NumPy's bfloat16, from ml_dtypes: imported on first use, since the import alone
    costs about half a second of CPU in every process that loads this module."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, Reason.BAD_BYTES)


def _to_fp16_bits(values: np.ndarray) -> np.ndarray:
    """float16 bits of each value, rounded to nearest even; values past float16's range
    become its largest finite value (never Inf). Integer arithmetic on the value's own
    bits: NumPy's conversion is ten times slower on the subnormals small gradients are."""
    a = np.minimum(np.abs(values), FP16_MAX)
    wide = a.dtype == np.float32
    uint: type[np.unsignedinteger[Any]] = np.uint32 if wide else np.uint64
    drop, bias = (13, 127) if wide else (42, 1023)
    bits = a.view(uint)
    # normal results: drop significand bits, rounding to nearest even, and rebias
    normal = (bits + uint((1 << (drop - 1)) - 1) + ((bits >> uint(drop)) & uint(1))) >> uint(drop)
    normal -= uint((bias - 15) << 10)
    # subnormal results are multiples of 2**-24: round |x| * 2**24 to an integer
    tiny = np.rint(np.minimum(a, _FP16_MIN_NORMAL) * 2.0**24).astype(uint)
    out = np.where(a >= _FP16_MIN_NORMAL, normal, tiny).astype("<u2")
    sign = values.view(uint) >> uint(8 * values.itemsize - 16)  # the top 16 bits
    out |= sign.astype("<u2") & np.uint16(0x8000)
    return out


class Residual:
    """A worker's error feedback: what earlier payloads did not carry.

    `encode(grad, step)` sends grad + residual; encoding the same step again (a push
    repeated after a failure) returns the same payload and leaves the residual as it is,
    so a retried push never counts a gradient twice. An elementwise codec may encode a
    step range by range as they become final (`encode_range`), with the same result."""

    def __init__(self, codec: Codec, size: int, dtype: np.dtype) -> None:
        self.codec, self.size, self.dtype = codec, size, np.dtype(dtype)
        self.values = np.zeros(size, self.dtype)
        self._last: tuple[int, np.ndarray] | None = None  # (step, payload)
        self._ranges: dict[int, int] = {}  # start -> stop of the last step's ranges encoded

    def encode(self, grad: np.ndarray, step: int | None = None) -> np.ndarray:
        """The payload of grad + residual; the residual keeps what it lost."""
        if self.codec.name == "none":
            return self.codec.encode(grad)
        if step is not None and self._last is not None and self._last[0] == step:
            self._fill_gaps(grad, step)  # a step begun range by range and not finished
            return self._last[1]
        payload = self._correct_and_encode(grad, self.values)
        if step is not None:
            self._last, self._ranges = (step, payload), {}
        return payload

    def encode_range(self, grad: np.ndarray, start: int, step: int) -> np.ndarray:
        """The payload bytes of elements [start, start + grad.size) of step `step`'s
        gradient (an elementwise codec), kept to make up that step's whole payload."""
        per = self.codec.element_bytes(self.dtype)
        if self.codec.name == "none":
            return grad.view(np.uint8)
        if self._last is None or self._last[0] != step:
            self._last, self._ranges = (step, np.empty(self.size * per, np.uint8)), {}
        where = slice(start * per, (start + grad.size) * per)
        if start not in self._ranges:  # a range encoded again (a retried step) is not
            self._ranges[start] = start + grad.size  # corrected twice
            self._last[1][where] = self._correct_and_encode(
                grad, self.values[start : start + grad.size]
            )
        return self._last[1][where]

    def _fill_gaps(self, grad: np.ndarray, step: int) -> None:
        """Encode the ranges of a step begun range by range that were never encoded."""
        if not self._ranges:
            return
        position = 0
        for start, stop in sorted(self._ranges.items()):
            if start > position:
                self.encode_range(grad[position:start], position, step)
            position = max(position, stop)
        if position < self.size:
            self.encode_range(grad[position:], position, step)

    def _correct_and_encode(self, grad: np.ndarray, residual: np.ndarray) -> np.ndarray:
        np.add(residual, grad, out=residual)  # the corrected gradient
        payload = self.codec.encode(residual)
        for place, sent in self.codec.parts(payload, residual.size, self.dtype):
            residual[place] -= sent
        return payload
