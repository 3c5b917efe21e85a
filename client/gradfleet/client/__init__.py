"""gradfleet.client: what a person touches — ``train()``, ``JobConfig``, the SDK and the CLI.

from gradfleet.client import JobConfig, train
result = train(job, backend="local")   # or backend="ray"
"""

from gradfleet.client.training import train
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset, load_dataset
from gradfleet.worker.result import TrainResult

__all__ = ["ArrayDataset", "JobConfig", "TrainResult", "load_dataset", "train"]
