from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_SYNC: _ClassVar[Mode]
    MODE_ASYNC: _ClassVar[Mode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_STOPPED: _ClassVar[JobState]
    JOB_STATE_DELETED: _ClassVar[JobState]

class PushOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_OUTCOME_UNSPECIFIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_ACCEPTED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_DUPLICATE: _ClassVar[PushOutcome]
    PUSH_OUTCOME_DROPPED_LATE: _ClassVar[PushOutcome]
    PUSH_OUTCOME_DROPPED_REMOVED: _ClassVar[PushOutcome]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_CONFIG: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_WORKER: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_ROWS: _ClassVar[ErrorReason]
    ERROR_REASON_NON_FINITE: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_DTYPE: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_LAYOUT: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_BYTES: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_STEP: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_HEADER: _ClassVar[ErrorReason]
    ERROR_REASON_FUTURE_STEP: _ClassVar[ErrorReason]
    ERROR_REASON_STALE: _ClassVar[ErrorReason]
    ERROR_REASON_STOPPED: _ClassVar[ErrorReason]
    ERROR_REASON_BAD_VERSION: _ClassVar[ErrorReason]
    ERROR_REASON_NO_CHECKPOINT_DIR: _ClassVar[ErrorReason]
    ERROR_REASON_JOB_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_TOO_MANY_STREAMS: _ClassVar[ErrorReason]
    ERROR_REASON_RECEIVE_BUSY: _ClassVar[ErrorReason]
    ERROR_REASON_JOB_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTDOWN: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_USE_STREAM: _ClassVar[ErrorReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
MODE_UNSPECIFIED: Mode
MODE_SYNC: Mode
MODE_ASYNC: Mode
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_STOPPED: JobState
JOB_STATE_DELETED: JobState
PUSH_OUTCOME_UNSPECIFIED: PushOutcome
PUSH_OUTCOME_ACCEPTED: PushOutcome
PUSH_OUTCOME_DUPLICATE: PushOutcome
PUSH_OUTCOME_DROPPED_LATE: PushOutcome
PUSH_OUTCOME_DROPPED_REMOVED: PushOutcome
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_NOT_FOUND: ErrorReason
ERROR_REASON_BAD_CONFIG: ErrorReason
ERROR_REASON_BAD_WORKER: ErrorReason
ERROR_REASON_BAD_ROWS: ErrorReason
ERROR_REASON_NON_FINITE: ErrorReason
ERROR_REASON_BAD_DTYPE: ErrorReason
ERROR_REASON_BAD_LAYOUT: ErrorReason
ERROR_REASON_BAD_BYTES: ErrorReason
ERROR_REASON_BAD_STEP: ErrorReason
ERROR_REASON_BAD_HEADER: ErrorReason
ERROR_REASON_FUTURE_STEP: ErrorReason
ERROR_REASON_STALE: ErrorReason
ERROR_REASON_STOPPED: ErrorReason
ERROR_REASON_BAD_VERSION: ErrorReason
ERROR_REASON_NO_CHECKPOINT_DIR: ErrorReason
ERROR_REASON_JOB_TOO_LARGE: ErrorReason
ERROR_REASON_TOO_MANY_STREAMS: ErrorReason
ERROR_REASON_RECEIVE_BUSY: ErrorReason
ERROR_REASON_JOB_EXISTS: ErrorReason
ERROR_REASON_SHUTDOWN: ErrorReason
ERROR_REASON_DEADLINE: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_USE_STREAM: ErrorReason

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("dtype", "tensors")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("model_spec_json", "optimizer_json", "mode", "num_workers", "backup_workers", "staleness_bound", "checkpoint_every", "total_steps", "seed", "job_config_json", "keep_every", "shard", "compression", "pull_compression", "min_workers", "max_workers", "global_batch", "member_grace_seconds")
    MODEL_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    JOB_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    KEEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PULL_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    MEMBER_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_spec_json: str
    optimizer_json: str
    mode: Mode
    num_workers: int
    backup_workers: int
    staleness_bound: int
    checkpoint_every: int
    total_steps: int
    seed: int
    job_config_json: str
    keep_every: int
    shard: ShardInfo
    compression: str
    pull_compression: str
    min_workers: int
    max_workers: int
    global_batch: int
    member_grace_seconds: float
    def __init__(self, model_spec_json: _Optional[str] = ..., optimizer_json: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., num_workers: _Optional[int] = ..., backup_workers: _Optional[int] = ..., staleness_bound: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., total_steps: _Optional[int] = ..., seed: _Optional[int] = ..., job_config_json: _Optional[str] = ..., keep_every: _Optional[int] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., compression: _Optional[str] = ..., pull_compression: _Optional[str] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., global_batch: _Optional[int] = ..., member_grace_seconds: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "count", "bounds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    bounds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., bounds: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job_id", "spec", "initial_layout", "initial_weights")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    initial_layout: Layout
    initial_weights: bytes
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., initial_layout: _Optional[_Union[Layout, _Mapping]] = ..., initial_weights: _Optional[bytes] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job_id", "created", "layout", "version", "weights_fit_one_message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIT_ONE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    created: bool
    layout: Layout
    version: int
    weights_fit_one_message: bool
    def __init__(self, job_id: _Optional[str] = ..., created: _Optional[bool] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., version: _Optional[int] = ..., weights_fit_one_message: _Optional[bool] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("step", "loss", "rows", "samples_per_sec", "wall_time", "contributors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    rows: int
    samples_per_sec: float
    wall_time: float
    contributors: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., rows: _Optional[int] = ..., samples_per_sec: _Optional[float] = ..., wall_time: _Optional[float] = ..., contributors: _Optional[int] = ...) -> None: ...

class JobCounters(_message.Message):
    __slots__ = ("received", "accepted", "duplicate", "dropped_late", "rejected", "dropped_removed")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_LATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REMOVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    accepted: int
    duplicate: int
    dropped_late: int
    rejected: _containers.ScalarMap[str, int]
    dropped_removed: int
    def __init__(self, received: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicate: _Optional[int] = ..., dropped_late: _Optional[int] = ..., rejected: _Optional[_Mapping[str, int]] = ..., dropped_removed: _Optional[int] = ...) -> None: ...

class MembershipEvent(_message.Message):
    __slots__ = ("version", "old", "new", "reason", "mid_step")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MID_STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    old: _containers.RepeatedScalarFieldContainer[int]
    new: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    mid_step: bool
    def __init__(self, version: _Optional[int] = ..., old: _Optional[_Iterable[int]] = ..., new: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ..., mid_step: _Optional[bool] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "spec", "state", "version", "layout", "history", "counters", "created_at", "last_checkpoint_version", "history_more", "weights_fit_one_message", "latest_evaluation", "checkpoints", "incarnation", "members", "next_members", "next_members_version", "membership", "requested_workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_MORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIT_ONE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LATEST_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_MEMBERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    version: int
    layout: Layout
    history: _containers.RepeatedCompositeFieldContainer[StepRecord]
    counters: JobCounters
    created_at: float
    last_checkpoint_version: int
    history_more: bool
    weights_fit_one_message: bool
    latest_evaluation: Evaluation
    checkpoints: _containers.RepeatedScalarFieldContainer[int]
    incarnation: int
    members: _containers.RepeatedScalarFieldContainer[int]
    next_members: _containers.RepeatedScalarFieldContainer[int]
    next_members_version: int
    membership: _containers.RepeatedCompositeFieldContainer[MembershipEvent]
    requested_workers: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., version: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., history: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., counters: _Optional[_Union[JobCounters, _Mapping]] = ..., created_at: _Optional[float] = ..., last_checkpoint_version: _Optional[int] = ..., history_more: _Optional[bool] = ..., weights_fit_one_message: _Optional[bool] = ..., latest_evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., checkpoints: _Optional[_Iterable[int]] = ..., incarnation: _Optional[int] = ..., members: _Optional[_Iterable[int]] = ..., next_members: _Optional[_Iterable[int]] = ..., next_members_version: _Optional[int] = ..., membership: _Optional[_Iterable[_Union[MembershipEvent, _Mapping]]] = ..., requested_workers: _Optional[int] = ...) -> None: ...

class SetMembersRequest(_message.Message):
    __slots__ = ("job_id", "members", "reason", "from_version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    members: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    from_version: int
    def __init__(self, job_id: _Optional[str] = ..., members: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ..., from_version: _Optional[int] = ...) -> None: ...

class ScaleJobRequest(_message.Message):
    __slots__ = ("job_id", "workers")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    workers: int
    def __init__(self, job_id: _Optional[str] = ..., workers: _Optional[int] = ...) -> None: ...

class RestoreJobRequest(_message.Message):
    __slots__ = ("job_id", "version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("step", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RecordEvaluationRequest(_message.Message):
    __slots__ = ("job_id", "evaluation")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    evaluation: Evaluation
    def __init__(self, job_id: _Optional[str] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class RecordEvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "history_since_step", "omit_history")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    OMIT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    history_since_step: int
    omit_history: bool
    def __init__(self, job_id: _Optional[str] = ..., history_since_step: _Optional[int] = ..., omit_history: _Optional[bool] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CheckpointJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CheckpointJobResponse(_message.Message):
    __slots__ = ("version", "path")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    version: int
    path: str
    def __init__(self, version: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class PullWeightsRequest(_message.Message):
    __slots__ = ("job_id", "min_version", "exact", "full_precision")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    FULL_PRECISION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    min_version: int
    exact: bool
    full_precision: bool
    def __init__(self, job_id: _Optional[str] = ..., min_version: _Optional[int] = ..., exact: _Optional[bool] = ..., full_precision: _Optional[bool] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("version", "layout", "total_bytes", "state", "codec", "membership_events")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_EVENTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    layout: Layout
    total_bytes: int
    state: JobState
    codec: str
    membership_events: int
    def __init__(self, version: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., total_bytes: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ..., codec: _Optional[str] = ..., membership_events: _Optional[int] = ...) -> None: ...

class PullWeightsResponse(_message.Message):
    __slots__ = ("header", "offset", "data", "padding")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    offset: int
    data: bytes
    padding: bytes
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("job_id", "worker", "step", "rows", "loss", "dtype", "total_bytes", "layout", "shard", "codec")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker: int
    step: int
    rows: int
    loss: float
    dtype: DType
    total_bytes: int
    layout: Layout
    shard: ShardInfo
    codec: str
    def __init__(self, job_id: _Optional[str] = ..., worker: _Optional[int] = ..., step: _Optional[int] = ..., rows: _Optional[int] = ..., loss: _Optional[float] = ..., dtype: _Optional[_Union[DType, str]] = ..., total_bytes: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., codec: _Optional[str] = ...) -> None: ...

class PushGradientRequest(_message.Message):
    __slots__ = ("header", "offset", "data", "padding")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    offset: int
    data: bytes
    padding: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("outcome", "version", "step")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    outcome: PushOutcome
    version: int
    step: int
    def __init__(self, outcome: _Optional[_Union[PushOutcome, str]] = ..., version: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_version")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_version: int
    def __init__(self, job_id: _Optional[str] = ..., from_version: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "version", "state", "step", "membership")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    version: int
    state: JobState
    step: StepRecord
    membership: MembershipEvent
    def __init__(self, job_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[_Union[StepRecord, _Mapping]] = ..., membership: _Optional[_Union[MembershipEvent, _Mapping]] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ...) -> None: ...
