"""Versioned weights for pulls, while the update changes them in place.

Weights that fit one message are encoded once per version and every puller gets the same
bytes. Larger weights stream chunk by chunk from the live buffer, and a checkpoint being
written reads a version's weights off the lock (`lend`). When an update is about to
change the buffer while a stream or a checkpoint still reads it, the old buffer stays
theirs and the update goes to a copy that becomes the live weights (copy-on-write): a
reader never sees two versions, and nobody copies when no reader is left.

A job that pulls through a codec (bf16 or fp16) gets the codec's payload of the weights,
encoded once per version; the weights themselves stay in full precision.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gradfleet.proto.codecs import NO_CODEC, Codec
from gradfleet.proto.wire import FlatLayout, as_bytes_view, plan_chunk_bytes

# (version, state, membership events, byte offset, piece) -> one wire message; the first
# carries the header
Encode = Callable[[int, Any, int, int, memoryview], bytes]


class Lent:
    """A version's weights lent to a reader off the lock: never written until the reader
    calls `release()` (from any thread)."""

    __slots__ = ("released", "weights")

    def __init__(self, weights: np.ndarray) -> None:
        self.weights, self.released = weights, False

    def release(self) -> None:
        self.released = True


class WeightsPublisher:
    """Serves the weights of the current version to pulls, and of kept older versions.

    `lock` is the job's lock; `current()`, called under it, gives (version, state, the
    number of membership events).
    """

    def __init__(
        self,
        layout: FlatLayout,
        weights: np.ndarray,
        chunk_bytes: int,
        lock: threading.Lock,
        current: Callable[[], tuple[int, Any, int]],
        codec: Codec = NO_CODEC,
    ) -> None:
        self.layout, self.weights, self._lock, self._current = layout, weights, lock, current
        self.codec = codec
        self.nbytes = codec.payload_bytes(layout.total_elements, layout.dtype)
        self._payload: tuple[int, np.ndarray] | None = None  # (version, codec payload)
        self.chunk_bytes = plan_chunk_bytes(layout.nbytes, chunk_bytes, layout.dtype.itemsize)
        self.fits_one_message = layout.nbytes <= self.chunk_bytes
        self._cached: tuple[tuple[int, Any, int], bytes] | None = None  # (current(), message)
        self._readers: dict[int, int] = {}  # version -> streams reading it
        self._kept: dict[int, np.ndarray] = {}  # version -> its weights, while still read
        self._lent: list[Lent] = []
        self._saved: dict[int, np.ndarray] = {}  # version -> its weights, asked to be kept

    def one_message(self, encode: Encode) -> bytes:
        """The current weights as one message, encoded once per `current()`."""
        with self._lock:
            key = self._current()
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, encode(*key, 0, self._source(key[0])))
            return self._cached[1]

    def _source(self, version: int) -> memoryview:
        """The bytes pulls of `version` read (call under the lock): the weights, or their
        payload, encoded once per version; a payload is never written after."""
        if self.codec.name == "none":
            return as_bytes_view(self._kept.get(version, self.weights))
        if self._payload is None or self._payload[0] != version:
            self._payload = (version, self.codec.encode(self.weights))
        return as_bytes_view(self._payload[1])

    def stream(self, encode: Encode) -> Iterator[bytes]:
        """The current weights chunk by chunk, all of the version current at the first
        chunk; each is encoded under the lock, so an update in between never tears it."""
        if self.codec.name != "none":
            with self._lock:
                version, state, events = self._current()
                payload = self._source(version)  # this version's, never written again
            for start in range(0, self.nbytes, self.chunk_bytes):
                piece = payload[start : start + self.chunk_bytes]
                yield encode(version, state, events, start, piece)
            return
        with self._lock:
            version, state, events = self._current()
            self._readers[version] = self._readers.get(version, 0) + 1
        try:
            for start in range(0, self.nbytes, self.chunk_bytes):
                with self._lock:
                    piece = self._source(version)[start : start + self.chunk_bytes]
                    message = encode(version, state, events, start, piece)
                yield message
        finally:
            with self._lock:
                self._readers[version] -= 1
                if not self._readers[version]:
                    del self._readers[version]
                    self._kept.pop(version, None)

    KEEP = 4  # versions kept for exact pulls, the newest

    def keep(self, version: int) -> None:
        """Keep a copy of the current weights as `version` for exact pulls (the `KEEP`
        newest); call under the lock."""
        self._saved[version] = self.weights.copy()
        for old in sorted(self._saved)[: -self.KEEP]:
            del self._saved[old]

    def kept(self, version: int) -> np.ndarray | None:
        """The weights of `version` if kept (or current), else None; call under the lock."""
        saved = self._saved.get(version)
        if saved is None and version == self._current()[0]:
            saved = self.weights.copy()
        return saved

    def lend(self) -> Lent:
        """The current weights, unchanged until released; call under the lock."""
        lent = Lent(self.weights)
        self._lent.append(lent)
        return lent

    def before_update(self, version: int) -> np.ndarray:
        """The array to update in place to the version after `version`; call under the
        lock. While a stream or a lender still reads the live buffer, that is a copy,
        which becomes the live weights; the old buffer stays theirs."""
        self._lent = [lent for lent in self._lent if not lent.released]
        streamed = bool(self._readers.get(version)) and version not in self._kept
        if streamed or any(lent.weights is self.weights for lent in self._lent):
            if streamed:
                self._kept[version] = self.weights
            self.weights = self.weights.copy()
        return self.weights
