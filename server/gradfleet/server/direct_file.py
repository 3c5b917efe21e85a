"""A write-only file that bypasses the page cache (``O_DIRECT``) where the OS allows it.

A checkpoint of a large model puts tens of megabytes on disk per write. Through the page
cache the kernel copies every byte into pages of its own, on the cores the data path
needs; with ``O_DIRECT`` the disk reads them from an aligned staging buffer, and the
copy into that buffer releases the GIL. Where the OS or the filesystem refuses
``O_DIRECT``, the same calls write through the page cache."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from types import TracebackType

import numpy as np

BLOCK = 1 << 12  # a multiple of the logical block size of the disks in use
STAGING = 1 << 22  # bytes handed to the disk per write
_THREAD = threading.local()  # a staging buffer per thread, kept: a new one faults in anew


class DirectFile:
    """Writes to the open descriptor `fd` (owned from here on) from offset 0 through its
    thread's aligned staging buffer (so one at a time per thread); `sync` makes what was
    written durable, `close` lets go. O_DIRECT goes on when the staging buffer first
    fills: a smaller file goes through the page cache whole, since for a few blocks
    padding and cutting cost more than the kernel's copy. ``direct=False`` always writes
    through the page cache, as a filesystem without O_DIRECT does."""

    def __init__(self, fd: int, direct: bool = True) -> None:
        self._fd = fd
        if not hasattr(_THREAD, "staging"):
            _THREAD.staging = mmap.mmap(-1, STAGING)  # page-aligned, as O_DIRECT requires
        self._staging: mmap.mmap = _THREAD.staging
        self._bytes = np.frombuffer(self._staging, dtype=np.uint8)
        self._filled = self._size = 0
        self._try_direct, self.direct = direct, False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Stage `data`; full staging buffers go to the disk. Returns its length."""
        source = np.frombuffer(data, dtype=np.uint8)  # copies below release the GIL
        done = 0
        while done < source.size:
            take = min(STAGING - self._filled, source.size - done)
            self._bytes[self._filled : self._filled + take] = source[done : done + take]
            self._filled += take
            done += take
            if self._filled == STAGING:
                if self._try_direct:
                    self.direct, self._try_direct = _set_direct(self._fd, True), False
                self._flush()
        self._size += source.size
        return int(source.size)

    def sync(self) -> None:
        """Write the staged tail, cut the file to the bytes written, and fsync it."""
        tail = self._filled
        if self.direct:
            self._filled = -(-tail // BLOCK) * BLOCK  # whole blocks; the padding is cut
            self._bytes[tail : self._filled] = 0
        padded = self._filled != tail
        if self._filled:
            self._flush()  # may fall back to the page cache, padding and all
        if padded:
            os.ftruncate(self._fd, self._size)
        os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _flush(self) -> None:
        with memoryview(self._staging) as whole, whole[: self._filled] as view:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:  # a filesystem that took the flag but not the write
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self._fd, False)
                written = os.write(self._fd, view)
            while written < len(view):
                written += os.write(self._fd, view[written:])
        self._filled = 0


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; returns whether it is on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    import fcntl  # POSIX only, like O_DIRECT

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on
