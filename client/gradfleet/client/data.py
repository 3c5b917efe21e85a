"""Datasets: in-memory arrays, files (.npz, .npy, .csv, IDX) and scikit-learn's bundled sets.

The loaders live with the workers (which read their shards themselves); this is their
public home for users.
"""

from gradfleet.worker.datasets import (
    SKLEARN_SETS,
    ArrayDataset,
    load_csv,
    load_dataset,
    load_mnist,
    load_sklearn,
    read_idx,
)
from gradfleet.worker.ray_data import RayDataset

__all__ = [
    "SKLEARN_SETS",
    "ArrayDataset",
    "RayDataset",
    "load_csv",
    "load_dataset",
    "load_mnist",
    "load_sklearn",
    "read_idx",
]
