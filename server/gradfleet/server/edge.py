"""What every RPC handler shares: errors as statuses, deadlines, waiters, the stream cap.

Domain errors (`gradfleet.proto.errors`) become a status code with one sentence and the
error's reason in the rich status details. A call that waits holds a `Waiter` that its
own end (the client left) and the server's shutdown cancel.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc

from gradfleet.proto.errors import GradfleetError, Reason, ResourceExhausted
from gradfleet.server import translate
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.waiting import Waiter

F = TypeVar("F", bound=Callable[..., Any])


class _Handlers(Protocol):
    metrics: ServerMetrics


def remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds a handler may wait before the call's deadline, less a fifth (at most
    0.25 s) so that its answer reaches the client before the client gives up; None when
    the call has no deadline (grpcio then reports an enormous number)."""
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(0.0, left - min(0.25, left / 5))


def status_edge(method: F) -> F:
    """Turn a GradfleetError into the call's status, and count it in the metrics."""

    def abort(self: _Handlers, context: grpc.ServicerContext, exc: GradfleetError) -> None:
        self.metrics.reject(exc.reason.value if exc.reason else "error")
        context.abort_with_status(translate.status_of(exc))

    @functools.wraps(method)
    def unary(self: _Handlers, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except GradfleetError as exc:
            abort(self, context, exc)

    @functools.wraps(method)
    def stream(self: _Handlers, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except GradfleetError as exc:
            abort(self, context, exc)

    return stream if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


class StreamLimiter:
    """Caps concurrent streaming and waiting calls; over the cap: RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        metrics.active_streams.set_function(lambda: self.active)  # read when scraped

    def __enter__(self) -> StreamLimiter:
        with self._lock:
            if self.active >= self.limit:
                raise ResourceExhausted(
                    f"the server is at its limit of {self.limit} concurrent streams; retry later.",
                    Reason.TOO_MANY_STREAMS,
                )
            self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.active -= 1


class CallWaiters:
    """The waiters of the calls in flight, so that a stopping server cancels them all."""

    def __init__(self) -> None:
        self.stopping = False
        self._waiters: weakref.WeakSet[Waiter] = weakref.WeakSet()
        self._lock = threading.Lock()

    def new(self, context: grpc.ServicerContext) -> Waiter:
        """A waiter cancelled when this call ends or the server stops."""
        waiter = Waiter()
        with self._lock:
            self._waiters.add(waiter)
            stopping = self.stopping
        if stopping or not context.add_callback(waiter.cancel):
            waiter.cancel()
        return waiter

    def cancel_all(self) -> None:
        """The server is stopping: every waiting call answers UNAVAILABLE promptly."""
        with self._lock:
            self.stopping = True
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.cancel()
