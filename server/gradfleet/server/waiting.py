"""Event-driven waits: a waiter wakes because what it waits for happened, not on a timer.

A call that waits (a pull for a version, a push for a receive slot, a watch for the next
step) holds one `Waiter`. The job wakes it when its version is reached or its state
changes; the call's end (the client left) and the server's shutdown cancel it. Waits are
bounded only by the call's own deadline.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable


class Waiter:
    """One waiting call's wake-up signal.

    `arm()` under the job's lock, then check the condition, then `sleep()` outside it: a
    `wake()` or `cancel()` after `arm()` is never lost.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.cancelled = False

    def arm(self) -> None:
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    def cancel(self) -> None:
        """The call ended or the server is stopping: stop waiting for good."""
        self.cancelled = True
        self._event.set()

    def sleep(self, timeout: float | None) -> bool:
        """Block until woken (True) or `timeout` seconds pass (False)."""
        return self._event.wait(timeout)


class VersionWaiters:
    """Waiters for versions of one job: `reached(v)` wakes exactly those waiting for <= v.

    Not thread-safe on its own: the job calls it under its lock.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Waiter]] = []
        self._order = itertools.count()

    def add(self, min_version: int, waiter: Waiter) -> None:
        heapq.heappush(self._heap, (min_version, next(self._order), waiter))

    def reached(self, version: int) -> None:
        while self._heap and self._heap[0][0] <= version:
            heapq.heappop(self._heap)[2].wake()

    def discard(self, waiter: Waiter) -> None:
        """Forget a waiter that stopped waiting (timed out or cancelled)."""
        kept = [entry for entry in self._heap if entry[2] is not waiter]
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept

    def wake_all(self) -> None:
        """A change every waiter must see (the job stopped, completed or was deleted)."""
        for _, _, waiter in self._heap:
            waiter.wake()
        self._heap.clear()


def wait_until(
    lock: threading.Lock,
    ready: Callable[[], bool],
    waiters: VersionWaiters,
    version: int,
    timeout: float | None,
    waiter: Waiter,
) -> bool:
    """Block until `ready()` (checked under `lock`; it may raise) is True, waking when
    `version` is reached or every waiter is woken; False on timeout or cancellation."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            with lock:
                if ready():
                    return True
                if waiter.cancelled:
                    return False
                waiter.arm()
                waiters.add(version, waiter)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            waiter.sleep(remaining)
    finally:
        with lock:
            waiters.discard(waiter)


class FifoWaiters:
    """Waiters for a resource that frees one unit at a time: `wake_one()` wakes the
    longest waiting. Called under the owner's lock."""

    def __init__(self) -> None:
        self._queue: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, waiter: Waiter) -> None:
        self._queue.append(waiter)

    def discard(self, waiter: Waiter) -> None:
        if waiter in self._queue:
            self._queue.remove(waiter)

    def wake_one(self) -> None:
        if self._queue:
            self._queue.popleft().wake()

    def wake_all(self) -> None:
        while self._queue:
            self._queue.popleft().wake()
