"""Wire codec shared by the parameter server and its clients.

A job's tensors live in one flat little-endian buffer of a single dtype; a `FlatLayout`
names every tensor with its shape and element offset. Data moves as raw byte chunks
(about 1 MiB by default); the receiving side writes each chunk into a preallocated
array through `np.frombuffer` and `ChunkAssembler` checks that the chunks tile the
buffer exactly (no overlap, no hole, exact byte count).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from gradfleet.proto.v1 import parameter_server_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Trailing metadata key under which the server names an error's machine-readable reason.
REASON_KEY = "gradfleet-reason"

_DTYPE_TO_PROTO: dict[np.dtype, pb.DType] = {
    np.dtype("<f4"): pb.DTYPE_FLOAT32,
    np.dtype("<f8"): pb.DTYPE_FLOAT64,
}
_PROTO_TO_DTYPE: dict[int, np.dtype] = {v: k for k, v in _DTYPE_TO_PROTO.items()}
DTYPE_NAMES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT64: "float64"}


class WireError(ValueError):
    """A malformed layout, dtype or chunk; the message is one sentence for the caller."""


def dtype_to_proto(dtype: np.dtype | str | type) -> pb.DType:
    """Map a NumPy dtype to the proto enum (float32 and float64 only)."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt not in _DTYPE_TO_PROTO:
        raise WireError(f"dtype {np.dtype(dtype).name} is not supported; use float32 or float64.")
    return _DTYPE_TO_PROTO[dt]


