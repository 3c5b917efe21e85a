"""One worker step over the PushAndPull stream: communication that overlaps computation.

The backward pass hands over each layer's gradient as soon as it is written (the last
layer first, `send`); its bytes are on their way while earlier layers are still being
computed. Once the step has closed, the server streams the next weights, the first layer
first, and the next forward pass waits only for the layer it is about to compute
(`wait`). With an elementwise codec (none, bf16, fp16) each range is encoded on its own,
which gives the same payload as encoding the whole gradient; sign and top-k need the
whole gradient, so theirs goes when the last range is in. Either way the server receives
the push whole before it adds anything, as for every push.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from gradfleet.proto.codecs import Codec, Residual
from gradfleet.proto.errors import DataLoss, GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    ChunkAssembler,
    WireError,
    aligned_chunk_bytes,
    as_bytes_view,
    decode_chunk_message,
    encode_chunk_message,
)

# (rows, loss) -> the serialised PushHeader of this step
HeaderFn = Callable[[int, float], bytes]


class StreamedExchange:
    """Worker `worker`'s step `step` on one server: push ranges of `grad` as they become
    final, then read the weights of the next version into `out` as they arrive."""

    def __init__(
        self,
        *,
        start: Callable[[Iterator[bytes]], Any],
        header: HeaderFn,
        grad: np.ndarray,
        out: np.ndarray,
        step: int,
        codec: Codec,
        residual: Residual | None,
        pull_layout: pb.Layout,
        chunk_bytes: int,
        error: Callable[[grpc.RpcError], GradfleetError],
        on_header: Callable[[pb.WeightsHeader], None] | None = None,
    ) -> None:
        self.grad, self.out, self.step = grad, out, step
        self._start, self._header, self._error = start, header, error
        self._codec, self._residual = codec, residual
        self._layout_msg, self._on_header = pull_layout, on_header
        self._chunk = aligned_chunk_bytes(chunk_bytes, 8)
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._responses: Any = None
        self._first: bytes | None = None  # the header, until the first message carries it
        self._sent = 0  # elements handed over
        self.rows, self.loss = 0, 0.0
        self._closed = False
        self.version: int | None = None
        self._assembler: ChunkAssembler | None = None
        self._pull_codec: Codec | None = None
        self._ready = 0  # elements of `out` that hold the new weights
        self._done = False

    # the push

    def send(self, start: int, stop: int, rows: int, loss: float) -> None:
        """Elements [start, stop) of the gradient are final: encode and send them."""
        self.rows, self.loss = rows, loss
        if self._responses is None:
            self._first = self._header(rows, loss)
            self._responses = self._start(self._messages())
        self._sent += stop - start
        part = self.grad[start:stop]
        if self._codec.elementwise:
            per = self._codec.element_bytes(self.grad.dtype)
            if self._residual is None:
                payload = part.view(np.uint8)
            else:
                payload = self._residual.encode_range(part, start, self.step)
            self._put(start * per, payload)
        elif self._sent == self.grad.size:  # sign, top-k: the whole gradient at once
            assert self._residual is not None
            self._put(0, self._residual.encode(self.grad, self.step))

    def _put(self, offset: int, payload: np.ndarray) -> None:
        data = as_bytes_view(payload)
        for at in range(0, max(1, data.nbytes), self._chunk):
            header, self._first = self._first or b"", None
            piece = data[at : at + self._chunk]
            self._requests.put(encode_chunk_message(offset + at, piece, header))

    def close(self) -> None:
        """Every range was sent: end the push."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)

    def _messages(self) -> Iterator[bytes]:
        while (message := self._requests.get()) is not None:
            yield message

    # the weights of the next version

    def wait_version(self) -> int:
        """Block until the next weights' header has come; returns their version."""
        while self.version is None:
            self._read()
        return self.version

    def wait(self, start: int, stop: int) -> None:
        """Block until out[start:stop] holds the next weights."""
        while self._ready < stop and not self._done:
            self._read()
        if self._ready < stop:
            self._fail(DataLoss("the server ended the weights before all of them came."))

    def finish(self) -> tuple[int, np.ndarray]:
        """Read the rest of the weights; returns (version, out)."""
        while not self._done:
            self._read()
        assert self.version is not None
        return self.version, self.out

    def cancel(self) -> None:
        self.close()
        if self._responses is not None and not self._done:
            self._responses.cancel()

    def _read(self) -> None:
        try:
            raw = next(self._responses, None)
        except grpc.RpcError as exc:
            self.close()
            raise self._error(exc) from None
        try:
            if raw is None:
                if self._assembler is None:
                    raise WireError("the server sent no weights.")
                self._assembler.finish()
                self._decode()
                self._done = True
                return
            header_bytes, offset, data = decode_chunk_message(raw)
            if header_bytes is not None:
                self._begin(pb.WeightsHeader.FromString(bytes(header_bytes)))
            if self._assembler is None:
                raise WireError("the server sent weights before their header.")
            self._assembler.add(offset, data)
            self._decode()
        except WireError as exc:
            self._fail(DataLoss(f"the weights are malformed: {exc}"))

    def _begin(self, header: pb.WeightsHeader) -> None:
        if header.layout != self._layout_msg:
            raise WireError("the weights' layout is not the job's.")
        if self._on_header is not None:
            self._on_header(header)
        try:
            codec = Codec.parse(header.codec)
        except ValueError as exc:
            raise WireError(str(exc)) from None
        if not codec.elementwise or codec.payload_bytes(self.out.size, self.out.dtype) != (
            header.total_bytes
        ):
            raise WireError(f"{header.total_bytes} bytes of {codec} weights.")
        lossless = codec.name == "none"
        buffer = self.out if lossless else np.empty(header.total_bytes, np.uint8)
        self._pull_codec = None if lossless else codec
        self.version, self._assembler = int(header.version), ChunkAssembler(buffer)

    def _decode(self) -> None:
        """Bring `_ready` up to the weights received from the start without a gap."""
        assert self._assembler is not None
        per = self.out.dtype.itemsize
        if self._pull_codec is not None:
            per = self._pull_codec.element_bytes(self.out.dtype)
        ready = self._assembler.prefix // per
        if self._pull_codec is not None and ready > self._ready:
            payload = self._assembler.out[self._ready * per : ready * per]
            target = self.out[self._ready : ready]
            for place, values in self._pull_codec.parts(payload, target.size, target.dtype):
                target[place] = values
        self._ready = ready

    def _fail(self, error: GradfleetError) -> None:
        self.cancel()
        raise error
