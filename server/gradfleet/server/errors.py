"""The server's exception hierarchy; each maps to one gRPC status code at the edge."""

from __future__ import annotations

import grpc


class ServerError(Exception):
    """Base class: `code` is the gRPC status, `reason` the metrics label."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason

    def __reduce__(self) -> tuple:
        return (type(self), (self.message, self.reason))


class JobNotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND


class JobExists(ServerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class BadRequest(ServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class WrongState(ServerError):
    """Stale or future gradients, pushes to a stopped job, unreachable min_version."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StepReset(ServerError):
    """A sync step started again after another push failed half-way: push again."""

    code = grpc.StatusCode.ABORTED


class OverLimit(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(ServerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
