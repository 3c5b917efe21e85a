"""Receiving gradients: checking a push's chunks, and the memory whole gradients may use.

A push's bytes are the gradient's values, or the payload of the job's codec
(`PushFormat`). A gradient that came as one message is used where it lies (a read-only
view of the message). A streamed one is received whole before anything of it is added
to a sum, so a push that fails half-way touches nothing and an acknowledged gradient is
never revoked: its values stay in the chunks as they came (checked one by one, added
later with no copy in between), a codec's payload is copied into a buffer (checked whole
once in). A slot of the job's `ReceiveSlots` stands for that memory: at most `limit`
gradients are being received or held for their turn at once (`receive_budget_bytes`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from gradfleet.nn.reduce import GradientSum, Pieces
from gradfleet.proto.codecs import Codec
from gradfleet.proto.errors import InvalidArgument, Reason, ResourceExhausted, ServerUnavailable
from gradfleet.proto.wire import ChunkPlacement, FlatLayout, WireError, decode_chunk_message
from gradfleet.server.domain import PushHeader
from gradfleet.server.waiting import FifoWaiters, Waiter


@dataclass(frozen=True)
class PushFormat:
    """What a job's pushes carry: `size` values of `dtype`, or their `codec` payload."""

    codec: Codec
    size: int
    dtype: np.dtype

    @property
    def encoded(self) -> bool:
        return self.codec.name != "none"

    @property
    def nbytes(self) -> int:
        return self.codec.payload_bytes(self.size, self.dtype)

    @property
    def element(self) -> np.dtype:
        """The dtype of the data's elements: the values', or bytes for a payload."""
        return np.dtype(np.uint8) if self.encoded else self.dtype

    def view(self, data: memoryview) -> np.ndarray:
        return np.frombuffer(data, dtype=self.element)

    def empty(self) -> np.ndarray:
        return np.empty(self.nbytes // self.element.itemsize, self.element)

    def check_piece(self, values: np.ndarray) -> None:
        """Refuse values that are not finite as soon as their chunk arrives."""
        if not self.encoded and not np.isfinite(values).all():
            raise InvalidArgument("the gradient contains NaN or Inf values.", Reason.NON_FINITE)

    def check_whole(self, data: np.ndarray) -> None:
        """Refuse a malformed payload once all of it is in (values are checked per piece)."""
        if self.encoded:
            self.codec.check(data, self.size, self.dtype)

    def add(self, total: GradientSum, gradient: Gradient) -> None:
        """total += `gradient`, a payload decoded block by block."""
        if self.encoded:
            assert gradient.data is not None  # a payload is checked, and kept, whole
            parts = self.codec.parts(gradient.data, self.size, self.dtype)
            total.add_parts(parts, self.codec.dense)
        else:
            total.add(gradient.values)


@dataclass
class Gradient:
    """A complete, checked gradient, and the memory it occupies until it is summed: one
    array, or the chunks of a stream read in place (`pieces`, which tile it)."""

    data: np.ndarray | None  # flat: the values in the job's dtype, or a codec's payload
    buffer: np.ndarray | None = None  # a slots buffer to hand back, or None (a message view)
    slot: bool = False  # whether it counts against the receive slots
    pieces: list[tuple[slice, np.ndarray]] = field(default_factory=list)

    @property
    def values(self) -> np.ndarray | Pieces:
        return self.data if self.data is not None else self.pieces


def check_header(
    h: PushHeader,
    num_workers: int,
    layout: FlatLayout,
    shard: tuple[int, tuple[int, ...]] | None,
    fmt: PushFormat,
) -> None:
    """Validate a push header against its job (`shard`: its (index, bounds) when it holds
    one range of a sharded job; `fmt`: what its pushes carry); raises InvalidArgument
    naming the field."""
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
    try:
        codec = Codec.parse(h.codec)
    except ValueError as exc:
        raise InvalidArgument(str(exc), Reason.BAD_HEADER) from None
    if codec != fmt.codec:
        raise InvalidArgument(
            f"the gradient is encoded as {codec}, but this job's compression is {fmt.codec}.",
            Reason.BAD_HEADER,
        )
    if h.total_bytes != fmt.nbytes:
        raise InvalidArgument(
            f"gradient declares {h.total_bytes} bytes, expected {fmt.nbytes}.",
            Reason.BAD_BYTES,
        )
    if h.step < 0:
        raise InvalidArgument(f"step must be 0 or more, got {h.step}.", Reason.BAD_STEP)


def _shard_name(shard: tuple[int, tuple[int, ...]] | None) -> str:
    return "none, the whole job" if shard is None else f"{shard[0]} of {len(shard[1]) - 1}"


def whole_message(fmt: PushFormat, offset: int, data: memoryview) -> np.ndarray | None:
    """The gradient as a read-only view when this one chunk is all of it, checked."""
    if offset != 0 or data.nbytes != fmt.nbytes:
        return None
    grad = fmt.view(data)
    fmt.check_piece(grad)
    fmt.check_whole(grad)
    return grad


def read_chunks(
    fmt: PushFormat,
    offset: int,
    data: memoryview,
    rest: Iterator[bytes],
    into: Gradient | None,
) -> None:
    """Check every chunk of a push (placement, exact tiling, finite values), keeping each
    in `into` when given (as a piece, or copied into its buffer), then a whole payload;
    raises InvalidArgument on the first bad one. Without `into` (a push answered without
    its data) a payload's content goes unchecked: only its tiling is."""
    placement = ChunkPlacement(fmt.nbytes, fmt.element.itemsize)
    out = None if into is None else into.data
    try:
        while True:
            if data.nbytes:
                place = placement.place(offset, data.nbytes)
                chunk = fmt.view(data)
                fmt.check_piece(chunk)
                if out is not None:
                    out[place] = chunk
                elif into is not None:
                    into.pieces.append((place, chunk))
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
    if out is not None:
        fmt.check_whole(out)


class ReceiveSlots:
    """Room for `limit` whole gradients of one job at once, with reusable buffers.

    A slot is taken by a stream being received into a buffer, or by a one-message
    gradient held until its turn in the sum. Not thread-safe on its own: the job calls
    it under its lock, and waiters sleep outside it.
    """

    def __init__(self, limit: int, fmt: PushFormat) -> None:
        self.limit, self.format = limit, fmt
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
        return self._spare.pop() if self._spare else self.format.empty()

    def release(self, gradient: Gradient) -> None:
        """Give back what `gradient` occupies and wake the longest waiting stream."""
        if gradient.buffer is not None and len(self._spare) < 2:
            self._spare.append(gradient.buffer)
        gradient.buffer, gradient.pieces = None, []
        if gradient.slot:
            gradient.slot = False
            self.used -= 1
            self.waiters.wake_one()

    def take(
        self,
        lock: threading.Lock,
        flush_held: Callable[[], bool],
        timeout: float | None,
        waiter: Waiter,
    ) -> Gradient:
        """A slot for a streamed gradient (with a buffer for a codec's payload), waiting
        within `timeout` for one to free up. `flush_held` (called under the owner's
        `lock`) adds the gradients held for their turn now, freeing their slots; True
        when it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with lock:
                if self.try_take():
                    if not self.format.encoded:  # its chunks are kept as they come
                        return Gradient(None, slot=True)
                    buffer = self.buffer()
                    return Gradient(buffer, buffer, slot=True)
                if flush_held():
                    continue
                waiter.arm()
                self.waiters.add(waiter)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            woken = waiter.sleep(remaining)
            with lock:
                self.waiters.discard(waiter)
            if waiter.cancelled:
                raise ServerUnavailable(
                    "the push was cancelled or the server is stopping.", Reason.SHUTDOWN
                )
            if not woken:
                raise ResourceExhausted(
                    f"the job is receiving {self.limit} gradients already and the deadline "
                    "passed while waiting; retry later.",
                    Reason.RECEIVE_BUSY,
                )
