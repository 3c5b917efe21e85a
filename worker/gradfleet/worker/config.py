"""JobConfig: one training job, validated on construction, loadable from TOML."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from gradfleet.nn import MLP
from gradfleet.nn.losses import LOSSES
from gradfleet.nn.optim import Optimizer, make_optimizer
from gradfleet.worker.batches import steps_per_epoch
from gradfleet.worker.datasets import ArrayDataset, load_dataset
from gradfleet.worker.ray_data import RayDataset

Dataset: TypeAlias = ArrayDataset | RayDataset

MODES = ("sync", "async")
_INT32, _INT64 = 2**31 - 1, 2**63 - 1


@dataclass
class JobConfig:
    """Everything that defines a training job; every wrong value raises ValueError.

    ``batch_size`` is the global batch: each of ``workers`` workers computes on
    ``batch_size / workers`` rows of its own shard per step. Give ``epochs`` or ``steps``.
    """

    model: MLP | dict[str, Any]
    dataset: Dataset | str
    loss: str = "cross_entropy"
    optimizer: dict[str, Any] | Optimizer = field(
        default_factory=lambda: {"name": "sgd", "lr": 0.1}
    )
    batch_size: int = 64
    epochs: int | None = None
    steps: int | None = None
    workers: int = 1
    mode: str = "sync"
    backup_workers: int = 0
    staleness_bound: int = 4
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    dtype: str | None = None
    name: str = "job"

    def __post_init__(self) -> None:
        if not isinstance(self.model, MLP | dict):
            raise ValueError(f"model must be an MLP or its spec (a dict), got {self.model!r}")
        spec = self.model.spec() if isinstance(self.model, MLP) else dict(self.model)
        if self.dtype is not None:
            if not isinstance(self.dtype, str):
                raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
            spec["dtype"] = self.dtype
        try:
            self.model_spec = MLP.from_spec(spec).spec()  # validates the spec
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"model spec is invalid: {exc}") from None
        self.dtype = self.model_spec["dtype"]
        if isinstance(self.optimizer, Optimizer):
            self.optimizer = self.optimizer.config()
        make_optimizer(self.optimizer)  # validates the settings
        if isinstance(self.dataset, str | Path):
            self.dataset = load_dataset(self.dataset)
        if not isinstance(self.dataset, Dataset):
            raise ValueError(
                "dataset must be an ArrayDataset, a RayDataset or a dataset name/path, "
                f"got {self.dataset!r}"
            )
        self._check_numbers()
        self._check_data()

    @property
    def optimizer_settings(self) -> dict[str, Any]:
        """The optimiser as JSON-like settings (an ``Optimizer`` given is turned into them)."""
        assert isinstance(self.optimizer, dict)
        return self.optimizer

    def _check_numbers(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose one of {LOSSES}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("seed", "backup_workers", "staleness_bound", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        # what the server's job spec can carry (int32 fields; seed and steps are int64)
        limits = {"workers": _INT32, "backup_workers": _INT32, "staleness_bound": _INT32}
        limits |= {"checkpoint_every": _INT32, "seed": _INT64}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise ValueError(f"{name} must be at most {limit}, got {getattr(self, name)}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by workers {self.workers}: "
                f"each worker must get the same number of rows"
            )
        if self.backup_workers >= self.workers:
            raise ValueError(
                f"backup_workers ({self.backup_workers}) must be fewer than workers "
                f"({self.workers})"
            )
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT64
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _check_data(self) -> None:
        data = self.dataset
        assert isinstance(data, Dataset)
        sizes = self.model_spec["sizes"]
        if data.num_features != sizes[0]:
            raise ValueError(
                f"the dataset has {data.num_features} features but the model's input size is "
                f"{sizes[0]}: make the first of model sizes {data.num_features}"
            )
        if self.loss == "cross_entropy":
            data.check_labels(sizes[-1])
            if isinstance(data, ArrayDataset):
                data.y = data.y.astype(np.int64)
                if data.y_val is not None:
                    data.y_val = data.y_val.astype(np.int64)
            if data.classes() > sizes[-1]:
                raise ValueError(
                    f"the dataset has {data.classes()} classes but the model has "
                    f"{sizes[-1]} outputs"
                )
        elif isinstance(data, ArrayDataset) and not (
            data.y.shape[1:] == (sizes[-1],) or (data.y.ndim == 1 and sizes[-1] == 1)
        ):
            raise ValueError(
                f"loss {self.loss!r} needs targets of shape (rows, {sizes[-1]}) to match the "
                f"model's outputs, got {data.y.shape}"
            )
        data.astype(self.dtype)
        steps_per_epoch(self.shard_size, self.rows_per_worker)  # enough rows per shard

    @property
    def rows_per_worker(self) -> int:
        return self.batch_size // self.workers

    @property
    def shard_size(self) -> int:
        assert isinstance(self.dataset, Dataset)
        return self.dataset.num_rows // self.workers

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.shard_size, self.rows_per_worker)

    @property
    def total_steps(self) -> int:
        """Updates the job applies: one per closed step in sync mode, one per gradient in
        async mode (so ``epochs`` means the same passes over the data in both)."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        per_epoch = self.steps_per_epoch * (self.workers if self.mode == "async" else 1)
        return self.epochs * per_epoch

    def summary(self) -> dict[str, Any]:
        """The JSON-serialisable settings (model spec, no data arrays): saved with each run."""
        data = self.dataset
        assert isinstance(data, Dataset)
        return {
            "name": self.name,
            "model": self.model_spec,
            "dataset": data.name,
            "loss": self.loss,
            "optimizer": self.optimizer_settings,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "steps": self.total_steps,
            "workers": self.workers,
            "mode": self.mode,
            "backup_workers": self.backup_workers,
            "staleness_bound": self.staleness_bound,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
            "seed": self.seed,
            # the features' training-time standardisation, so a model exported from the
            # server transforms raw rows the way training did
            "preprocessing": {k: v.tolist() for k, v in data.stats.items()},
        }

    def server_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``ParameterServerClient.create_job`` for this job."""
        return {
            "model_spec": self.model_spec,
            "optimizer": self.optimizer_settings,
            "mode": self.mode,
            "num_workers": self.workers,
            "backup_workers": self.backup_workers,
            "staleness_bound": self.staleness_bound,
            "checkpoint_every": self.checkpoint_every,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "job_config": self.summary(),
        }

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> JobConfig:
        """Read a job from TOML; ``overrides`` replace top-level keys (e.g. from the CLI)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(table | {k: v for k, v in overrides.items() if v is not None}, path)

    @classmethod
    def from_dict(cls, table: dict[str, Any], source: str | Path = "config") -> JobConfig:
        """Build from plain data: ``model`` and ``optimizer`` tables, ``dataset`` a name/path
        or a table of ``load_dataset`` options (``source`` plus options)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        settings = dict(table)
        if "model" not in settings or "dataset" not in settings:
            raise ValueError(f"{source}: needs a [model] table and a dataset")
        model = settings["model"]
        if not isinstance(model, dict):
            raise ValueError(f"{source}: model must be a table like {{sizes = [64, 32, 10]}}")
        settings["model"] = {"type": "MLP", **model}
        dataset = settings["dataset"]
        if isinstance(dataset, dict):
            options = dict(dataset)
            if "source" not in options:
                raise ValueError(f"{source}: the dataset table needs a 'source' (name or path)")
            settings["dataset"] = load_dataset(options.pop("source"), **options)
        elif not isinstance(dataset, str):
            raise ValueError(f"{source}: dataset must be a name, a path or a table")
        return cls(**settings)
