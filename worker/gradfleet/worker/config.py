"""JobConfig: one training job, validated on construction, loadable from TOML.

Constructing a JobConfig checks every setting but reads no file and changes none of the
caller's objects: a dataset given by name or path stays a name until ``resolve()`` loads
it (``train()`` and the SDK do that), and arrays are converted into new arrays.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias

from gradfleet.nn import MLP
from gradfleet.nn.losses import LOSSES
from gradfleet.nn.optim import Optimizer, make_optimizer
from gradfleet.proto.codecs import Codec
from gradfleet.proto.wire import FlatLayout
from gradfleet.worker.batches import steps_per_epoch
from gradfleet.worker.datasets import ArrayDataset, load_dataset
from gradfleet.worker.elastic import POLICIES, ElasticPlan
from gradfleet.worker.ray_data import RayDataset

Dataset: TypeAlias = ArrayDataset | RayDataset
# what may be given as a dataset: a loaded one, a name or path (with load_dataset
# options in a table), or arrays (x, y) / (x, y, x_val, y_val)
DataSource: TypeAlias = Dataset | str | Path | dict | tuple

MODES = ("sync", "async")
OUTPUT_OF_LOSS = {"cross_entropy": "classes", "binary_cross_entropy": "binary", "mse": "values"}
# learning rates for an optimiser named without one (Keras's defaults)
DEFAULT_LR = {"sgd": 0.01, "adam": 0.001, "adamw": 0.001}
_INT32, _INT64 = 2**31 - 1, 2**63 - 1


@dataclass
class JobConfig:
    """Everything that defines a training job; every wrong value raises ValueError.

    ``batch_size`` is the global batch: each of ``workers`` workers computes on
    ``batch_size / workers`` rows of its own shard per step. Give ``epochs`` or ``steps``.
    ``optimizer`` is a name ("adam") or a table ({"name": "sgd", "lr": 0.1, ...}).
    ``compression`` is how gradients travel: "none", "bf16", "fp16", "sign" or
    "topk:<fraction>" (see ``gradfleet.proto.codecs``); ``pull_compression`` how the
    weights travel to the workers: "none", "bf16" or "fp16". ``overlap`` makes each
    worker send a layer's gradient as soon as backward has produced it and start the next
    forward on the first layer's weights (the numbers do not change).
    ``min_workers`` / ``max_workers`` make the job elastic: on Ray its workers follow the
    cluster's CPUs (and ``gradfleet scale``) within those bounds, and the data is read as
    ``gradfleet.worker.elastic`` says, its batch kept global or per worker
    (``elastic_batch``). ``member_grace`` (seconds) lets the server remove a worker it has
    not heard from that long while a step waits (0: never).
    """

    model: MLP | dict[str, Any]
    dataset: DataSource
    loss: str = "cross_entropy"
    optimizer: dict[str, Any] | Optimizer | str = field(
        default_factory=lambda: {"name": "sgd", "lr": 0.1}
    )
    batch_size: int = 64
    epochs: int | None = None
    steps: int | None = None
    workers: int = 2
    mode: str = "sync"
    backup_workers: int = 0
    staleness_bound: int = 4
    eval_every: int = 50
    checkpoint_every: int = 0
    seed: int = 0
    dtype: str | None = None
    name: str = "job"
    servers: int = 1
    compression: str = "none"
    pull_compression: str = "none"
    overlap: bool = False
    min_workers: int | None = None
    max_workers: int | None = None
    elastic_batch: str = "global"
    member_grace: float = 0.0

    def __post_init__(self) -> None:
        self.model_spec = _model_spec(self.model, self.dtype, OUTPUT_OF_LOSS.get(self.loss))
        self.dtype = self.model_spec["dtype"]
        self.optimizer = _optimizer_settings(self.optimizer)
        self.compression, self.pull_compression = _codecs(self.compression, self.pull_compression)
        self._check_numbers()
        self.dataset = _as_dataset(self.dataset, self.seed)
        if isinstance(self.dataset, Dataset):
            self.dataset = self._checked(self.dataset)

    @property
    def optimizer_settings(self) -> dict[str, Any]:
        """The optimiser as JSON-like settings."""
        assert isinstance(self.optimizer, dict)
        return self.optimizer

    @property
    def loaded(self) -> bool:
        return isinstance(self.dataset, Dataset)

    def resolve(self) -> JobConfig:
        """This job with its dataset loaded (itself when it already is)."""
        if isinstance(self.dataset, Dataset):
            return self
        options = dict(self.dataset) if isinstance(self.dataset, dict) else {}
        source = options.pop("source") if isinstance(self.dataset, dict) else self.dataset
        assert isinstance(source, str | Path)
        return dataclasses.replace(self, dataset=load_dataset(source, seed=self.seed, **options))

    def _check_numbers(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose one of {LOSSES}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        for name in ("batch_size", "workers", "servers"):
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
        if self.servers < 1:
            raise ValueError(f"servers must be at least 1, got {self.servers}")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be true or false, got {self.overlap!r}")
        self._check_elastic()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.batch_size % self.workers:
            lower = self.batch_size - self.batch_size % self.workers
            sizes = " or ".join(str(s) for s in (lower, lower + self.workers) if s > 0)
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by workers {self.workers}: "
                f"each worker must get the same number of rows; try batch_size {sizes}"
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

    def _check_elastic(self) -> None:
        for name in ("min_workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        low, high = self.worker_bounds
        if not 1 <= low <= self.workers <= high or high > _INT32:
            raise ValueError(
                f"min_workers <= workers <= max_workers must hold, got {low} <= "
                f"{self.workers} <= {high}"
            )
        if self.elastic_batch not in POLICIES:
            raise ValueError(f"elastic_batch must be one of {POLICIES}, got {self.elastic_batch!r}")
        grace = self.member_grace
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise ValueError(f"member_grace must be 0 (never) or seconds, got {grace!r}")
        if self.elastic and self.backup_workers >= low:
            raise ValueError(
                f"backup_workers ({self.backup_workers}) must be fewer than min_workers ({low})"
            )

    @property
    def worker_bounds(self) -> tuple[int, int]:
        """(min_workers, max_workers), each the fixed worker count when not given."""
        low = self.workers if self.min_workers is None else self.min_workers
        return low, self.workers if self.max_workers is None else self.max_workers

    @property
    def elastic(self) -> bool:
        """Whether the job's workers may change while it runs."""
        return self.worker_bounds != (self.workers, self.workers)

    def elastic_plan(self) -> ElasticPlan:
        """Which rows each member reads, step by step (elastic jobs)."""
        batch = self.batch_size if self.elastic_batch == "global" else self.rows_per_worker
        return ElasticPlan(self.seed, self.data.num_rows, self.elastic_batch, batch)

    def _checked(self, data: Dataset) -> Dataset:
        """`data` checked against the model and the loss, in the model's dtype."""
        sizes = self.model_spec["sizes"]
        if data.num_features != sizes[0]:
            raise ValueError(
                f"the dataset has {data.num_features} features but the model's input size is "
                f"{sizes[0]}: make the first of model sizes {data.num_features}"
            )
        if data.stats:  # the model standardises raw rows the way the data asks
            self.model_spec["preprocessing"] = {k: v.tolist() for k, v in data.stats.items()}
        classification = self.loss == "cross_entropy"
        if classification:
            if data.classes() > sizes[-1]:
                raise ValueError(
                    f"the dataset has {data.classes()} classes but the model has "
                    f"{sizes[-1]} outputs: make the last of model sizes {data.classes()}"
                )
            data.check_labels(sizes[-1])
        elif isinstance(data, ArrayDataset) and not (
            data.y.shape[1:] == (sizes[-1],) or (data.y.ndim == 1 and sizes[-1] == 1)
        ):
            raise ValueError(
                f"loss {self.loss!r} needs targets of shape (rows, {sizes[-1]}) to match the "
                f"model's outputs, got {data.y.shape}"
            )
        if isinstance(data, ArrayDataset):
            converted: Dataset = data.with_dtype(self.dtype, integer_labels=classification)
        else:
            converted = data.with_dtype(self.dtype)
        shard = converted.num_rows // self.workers
        steps_per_epoch(shard, self.rows_per_worker)  # enough rows per shard
        if self.elastic and not isinstance(converted, ArrayDataset):
            raise ValueError(
                "an elastic job (min_workers/max_workers) reads its rows as one stream: give "
                "it arrays or a file, not a Ray Dataset"
            )
        return converted

    @property
    def data(self) -> Dataset:
        """The loaded dataset (ValueError before `resolve()` when given by name)."""
        if not isinstance(self.dataset, Dataset):
            raise ValueError(
                f"the dataset {_source_name(self.dataset)!r} is not loaded yet: use "
                "job.resolve() (train() does)"
            )
        return self.dataset

    @property
    def rows_per_worker(self) -> int:
        return self.batch_size // self.workers

    @property
    def shard_size(self) -> int:
        return self.data.num_rows // self.workers

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
        data = self.data
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
            "servers": self.servers,
            "compression": self.compression,
            "pull_compression": self.pull_compression,
            "overlap": self.overlap,
            "min_workers": self.worker_bounds[0],
            "max_workers": self.worker_bounds[1],
            "elastic_batch": self.elastic_batch,
            "validation_split": getattr(data, "validation_split", None),
        }

    def model_layout(self) -> FlatLayout:
        """The layout of the model's flat buffer (what a sharded job is cut from)."""
        model = MLP.from_spec(self.model_spec)
        return FlatLayout.from_arrays(model.unflatten(model.flat))

    def server_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``create_job`` (of a ``ShardedClient`` when the job
        is spread over several servers) for this job."""
        sharded = {"layout": self.model_layout()} if self.servers > 1 else {}
        return sharded | {
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
            "keep_every": self.eval_every,  # the trainer evaluates exactly these versions
            "compression": self.compression,
            "pull_compression": self.pull_compression,
            "min_workers": self.worker_bounds[0],
            "max_workers": self.worker_bounds[1],
            "global_batch": self.batch_size if self.elastic_batch == "global" else 0,
            "member_grace_seconds": float(self.member_grace),
        }

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> JobConfig:
        """Read a job from TOML, its dataset loaded; ``overrides`` replace top-level keys."""
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
        """Build from plain data, its dataset loaded: ``model`` and ``optimizer`` tables,
        ``dataset`` a name or path, or a table of ``load_dataset`` options (``source``
        plus options)."""
        known = sorted(f.name for f in fields(cls))
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {known}"
                raise ValueError(f"{source}: unknown key {key!r}{hint}")
        if "model" not in table or "dataset" not in table:
            raise ValueError(f"{source}: needs a [model] table and a dataset")
        if not isinstance(table["model"], dict):
            raise ValueError(f"{source}: model must be a table like {{sizes = [64, 32, 10]}}")
        dataset = table["dataset"]
        if isinstance(dataset, dict) and "source" not in dataset:
            raise ValueError(f"{source}: the dataset table needs a 'source' (name or path)")
        if not isinstance(dataset, str | dict):
            raise ValueError(f"{source}: dataset must be a name, a path or a table")
        return cls(**table).resolve()


def _codecs(compression: Any, pull_compression: Any) -> tuple[str, str]:
    """The two codecs' canonical names; ValueError naming the setting when unknown."""
    names = []
    for setting, value in (("compression", compression), ("pull_compression", pull_compression)):
        if not isinstance(value, str):
            raise ValueError(f"{setting} must be a string such as 'bf16', got {value!r}")
        try:
            names.append(str(Codec.parse(value)))
        except ValueError as exc:
            raise ValueError(f"{setting}: {exc}") from None
    if names[1] not in ("none", "bf16", "fp16"):
        raise ValueError(f"pull_compression must be none, bf16 or fp16, got {names[1]!r}")
    return names[0], names[1]


