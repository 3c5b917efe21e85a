"""gradfleet.client: what a person touches — ``train()``, ``JobConfig``, the SDK and the CLI.

from gradfleet.client import JobConfig, train
result = train(job, backend="local")   # or backend="ray"

The names load on first use, so the ``gradfleet`` command starts without gRPC or NumPy
work it does not need (and can set gRPC's log level before gRPC is imported).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradfleet.client.errors import (
        GradfleetError,
        InvalidArgument,
        JobExists,
        JobNotFound,
        ResourceExhausted,
        ServerUnavailable,
        StaleGradient,
        Unauthenticated,
    )
    from gradfleet.client.sdk import Client, JobHandle, JobStatus
    from gradfleet.client.training import train
    from gradfleet.worker.config import JobConfig
    from gradfleet.worker.datasets import ArrayDataset, load_dataset
    from gradfleet.worker.result import TrainResult

_WHERE = {
    "ArrayDataset": "gradfleet.worker.datasets",
    "Client": "gradfleet.client.sdk",
    "GradfleetError": "gradfleet.client.errors",
    "InvalidArgument": "gradfleet.client.errors",
    "JobConfig": "gradfleet.worker.config",
    "JobExists": "gradfleet.client.errors",
    "JobHandle": "gradfleet.client.sdk",
    "JobNotFound": "gradfleet.client.errors",
    "JobStatus": "gradfleet.client.sdk",
    "ResourceExhausted": "gradfleet.client.errors",
    "ServerUnavailable": "gradfleet.client.errors",
    "StaleGradient": "gradfleet.client.errors",
    "TrainResult": "gradfleet.worker.result",
    "Unauthenticated": "gradfleet.client.errors",
    "load_dataset": "gradfleet.worker.datasets",
    "train": "gradfleet.client.training",
}
__all__ = [
    "ArrayDataset",
    "Client",
    "GradfleetError",
    "InvalidArgument",
    "JobConfig",
    "JobExists",
    "JobHandle",
    "JobNotFound",
    "JobStatus",
    "ResourceExhausted",
    "ServerUnavailable",
    "StaleGradient",
    "TrainResult",
    "Unauthenticated",
    "load_dataset",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gradfleet.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
