"""The errors the SDK raises: gradfleet's one exception hierarchy, typed by reason."""

from gradfleet.proto.errors import (
    DataLoss,
    DeadlineExceeded,
    FutureStep,
    GradfleetError,
    InvalidArgument,
    JobExists,
    JobNotFound,
    JobStopped,
    ResourceExhausted,
    ServerUnavailable,
    StaleGradient,
    Unauthenticated,
    WrongState,
)

__all__ = [
    "DataLoss",
    "DeadlineExceeded",
    "FutureStep",
    "GradfleetError",
    "InvalidArgument",
    "JobExists",
    "JobNotFound",
    "JobStopped",
    "ResourceExhausted",
    "ServerUnavailable",
    "StaleGradient",
    "Unauthenticated",
    "WrongState",
]
