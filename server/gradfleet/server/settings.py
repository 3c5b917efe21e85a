"""A job's settings: the spec a client sends, validated once, and the model it describes."""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from gradfleet.proto.codecs import Codec
from gradfleet.proto.errors import InvalidArgument, Reason
from gradfleet.proto.partition import Partition
from gradfleet.proto.wire import FlatLayout, WireError

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INT32 = 2**31 - 1


class Mode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise InvalidArgument(
            f"job id {job_id!r} is invalid; use 1-64 letters, digits, '_', '.' or '-'.",
            Reason.BAD_CONFIG,
        )
    return job_id


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, Reason.BAD_CONFIG)


def _json_object(text: str, what: str, required: bool) -> dict:
    if not text:
        if required:
            raise _bad(f"{what} is missing; send a JSON object.")
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _bad(f"{what} is not valid JSON ({exc}).") from None
    except RecursionError:
        raise _bad(f"{what} nests too deeply to be a config.") from None
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object.")
    return value


@dataclass(frozen=True)
class JobSpec:
    """What a client asks for, as sent (JSON kept as text so it is returned unchanged)."""

    model_spec_json: str = ""
    optimizer_json: str = ""
    mode: Mode = Mode.SYNC
    num_workers: int = 0
    backup_workers: int = 0
    staleness_bound: int = 0
    checkpoint_every: int = 0
    total_steps: int = 0
    seed: int = 0
    job_config_json: str = ""
    keep_every: int = 0
    shard_index: int = 0
    shard_bounds: tuple[int, ...] = ()  # S + 1 element bounds when one of S shards
    compression: str = ""  # the gradients' codec (gradfleet.proto.codecs); "" is none
    pull_compression: str = ""  # the pulled weights' codec
    min_workers: int = 0  # elastic membership bounds; 0 = num_workers
    max_workers: int = 0
    global_batch: int = 0  # rows every step's members split evenly; 0 = rows per worker
    member_grace_seconds: float = 0.0  # a silent member is removed after this; 0 = never

    def to_json(self) -> dict[str, Any]:
        """The form checkpoints store: proto field names, the mode as its proto enum name."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mode"] = f"MODE_{self.mode.name}"
        out["shard_bounds"] = list(self.shard_bounds)
        return out

    @property
    def partition(self) -> Partition | None:
        """The job's partition over shards, when this server holds one range of it."""
        return Partition(self.shard_bounds) if self.shard_bounds else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        """Read `to_json()` output (and protobuf's JSON form: int64 as strings, defaults
        omitted), as older checkpoints hold."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown job spec field {key!r}")
            if key == "mode":
                name = str(value).removeprefix("MODE_")
                values[key] = Mode.SYNC if name == "UNSPECIFIED" else Mode[name]
            elif key == "shard_bounds":
                values[key] = tuple(int(b) for b in value)
            elif key.endswith("_json") or key.endswith("compression"):
                values[key] = str(value)
            elif key == "member_grace_seconds":
                values[key] = float(value)
            else:
                values[key] = int(value)
        return cls(**values)


@dataclass(frozen=True)
class JobSettings:
    """A validated JobSpec: every number in range, the JSON parsed."""

    spec: JobSpec
    model_spec: dict = field(compare=False)
    optimizer: dict
    job_config: dict = field(compare=False)

    @classmethod
    def validate(cls, spec: JobSpec) -> JobSettings:
        """Check every setting; raises InvalidArgument naming the first bad one."""
        if spec.num_workers < 1:
            raise _bad("num_workers must be at least 1.")
        if not 0 <= spec.backup_workers < spec.num_workers:
            raise _bad("backup_workers must be at least 0 and less than num_workers.")
        if spec.staleness_bound < 0:
            raise _bad("staleness_bound must be 0 or more.")
        if spec.checkpoint_every < 0:
            raise _bad("checkpoint_every must be 0 (off) or more.")
        if spec.total_steps < 1:
            raise _bad("total_steps must be at least 1.")
        if spec.keep_every < 0:
            raise _bad("keep_every must be 0 (off) or more.")
        if spec.shard_bounds:
            try:
                partition = Partition(spec.shard_bounds)
            except WireError as exc:
                raise _bad(str(exc)) from None
            if not 0 <= spec.shard_index < partition.shards:
                raise _bad(f"shard {spec.shard_index} is not one of the {partition.shards}.")
        try:
            Codec.parse(spec.compression)
            pull = Codec.parse(spec.pull_compression)
        except ValueError as exc:
            raise _bad(str(exc)) from None
        if pull.name not in ("none", "bf16", "fp16"):
            raise _bad(f"pull_compression must be none, bf16 or fp16, got {pull}.")
        for name in ("num_workers", "backup_workers", "staleness_bound", "checkpoint_every"):
            if getattr(spec, name) > _INT32:
                raise _bad(f"{name} must be at most {_INT32}.")
        low = spec.min_workers or spec.num_workers
        high = spec.max_workers or spec.num_workers
        if not 1 <= low <= spec.num_workers <= high:
            raise _bad("min_workers <= num_workers <= max_workers must hold (0: num_workers).")
        if spec.global_batch < 0 or (spec.global_batch and spec.global_batch % spec.num_workers):
            raise _bad("global_batch must be 0 (rows per worker) or a multiple of num_workers.")
        if not (math.isfinite(spec.member_grace_seconds) and spec.member_grace_seconds >= 0):
            raise _bad("member_grace_seconds must be 0 (never) or a positive number.")
        return cls(
            spec=spec,
            model_spec=_json_object(spec.model_spec_json, "model_spec_json", required=True),
            optimizer=_json_object(spec.optimizer_json, "optimizer_json", required=True),
            job_config=_json_object(spec.job_config_json, "job_config_json", required=False),
        )

    def same_job(self, other: JobSettings) -> bool:
        """Whether `other` asks for this job: the same settings, the model spec and the
        optimiser compared parsed (job_config is metadata)."""
        mine, theirs = self.spec, other.spec
        numbers = [f.name for f in fields(JobSpec) if not f.name.endswith("_json")]
        return (
            all(getattr(mine, n) == getattr(theirs, n) for n in numbers)
            and self.model_spec == other.model_spec
            and self.optimizer == other.optimizer
        )

    @property
    def mode(self) -> Mode:
        return self.spec.mode

    @property
    def codec(self) -> Codec:
        return Codec.parse(self.spec.compression)

    @property
    def pull_codec(self) -> Codec:
        return Codec.parse(self.spec.pull_compression)

    @property
    def num_workers(self) -> int:
        return self.spec.num_workers

    @property
    def min_workers(self) -> int:
        return self.spec.min_workers or self.spec.num_workers

    @property
    def max_workers(self) -> int:
        return self.spec.max_workers or self.spec.num_workers

    @property
    def total_steps(self) -> int:
        return self.spec.total_steps


def build_optimizer(config: dict) -> Any:
    from gradfleet.nn.optim import make_optimizer

    try:
        return make_optimizer(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise _bad(f"optimizer config is invalid: {exc}") from None


def model_nbytes(model_spec: dict) -> int:
    """Bytes of a model's weights from its spec alone, so a size limit is checked before
    any memory is allocated for it."""
    from gradfleet.nn.mlp import parameter_count

    try:
        sizes = [int(s) for s in model_spec["sizes"]]
        itemsize = np.dtype(model_spec.get("dtype", "float32")).itemsize
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"model spec is invalid: {exc}") from None
    return itemsize * parameter_count(sizes)


def initial_weights(model_spec: dict) -> tuple[FlatLayout, np.ndarray]:
    """The model's layout and its initial flat weights (the model's own buffer, no copy)."""
    from gradfleet.nn import MLP

    try:
        model = MLP.from_spec(model_spec)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise _bad(f"model spec is invalid: {exc}") from None
    try:
        layout = FlatLayout.from_arrays(model.unflatten(model.flat))
    except WireError as exc:
        raise _bad(f"the model's weights cannot be laid out: {exc}") from None
    return layout, model.flat
