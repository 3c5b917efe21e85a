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

import math
from dataclasses import dataclass

import numpy as np

from gradfleet.proto.errors import InvalidArgument, Reason

_BLOCK = 1 << 16  # elements decoded at once into the sum
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Codec:
    """A named codec; `fraction` only for topk."""

    name: str
    fraction: float = 1.0

    @classmethod
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
                raise ValueError(f"topk needs a fraction in (0, 1], e.g. topk:0.01; got {text!r}")
            return cls("topk", fraction)
        if name not in ("none", "bf16", "fp16", "sign") or argument:
            raise ValueError(
                f"unknown compression {text!r}: choose none, bf16, fp16, sign or topk:<fraction>"
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
        if self.name == "bf16":
            return _to_bf16(grad).view(np.uint8)
        if self.name == "fp16":
            clipped = np.clip(grad, -FP16_MAX, FP16_MAX)
            return clipped.astype("<f2").view(np.uint8)
        if self.name == "sign":
            scale = np.asarray([np.abs(grad).mean()], dtype=grad.dtype)
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
        halves = payload.view("<u2")
        for lo in range(0, size, _BLOCK):
            block = halves[lo : lo + _BLOCK]
            if self.name == "bf16":
                values = (block.astype(np.uint32) << 16).view(np.float32).astype(dtype)
            else:
                values = block.view("<f2").astype(dtype)
            parts.append((slice(lo, lo + block.size), values))
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
            if k and (indices[0] < 0 or indices[-1] >= size):
                raise _bad(f"a topk index lies outside the gradient's {size} elements.")
            if (np.diff(indices) <= 0).any():
                raise _bad("topk indices must be increasing, with no index repeated.")
            if not np.isfinite(payload[8 * k :].view(dtype)).all():
                raise InvalidArgument(
                    "the topk gradient contains NaN or Inf values.", Reason.NON_FINITE
                )
        elif not np.isfinite(payload.view(dtype)).all():
            raise InvalidArgument("the gradient contains NaN or Inf values.", Reason.NON_FINITE)


NO_CODEC = Codec("none")


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, Reason.BAD_BYTES)


def _to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 (or float64 through float32) to bfloat16 bits, rounded to nearest even;
    values past bfloat16's range become its largest finite value, never Inf."""
    as32 = values.astype(np.float32)
    bits = as32.view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    overflow = (out & 0x7F80) == 0x7F80  # rounded up to Inf (inputs are finite)
    if overflow.any():
        out[overflow] = (out[overflow] & 0x8000) | 0x7F7F
    return out


class Residual:
    """A worker's error feedback: what earlier payloads did not carry.

    `encode(grad, step)` sends grad + residual; encoding the same step again (a push
    repeated after a failure) returns the same payload and leaves the residual as it is,
    so a retried push never counts a gradient twice."""

    def __init__(self, codec: Codec, size: int, dtype: np.dtype) -> None:
        self.codec, self.size, self.dtype = codec, size, np.dtype(dtype)
        self.values = np.zeros(size, self.dtype)
        self._last: tuple[int, np.ndarray] | None = None  # (step, payload)

    def encode(self, grad: np.ndarray, step: int | None = None) -> np.ndarray:
        """The payload of grad + residual; the residual keeps what it lost."""
        if self.codec.name == "none":
            return self.codec.encode(grad)
        if step is not None and self._last is not None and self._last[0] == step:
            return self._last[1]
        np.add(self.values, grad, out=self.values)  # the corrected gradient
        payload = self.codec.encode(self.values)
        for place, sent in self.codec.parts(payload, self.size, self.dtype):
            self.values[place] -= sent
        if step is not None:
            self._last = (step, payload)
        return payload
