"""gradfleet.client: what a person touches — ``train()``, ``JobConfig``, the SDK and the CLI.

from gradfleet.client import JobConfig, train
result = train(job, backend="local")   # or backend="ray"
"""

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
