"""The SDK's exceptions: one hierarchy, mapped from gRPC status codes, each saying what to do."""

from __future__ import annotations

from typing import Any

from gradfleet.worker.ps_client import ParameterServerError


class GradfleetError(Exception):
    """Base of every error the SDK raises; the message is one readable sentence."""

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling (Ray ships exceptions)
        return (type(self), self.args)


class JobNotFound(GradfleetError):
    """No job with that id on the server."""


class InvalidArgument(GradfleetError):
    """The server refused a value: shape, dtype, config, non-finite gradient, ..."""


class Unauthenticated(GradfleetError):
    """The token is missing or wrong."""


class ServerUnavailable(GradfleetError):
    """The server cannot be reached."""


class StaleGradient(GradfleetError):
    """A gradient (or request) no longer fits the job's state."""


class ResourceExhausted(GradfleetError):
    """Over a size or concurrency limit of the server."""


class JobExists(GradfleetError):
    """A job with that id exists with a different configuration."""


_BY_CODE: dict[str, tuple[type[GradfleetError], str]] = {
    "NOT_FOUND": (JobNotFound, "check the id with `gradfleet status`"),
    "INVALID_ARGUMENT": (InvalidArgument, "fix the value named above"),
    "UNAUTHENTICATED": (Unauthenticated, "pass the server's token (token= or --token-file)"),
    "UNAVAILABLE": (ServerUnavailable, "is `gradfleet server` running?"),
    "FAILED_PRECONDITION": (StaleGradient, "pull the current weights and retry"),
    "RESOURCE_EXHAUSTED": (ResourceExhausted, "send less at once or raise the server's limit"),
    "ALREADY_EXISTS": (JobExists, "choose another job id"),
}


def from_server_error(exc: ParameterServerError) -> GradfleetError:
    """The SDK exception for a failed call, with the server's sentence and a hint."""
    kind, hint = _BY_CODE.get(exc.code, (GradfleetError, f"the server said {exc.code}"))
    message = exc.message.rstrip(".")
    return kind(f"{message} ({hint})")
