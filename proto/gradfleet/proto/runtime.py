"""Process-level tuning for moving megabyte tensors through gRPC in Python.

Both change no numbers, only where time goes (benchmarks/bench_transport.py and
bench_e2e.py measure them):

* `keep_message_buffers_mapped()`: glibc's allocator keeps freed megabyte buffers for reuse.
* `long_lived_objects_frozen()`: the cyclic garbage collector stops walking the objects
  that a Ray process holds for its whole life.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
_allocator_lock = threading.Lock()
_allocator_tuned = False


def keep_message_buffers_mapped() -> bool:
    """Let glibc reuse freed megabyte-sized buffers instead of unmapping them (once per process).

    By default glibc serves every allocation above 128 KiB with a fresh `mmap` and returns
    it on free, so each 1 MiB gRPC message or chunk copy faults in 256 new zeroed pages:
    on loopback that costs more than the copy itself.
    Raising the mmap threshold to its maximum (32 MiB) and the trim threshold keeps such
    buffers in the heap for reuse. Peak memory is unchanged; freed memory is kept for
    reuse rather than returned at once. Kept buffers would otherwise pile up in one arena
    per gRPC thread (up to 8 per core), so the arenas are capped at two: under 32
    concurrent pushers that keeps the server's RSS near its working set. A no-op (False)
    off glibc.
    """
    global _allocator_tuned
    with _allocator_lock:
        if _allocator_tuned:
            return True
        if not sys.platform.startswith("linux"):
            return False
        try:
            mallopt = ctypes.CDLL(None).mallopt  # glibc (musl has no mallopt)
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
        ok = mallopt(_M_TRIM_THRESHOLD, 128 << 20) == 1 and ok
        ok = mallopt(_M_ARENA_MAX, 2) == 1 and ok
        _allocator_tuned = ok
        return ok


@contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Keep the objects alive now out of the cyclic GC's full collections while inside.

    A Ray driver or worker holds some 10^5 long-lived objects; a full collection walks
    them all with the GIL held (tens of milliseconds), which stalls every RPC of the
    in-process parameter server and every worker waiting on it. `gc.freeze()` moves them
    to the permanent generation; `gc.unfreeze()` on exit hands them back, so a garbage
    cycle among them is collected later rather than never.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
