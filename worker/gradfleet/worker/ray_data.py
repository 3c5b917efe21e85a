"""Cluster-scale input: training rows in a ``ray.data.Dataset``, sharded by Ray Data.

The driver only reads the schema and a few aggregates (row count, label range); Ray
Data splits the rows into equal, ordered shards in the object store, and each worker
turns its own shard into arrays. Large inputs never pass through the driver.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradfleet.worker.datasets import ArrayDataset

_READERS = {".csv": "read_csv", ".parquet": "read_parquet", ".json": "read_json"}


@dataclass
class RayDataShard:
    """One worker's rows: a split of the dataset and how to turn it into (x, y)."""

    dataset: Any
    feature_columns: list[str]
    label_column: str
    dtype: str

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        columns: dict[str, list[np.ndarray]] = {
            c: [] for c in (*self.feature_columns, self.label_column)
        }
        for batch in self.dataset.iter_batches(batch_format="numpy", batch_size=None):
            for column, values in columns.items():
                values.append(batch[column])
        x = np.column_stack([np.concatenate(columns[c]) for c in self.feature_columns])
        y = np.concatenate(columns[self.label_column])
        bad = ~np.isfinite(x)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            name = self.feature_columns[column]
            raise ValueError(f"column {name!r}, row {row} of this shard is {x[row, column]}")
        if y.dtype.kind == "f":  # the driver checked the range; whole numbers are checked here
            fractional = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
            if fractional.size:
                row = fractional[0]
                raise ValueError(
                    f"label column {self.label_column!r}, row {row} of this shard is {y[row]}, "
                    "not a class index"
                )
        return x.astype(self.dtype), y.astype(np.int64)


@dataclass
class RayDataset:
    """Training rows in a Ray Dataset (features in columns, integer labels in one column).

    ``validation`` (small: evaluated on the driver) may be a Ray Dataset with the same
    columns or an ``ArrayDataset``.
    """

    dataset: Any
    label_column: str = "label"
    feature_columns: list[str] | None = None
    validation: Any = None
    name: str = "ray-data"
    dtype: str = "float32"
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        columns = list(self.dataset.schema().names)
        if self.label_column not in columns:
            raise ValueError(
                f"{self.name}: no label column {self.label_column!r}; columns are {columns}"
            )
        if self.feature_columns is None:
            self.feature_columns = [c for c in columns if c != self.label_column]
        missing = [c for c in self.feature_columns if c not in columns]
        if missing or not self.feature_columns:
            raise ValueError(f"{self.name}: feature columns {missing or '[]'} not in {columns}")
        # One pass on the cluster for everything the checks need.
        from ray.data.aggregate import Count, Max, Min

        summary = self.dataset.aggregate(Count(), Min(self.label_column), Max(self.label_column))
        self.num_rows = int(summary["count()"])
        self._label_range = (
            summary[f"min({self.label_column})"],
            summary[f"max({self.label_column})"],
        )
        if self.num_rows == 0:
            raise ValueError(f"{self.name}: the dataset is empty")
        self._x_val: np.ndarray | None = None
        self._y_val: np.ndarray | None = None

    @classmethod
    def read(cls, path: str | Path, label_column: str = "label", **options: Any) -> RayDataset:
        """Read a CSV, Parquet or JSON path (file, folder or URI) lazily with Ray Data."""
        import ray.data

        suffix = Path(str(path)).suffix
        if suffix not in _READERS:
            raise ValueError(
                f"{path}: Ray Data sources must be {sorted(_READERS)} files or folders"
            )
        dataset = getattr(ray.data, _READERS[suffix])(str(path))
        return cls(dataset, label_column=label_column, name=str(path), **options)

    @property
    def num_features(self) -> int:
        assert self.feature_columns is not None
        return len(self.feature_columns)

    def classes(self) -> int:
        return int(self._label_range[1]) + 1

    def check_labels(self, classes: int) -> None:
        low, high = self._label_range
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"{self.name}: column {self.label_column!r} holds label {bad}, outside the "
                f"classes 0..{classes - 1}"
            )

    def with_dtype(self, dtype: Any) -> RayDataset:
        """This dataset with features read as ``dtype`` (a copy; nothing is re-read)."""
        copied = copy.copy(self)
        copied.dtype = np.dtype(dtype).name
        return copied

    def shards(self, count: int) -> list[RayDataShard]:
        """Equal, ordered shards (row i of shard s is row s * size + i); the rest is unused."""
        assert self.feature_columns is not None
        return [
            RayDataShard(part, self.feature_columns, self.label_column, self.dtype)
            for part in self.dataset.split(count, equal=True)
        ]

    def to_arrays(self) -> ArrayDataset:
        """All rows on this machine (for ``backend="local"``)."""
        x, y = self.shards(1)[0].arrays()
        return ArrayDataset(x, y, self.x_val, self.y_val, name=self.name).with_dtype(self.dtype)

    def _load_validation(self) -> None:
        if self._x_val is not None or self.validation is None:
            return
        if isinstance(self.validation, ArrayDataset):
            self._x_val, self._y_val = self.validation.x, self.validation.y
        else:
            assert self.feature_columns is not None
            shard = RayDataShard(
                self.validation, self.feature_columns, self.label_column, self.dtype
            )
            self._x_val, self._y_val = shard.arrays()
        self._x_val = self._x_val.astype(self.dtype)

    @property
    def x_val(self) -> np.ndarray | None:
        self._load_validation()
        return self._x_val

    @property
    def y_val(self) -> np.ndarray | None:
        self._load_validation()
        return self._y_val
