"""Receiving gradients: checking a push's chunks, and the memory whole gradients may use.

A gradient that came as one message is used where it lies (a read-only view of the
message). A streamed one is received whole into a buffer of the job's `ReceiveSlots`
before anything is added to a sum, so a push that fails half-way touches nothing and an
acknowledged gradient is never revoked. The slots bound that memory: at most `limit`
gradients are being received or held for their turn at once (`receive_budget_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from gradfleet.proto.errors import InvalidArgument, Reason
from gradfleet.proto.wire import ChunkPlacement, FlatLayout, WireError, decode_chunk_message
from gradfleet.server.domain import PushHeader
from gradfleet.server.waiting import FifoWaiters, Waiter


@dataclass
class Gradient:
    """A complete, checked gradient, and the memory it occupies until it is summed."""

    data: np.ndarray  # flat, the job's dtype
    buffer: np.ndarray | None = None  # a slots buffer to hand back, or None (a message view)
    slot: bool = False  # whether it counts against the receive slots


def check_header(
    h: PushHeader, num_workers: int, layout: FlatLayout, shard: tuple[int, tuple[int, ...]] | None
) -> None:
    """Validate a push header against its job (`shard`: its (index, bounds) when it holds
    one range of a sharded job); raises InvalidArgument naming the field."""
    if h.shard != shard:
        raise InvalidArgument(
            "the push is for another range of the job than this server holds (shard "
            f"{_shard_name(h.shard)}, this server: {_shard_name(shard)}).",
            Reason.BAD_LAYOUT,
        )
    if not 0 <= h.worker < num_workers:
        raise InvalidArgument(
            f"worker {h.worker} is out of range; this job has workers 0..{num_workers - 1}.",
            Reason.BAD_WORKER,
        )
    if h.rows < 0:
        raise InvalidArgument(f"rows must be 0 or more, got {h.rows}.", Reason.BAD_ROWS)
    if not math.isfinite(h.loss):
        raise InvalidArgument("the reported loss is NaN or Inf.", Reason.NON_FINITE)
    if h.dtype is None:
        raise InvalidArgument("the gradient's dtype is unknown.", Reason.BAD_DTYPE)
    if h.dtype != layout.dtype:
        raise InvalidArgument(
            f"gradient dtype {h.dtype.name} does not match the job's {layout.dtype.name}.",
            Reason.BAD_DTYPE,
        )
    if h.layout is not None and h.layout != layout:
        raise InvalidArgument(
            "the gradient's layout does not match the job's layout.", Reason.BAD_LAYOUT
        )
    if h.total_bytes != layout.nbytes:
        raise InvalidArgument(
            f"gradient declares {h.total_bytes} bytes, expected {layout.nbytes}.",
            Reason.BAD_BYTES,
        )
    if h.step < 0:
        raise InvalidArgument(f"step must be 0 or more, got {h.step}.", Reason.BAD_STEP)


def _shard_name(shard: tuple[int, tuple[int, ...]] | None) -> str:
    return "none, the whole job" if shard is None else f"{shard[0]} of {len(shard[1]) - 1}"


def _check_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise InvalidArgument("the gradient contains NaN or Inf values.", Reason.NON_FINITE)


def whole_message(layout: FlatLayout, offset: int, data: memoryview) -> np.ndarray | None:
    """The gradient as a read-only view when this one chunk is all of it, checked finite."""
    if offset != 0 or data.nbytes != layout.nbytes:
        return None
    grad = np.frombuffer(data, dtype=layout.dtype)
    _check_finite(grad)
    return grad


def read_chunks(
    layout: FlatLayout,
    offset: int,
    data: memoryview,
    rest: Iterator[bytes],
    out: np.ndarray | None,
) -> None:
    """Check every chunk of a push (placement, exact tiling, finiteness), copying each into
    `out` when given; raises InvalidArgument on the first bad one."""
    placement = ChunkPlacement(layout.nbytes, layout.dtype.itemsize)
    try:
        while True:
            if data.nbytes:
                place = placement.place(offset, data.nbytes)
                chunk = np.frombuffer(data, dtype=layout.dtype)
                _check_finite(chunk)
                if out is not None:
                    out[place] = chunk
            raw = next(rest, None)
            if raw is None:
                break
            extra_header, offset, data = decode_chunk_message(raw)
            if extra_header is not None:
                raise InvalidArgument(
                    "only the first push message may carry a header.", Reason.BAD_HEADER
                )
        placement.finish()
    except WireError as exc:
        raise InvalidArgument(str(exc), Reason.BAD_BYTES) from None


class ReceiveSlots:
    """Room for `limit` whole gradients of one job at once, with reusable buffers.

    A slot is taken by a stream being received into a buffer, or by a one-message
    gradient held until its turn in the sum. Not thread-safe on its own: the job calls
    it under its lock, and waiters sleep outside it.
    """

    def __init__(self, limit: int, layout: FlatLayout) -> None:
        self.limit, self.layout = limit, layout
        self.used = 0
        self._spare: list[np.ndarray] = []
        self.waiters = FifoWaiters()

    def try_take(self, keep_free: int = 0) -> bool:
        """Take a slot if one is free beyond `keep_free` (left for gradients in hand)."""
        if self.used + keep_free >= self.limit:
            return False
        self.used += 1
        return True

    def buffer(self) -> np.ndarray:
        """A buffer for a stream that holds a slot (kept buffers are reused)."""
        return self._spare.pop() if self._spare else self.layout.empty()

    def release(self, gradient: Gradient) -> None:
        """Give back what `gradient` occupies and wake the longest waiting stream."""
        if gradient.buffer is not None and len(self._spare) < 2:
            self._spare.append(gradient.buffer)
        gradient.buffer = None
        if gradient.slot:
            gradient.slot = False
            self.used -= 1
            self.waiters.wake_one()

    def wait_turn(self, waiter: Waiter) -> Callable[[], None]:
        """Queue `waiter` for the next free slot; returns how to leave the queue."""
        self.waiters.add(waiter)
        return lambda: self.waiters.discard(waiter)
