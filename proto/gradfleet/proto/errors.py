"""One exception hierarchy for the whole system, typed by `Reason`.

The server raises these; its gRPC edge sends the status code and the reason (the proto's
`ErrorReason`, in the call's rich status details); the client raises the same class from
the reason it receives. Workers, the trainer and the SDK catch errors by type
(`except StaleGradient:`), never by comparing strings. Every exception pickles, since
Ray ships them between processes.
"""

from __future__ import annotations

import enum
from typing import Any

import grpc


class Reason(enum.Enum):
    """Why a call failed; the value is the label in counters and metrics."""

    NOT_FOUND = "not_found"
    BAD_CONFIG = "bad_config"
    BAD_WORKER = "bad_worker"
    BAD_ROWS = "bad_rows"
    NON_FINITE = "non_finite"
    BAD_DTYPE = "bad_dtype"
    BAD_LAYOUT = "bad_layout"
    BAD_BYTES = "bad_bytes"
    BAD_STEP = "bad_step"
    BAD_HEADER = "bad_header"
    FUTURE_STEP = "future_step"
    STALE = "stale"
    STOPPED = "stopped"
    BAD_VERSION = "bad_version"
    NO_CHECKPOINT_DIR = "no_checkpoint_dir"
    JOB_TOO_LARGE = "job_too_large"
    TOO_MANY_STREAMS = "too_many_streams"
    RECEIVE_BUSY = "receive_busy"
    JOB_EXISTS = "job_exists"
    SHUTDOWN = "shutdown"
    DEADLINE = "deadline"
    UNAUTHENTICATED = "unauthenticated"
    USE_STREAM = "use_stream"
    UNREACHABLE = "unreachable"  # client side: no server answered at the address
    DATA_LOSS = "data_loss"  # client side: the server's answer was malformed


class GradfleetError(Exception):
    """Base of every gradfleet error: one readable sentence, a status code and a reason."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: Reason | None = None

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.reason))

    def __str__(self) -> str:
        return self.message


class JobNotFound(GradfleetError):
    """No job with that id on the server (or it was deleted)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = Reason.NOT_FOUND


class InvalidArgument(GradfleetError):
    """A value was refused: a config, a shape, a dtype, a byte count, a NaN."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class WrongState(GradfleetError):
    """The request does not fit the job's current state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleGradient(WrongState):
    """An async gradient older than the job's staleness bound: pull and compute again."""

    default_reason = Reason.STALE


class FutureStep(WrongState):
    """A gradient for a version the job has not reached (it went back to a checkpoint)."""

    default_reason = Reason.FUTURE_STEP


class JobStopped(WrongState):
    """The job was stopped (by a user, or because training diverged)."""

    default_reason = Reason.STOPPED


class ResourceExhausted(GradfleetError):
    """Over one of the server's size or concurrency limits."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class JobExists(GradfleetError):
    """A job with that id exists with a different configuration."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = Reason.JOB_EXISTS


class ServerUnavailable(GradfleetError):
    """No server answered, or it is shutting down: worth trying again shortly."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GradfleetError):
    """What the call waited for did not happen before its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = Reason.DEADLINE


class Unauthenticated(GradfleetError):
    """The token is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = Reason.UNAUTHENTICATED


class TrainingDiverged(GradfleetError):
    """The loss or the gradients stopped being finite: the learning rate is too high (or
    the data holds NaN/Inf). Raised by the workers and local mode; never a wire status."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    @classmethod
    def at_step(cls, step: int, what: str) -> TrainingDiverged:
        """The one sentence every backend says when step `step` (1-based) diverged:
        `what` is "loss" (not finite) or "gradients" (their sum overflowed)."""
        happened = "loss became NaN" if what == "loss" else "the gradients overflowed"
        return cls(f"{happened} at step {step}; try a lower learning rate")


class DataLoss(GradfleetError):
    """The server's answer was malformed or incomplete."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = Reason.DATA_LOSS


_CLASS_OF_REASON: dict[Reason, type[GradfleetError]] = {
    Reason.STALE: StaleGradient,
    Reason.FUTURE_STEP: FutureStep,
    Reason.STOPPED: JobStopped,
}
_CLASS_OF_CODE: dict[grpc.StatusCode, type[GradfleetError]] = {
    cls.code: cls
    for cls in (
        JobNotFound,
        InvalidArgument,
        WrongState,
        ResourceExhausted,
        JobExists,
        ServerUnavailable,
        DeadlineExceeded,
        Unauthenticated,
        DataLoss,
    )
}


def error_for(code: grpc.StatusCode, message: str, reason: Reason | None) -> GradfleetError:
    """The exception a failed call stands for: by its reason where one class owns it, else
    by its status code."""
    kind = _CLASS_OF_REASON.get(reason) if reason is not None else None
    kind = kind or _CLASS_OF_CODE.get(code, GradfleetError)
    return kind(message, reason)