def dtype_from_proto(value: int) -> np.dtype:
    """Map a proto dtype enum to a little-endian NumPy dtype."""
    if value not in _PROTO_TO_DTYPE:
        raise WireError(f"dtype enum {value} is not supported; use DTYPE_FLOAT32 or DTYPE_FLOAT64.")
    return _PROTO_TO_DTYPE[value]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in the flat buffer: element offset and shape."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and element offsets of every tensor in one flat buffer."""

    dtype: np.dtype
    entries: tuple[TensorEntry, ...]

    @functools.cached_property
    def total_elements(self) -> int:
        return sum(e.size for e in self.entries)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.total_elements * self.dtype.itemsize

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FlatLayout:
        """Lay out named arrays back to back, in the mapping's order."""
        if not arrays:
            raise WireError("a model needs at least one tensor.")
        dtypes = {np.dtype(a.dtype) for a in arrays.values()}
        if len(dtypes) != 1:
            raise WireError("all tensors of a model must share one dtype.")
        dtype = np.dtype(dtypes.pop()).newbyteorder("<")
        dtype_to_proto(dtype)
        entries, offset = [], 0
        for name, array in arrays.items():
            entries.append(TensorEntry(name, tuple(int(d) for d in array.shape), offset))
            offset += int(array.size)
        return cls(dtype, tuple(entries))

    @classmethod
    def from_proto(cls, msg: pb.Layout) -> FlatLayout:
        """Parse and validate a Layout: tensors back to back, unique names, no holes."""
        dtype = dtype_from_proto(msg.dtype)
        if not msg.tensors:
            raise WireError("the layout lists no tensors.")
        entries, expected, names = [], 0, set()
        for t in msg.tensors:
            if not t.name or t.name in names:
                raise WireError(f"tensor name {t.name!r} is empty or repeated in the layout.")
            if any(d < 0 for d in t.shape):
                raise WireError(f"tensor {t.name!r} has a negative dimension.")
            if t.offset != expected:
                raise WireError(
                    f"tensor {t.name!r} starts at element {t.offset}, expected {expected}: "
                    "tensors must be back to back with no overlap or hole."
                )
            entry = TensorEntry(t.name, tuple(int(d) for d in t.shape), int(t.offset))
            names.add(t.name)
            entries.append(entry)
            expected += entry.size
        return cls(dtype, tuple(entries))

    def to_proto(self) -> pb.Layout:
        msg = pb.Layout(dtype=dtype_to_proto(self.dtype))
        for e in self.entries:
            msg.tensors.add(name=e.name, shape=list(e.shape), offset=e.offset)
        return msg

    def to_json(self) -> dict:
        """A JSON-serialisable form, for checkpoint metadata."""
        return {
            "dtype": self.dtype.name,
            "tensors": [
                {"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> FlatLayout:
        dtype = np.dtype(data["dtype"]).newbyteorder("<")
        entries = tuple(
            TensorEntry(str(t["name"]), tuple(int(d) for d in t["shape"]), int(t["offset"]))
            for t in data["tensors"]
        )
        return cls(dtype, entries)

    def empty(self) -> np.ndarray:
        """A new flat buffer for this layout (uninitialised)."""
        return np.empty(self.total_elements, dtype=self.dtype)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views into `flat` (no copies); writing a view writes the buffer."""
        if flat.shape != (self.total_elements,):
            raise WireError(
                f"flat buffer has shape {flat.shape}, expected ({self.total_elements},)."
            )
        return {e.name: flat[e.offset : e.offset + e.size].reshape(e.shape) for e in self.entries}

    def flatten(
        self, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Copy named arrays into one flat buffer in layout order, checking shapes."""
        flat = self.empty() if out is None else out
        views = self.views(flat)
        if set(arrays) != set(views):
            raise WireError("tensor names do not match the layout.")
        for name, view in views.items():
            src = np.asarray(arrays[name])
            if src.shape != view.shape:
                raise WireError(f"tensor {name!r} has shape {src.shape}, expected {view.shape}.")
            view[...] = src
        return flat


def as_bytes_view(flat: np.ndarray) -> memoryview:
    """A zero-copy byte view of a C-contiguous little-endian array."""
    if not flat.flags.c_contiguous:
        raise WireError("the array must be C-contiguous.")
    if flat.dtype.byteorder == ">":
        raise WireError("the array must be little-endian.")
    return flat.data.cast("B")


def iter_chunks(
    data: bytes | memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[int, memoryview]]:
    """Yield (byte offset, zero-copy slice) pairs covering `data`; at least one pair."""
    if chunk_bytes <= 0:
        raise WireError("chunk_bytes must be positive.")
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    total = view.nbytes
    if total == 0:
        yield 0, view
        return
    for start in range(0, total, chunk_bytes):
        yield start, view[start : start + chunk_bytes]


def aligned_chunk_bytes(chunk_bytes: int, itemsize: int) -> int:
    """Round a chunk size down to a whole number of elements (at least one)."""
    return max(itemsize, chunk_bytes - chunk_bytes % itemsize)


SINGLE_MESSAGE_FACTOR = 4


def plan_chunk_bytes(nbytes: int, chunk_bytes: int, itemsize: int) -> int:
    """Chunk size for a payload: small payloads (up to 4 chunks' worth) go as one message.

    One message saves the per-message cost that dominates small models; large payloads
    stream in `chunk_bytes` pieces so neither end holds more than a chunk in flight.
    """
    if nbytes <= SINGLE_MESSAGE_FACTOR * chunk_bytes:
        return max(nbytes, itemsize)
    return aligned_chunk_bytes(chunk_bytes, itemsize)


class ChunkPlacement:
    """Checks that byte chunks of a `nbytes` buffer tile it exactly: element-aligned, no
    overlap, and together exactly `nbytes` (`finish` checks for holes). Chunks may come
    in any order."""

    # Disjoint byte ranges a push may have open at once. Chunks in order keep one range;
    # 1 MiB chunks of a 40 MB model in any order keep at most 40. The bound keeps each
    # insertion cheap however a client scatters tiny chunks.
    MAX_RANGES = 4096

    def __init__(self, nbytes: int, itemsize: int) -> None:
        self.nbytes, self.itemsize = nbytes, itemsize
        self._starts: list[int] = []  # sorted, disjoint, merged [start, end) byte ranges
        self._ends: list[int] = []
        self.received = 0

    def place(self, offset: int, length: int) -> slice:
        """Validate a chunk's position and return its element slice."""
        end = offset + length
        if offset < 0 or end > self.nbytes:
            raise WireError(f"chunk [{offset}, {end}) lies outside the {self.nbytes}-byte buffer.")
        if offset % self.itemsize or length % self.itemsize:
            raise WireError(
                f"chunk [{offset}, {end}) is not aligned to the {self.itemsize}-byte dtype."
            )
        if length:
            self._claim(offset, end)
        self.received += length
        return slice(offset // self.itemsize, end // self.itemsize)

    def _claim(self, start: int, end: int) -> None:
        """Record [start, end) as received, merging it with the ranges it touches."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(starts, start)  # ranges before i start at or before `start`
        if (i and ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
            raise WireError(f"chunk [{start}, {end}) overlaps bytes already received.")
        joins_left = bool(i) and ends[i - 1] == start
        joins_right = i < len(starts) and starts[i] == end
        if joins_left and joins_right:
            ends[i - 1] = ends.pop(i)
            del starts[i]
        elif joins_left:
            ends[i - 1] = end
        elif joins_right:
            starts[i] = start
        elif len(starts) >= self.MAX_RANGES:
            raise WireError(
                f"the push has {len(starts)} separate byte ranges open; send its chunks in "
                "order or in larger pieces."
            )
        else:
            starts.insert(i, start)
            ends.insert(i, end)

    @property
    def prefix(self) -> int:
        """Bytes received from the start of the buffer without a gap."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    def finish(self) -> None:
        """Raise unless the chunks covered the whole buffer exactly."""
        if self.received != self.nbytes:
            raise WireError(
                f"received {self.received} bytes, expected exactly {self.nbytes}: "
                "chunks leave a hole or the byte count is wrong."
            )


class ChunkAssembler(ChunkPlacement):
    """Writes byte chunks into a preallocated flat array, checking they tile it exactly."""

    def __init__(self, out: np.ndarray) -> None:
        super().__init__(out.nbytes, out.dtype.itemsize)
        self.out = out

    def add(self, offset: int, data: bytes | memoryview) -> np.ndarray:
        """Copy one chunk into place; returns the element view it was written to."""
        view = memoryview(data)
        target = self.place(offset, view.nbytes)
        dst = self.out[target]
        if view.nbytes:
            dst[...] = np.frombuffer(view, dtype=self.out.dtype)
        return dst


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[tuple[str, int]]:
    """gRPC options used by both ends: message limits and HTTP/2 flow-control tuning.

    A 2 MiB stream window (lookahead) and a large write buffer let a 1 MiB chunk flow
    without stalling on window updates. The window stays fixed (no BDP probing): it
    bounds what a server buffers per stream, so eight 40 MB pushes at once cost a few
    MB each rather than tens (benchmarks/bench_transport.py: same throughput, 20-50 MB
    less peak memory than an 8 MiB window that BDP probing may grow).
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.http2.lookahead_bytes", 2 << 20),
        ("grpc.http2.write_buffer_size", 4 << 20),
        ("grpc.http2.max_frame_size", 1 << 20),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.experimental.tcp_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
    ]


# A client pings a server that has sent nothing for KEEPALIVE_MS during a call, and
# drops the connection (UNAVAILABLE) when the ping goes unanswered.
KEEPALIVE_MS = 10_000


def client_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, int]]:
    """Channel options of a client. Keepalive makes a server whose host vanished (no
    connection refused, no reset: silence) an UNAVAILABLE about 20 s after the first
    unanswered ping (grpcio's own ping timeout sets the floor), so callers look for the
    server elsewhere; without it a long-poll simply times out and
    is tried again on the dead connection until TCP gives up, many minutes later."""
    return [
        *channel_options(max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.http2.ping_timeout_ms", keepalive_ms),  # grpcio enforces this one
        ("grpc.http2.max_pings_without_data", 0),  # a long-poll receives no data
    ]


def server_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive_ms: int = KEEPALIVE_MS
) -> list[tuple[str, int]]:
    """Options of the gRPC server: the shared ones, and room for the pings of clients
    whose keepalive interval is `keepalive_ms` or longer."""
    return [
        *channel_options(max_message_bytes),
        # accept a client's pings during a silent long-poll (by default one per 5 min;
        # the third early one gets a GOAWAY "too_many_pings" that ends every call)
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        # grpcio sets SO_REUSEPORT by default: a second server on a taken port would bind
        # without error and the kernel would split the clients between the two
        ("grpc.so_reuseport", 0),
    ]


# ---- hand-written framing of the chunk messages -------------------------------------
# PullWeightsResponse and PushGradientRequest share one shape: field 1 = header
# (a message), field 2 = int64 byte offset, field 3 = bytes data, field 4 = padding.
# Encoding and decoding them by hand (still valid protobuf, so reflection tools can
# read them) avoids two copies of every chunk that the generic protobuf path makes.
# The padding puts `data` at a 16-byte boundary of the message. A received message is
# a Python bytes object whose contents start 16-byte aligned, so the floats read in
# place are aligned too: NumPy runs unaligned float32 data through slower loops (about
# twice the time for a 1 MB multiply or finiteness check, bench_server_step.py).


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


DATA_ALIGNMENT = 16


def encode_chunk_message(offset: int, data: bytes | memoryview, header: bytes = b"") -> bytes:
    """Serialise {header, offset, data} as protobuf with a single copy of `data`, which
    starts at a multiple of `DATA_ALIGNMENT` bytes into the message."""
    parts: list[bytes | memoryview] = []
    if header:
        parts += [b"\x0a", _varint(len(header)), header]
    if offset:
        parts += [b"\x10", _varint(offset)]
    n = memoryview(data).nbytes
    if n:
        length = _varint(n)
        start = sum(len(p) for p in parts) + 1 + len(length)
        if start % DATA_ALIGNMENT:  # a padding field: its tag, its length, then zeros
            pad = -(start + 2) % DATA_ALIGNMENT
            parts += [b"\x22", _varint(pad), bytes(pad)]
        parts += [b"\x1a", length, data]
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("the message is truncated or malformed.")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


# Fields a chunk message may carry besides its four: enough for later protocol versions,
# few enough that a message of nothing but tiny unknown fields is refused, not walked.
MAX_UNKNOWN_FIELDS = 64


def decode_chunk_message(raw: bytes) -> tuple[memoryview | None, int, memoryview]:
    """Parse {header, offset, data} without copying; unknown fields are skipped (at most
    `MAX_UNKNOWN_FIELDS`: the walk is Python, so their number is what it costs)."""
    buf = memoryview(raw)
    header, offset, data = None, 0, buf[0:0]
    pos, end, fields = 0, len(buf), 0
    while pos < end:
        fields += 1
        if fields > 4 + MAX_UNKNOWN_FIELDS:
            raise WireError(f"the message has more than {MAX_UNKNOWN_FIELDS} unknown fields.")
        key, pos = _read_varint(buf, pos)
        field_no, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            if field_no == 2:
                offset = value - (1 << 64) if value >= 1 << 63 else value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise WireError("the message is truncated or malformed.")
            piece = buf[pos : pos + length]
            pos += length
            if field_no == 1:
                header = piece
            elif field_no == 3:
                data = piece
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise WireError("the message is truncated or malformed.")
        if pos > end:
            raise WireError("the message is truncated or malformed.")
    return header, offset, data