def _model_spec(model: Any, dtype: Any, output: str | None) -> dict[str, Any]:
    """The validated spec of `model` (an MLP or a dict; "type" may be left out), with what
    its outputs mean for the job's loss."""
    if not isinstance(model, MLP | dict):
        kind = type(model).__name__
        raise ValueError(f"model must be an MLP or its spec (a dict), got a {kind}")
    spec = model.spec() if isinstance(model, MLP) else {"type": "MLP", **model}
    if dtype is not None:
        if not isinstance(dtype, str):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        spec["dtype"] = dtype
    if output is not None:
        spec["output"] = output
    try:
        return MLP.from_spec(spec).spec()
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"model spec is invalid: {exc}") from None


def _optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """Validated optimiser settings from a name, a table or an Optimizer; a name in any
    case, and the usual learning rate when none is given."""
    if isinstance(optimizer, Optimizer):
        settings = optimizer.config()
    elif isinstance(optimizer, str):
        settings = {"name": optimizer.lower()}
    elif isinstance(optimizer, dict):
        settings = dict(optimizer)
        if isinstance(settings.get("name"), str):
            settings["name"] = settings["name"].lower()
    else:
        raise ValueError(
            f"optimizer must be a name, a table or an Optimizer, got a {type(optimizer).__name__}"
        )
    if "lr" not in settings and settings.get("name") in DEFAULT_LR:
        settings["lr"] = DEFAULT_LR[settings["name"]]
    make_optimizer(settings)  # validates the settings
    return settings


def _as_dataset(data: Any, seed: int) -> DataSource:
    """A loaded dataset for arrays given as a tuple; names and paths stay as they are."""
    if isinstance(data, Dataset | str | Path | dict):
        return data
    if isinstance(data, tuple) and len(data) in (2, 4):
        if len(data) == 4:
            x, y, x_val, y_val = data
            return ArrayDataset(x, y, x_val, y_val, standardize=True, name="arrays")
        x, y = data
        return ArrayDataset(x, y, validation_split=0.2, standardize=True, seed=seed, name="arrays")
    raise ValueError(
        "dataset must be a name or path, (x, y), (x, y, x_val, y_val), an ArrayDataset or a "
        f"RayDataset; got a {type(data).__name__}"
        + (f" of {len(data)} items" if isinstance(data, tuple | list) else "")
    )


def _source_name(source: Any) -> str:
    return str(source.get("source")) if isinstance(source, dict) else str(source)
