"""Protobuf to domain and back: the only server module besides the service that sees pb."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status

from gradfleet.proto.errors import GradfleetError, InvalidArgument, Reason
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    FlatLayout,
    WireError,
    decode_chunk_message,
    dtype_from_proto,
    encode_chunk_message,
)
from gradfleet.server.domain import JobInfo, JobState, PushHeader, PushOutcome
from gradfleet.server.history import StepPage
from gradfleet.server.membership import MembershipEvent
from gradfleet.server.publishing import Encode
from gradfleet.server.settings import JobSpec, Mode

_MODES = {pb.MODE_UNSPECIFIED: Mode.SYNC, pb.MODE_SYNC: Mode.SYNC, pb.MODE_ASYNC: Mode.ASYNC}
_MODE_OUT = {Mode.SYNC: pb.MODE_SYNC, Mode.ASYNC: pb.MODE_ASYNC}
STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.name}") for state in JobState}
OUTCOMES = {
    outcome: pb.PushOutcome.Value(f"PUSH_OUTCOME_{outcome.name}") for outcome in PushOutcome
}
OUTCOME_LABELS = {outcome: f"PUSH_OUTCOME_{outcome.name}" for outcome in PushOutcome}


def spec_from_proto(msg: pb.JobSpec) -> JobSpec:
    mode = _MODES.get(msg.mode)
    if mode is None:
        raise InvalidArgument(
            f"mode {msg.mode} is unknown; use MODE_SYNC or MODE_ASYNC.", Reason.BAD_CONFIG
        )
    return JobSpec(
        model_spec_json=msg.model_spec_json,
        optimizer_json=msg.optimizer_json,
        mode=mode,
        num_workers=msg.num_workers,
        backup_workers=msg.backup_workers,
        staleness_bound=msg.staleness_bound,
        checkpoint_every=msg.checkpoint_every,
        total_steps=msg.total_steps,
        seed=msg.seed,
        job_config_json=msg.job_config_json,
        keep_every=msg.keep_every,
        shard_index=msg.shard.index,
        shard_bounds=tuple(msg.shard.bounds) if msg.HasField("shard") else (),
        compression=msg.compression,
        pull_compression=msg.pull_compression,
        min_workers=msg.min_workers,
        max_workers=msg.max_workers,
        global_batch=msg.global_batch,
        member_grace_seconds=msg.member_grace_seconds,
    )


def spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    return pb.JobSpec(
        model_spec_json=spec.model_spec_json,
        optimizer_json=spec.optimizer_json,
        mode=_MODE_OUT[spec.mode],
        num_workers=spec.num_workers,
        backup_workers=spec.backup_workers,
        staleness_bound=spec.staleness_bound,
        checkpoint_every=spec.checkpoint_every,
        total_steps=spec.total_steps,
        seed=spec.seed,
        job_config_json=spec.job_config_json,
        keep_every=spec.keep_every,
        shard=pb.ShardInfo(
            index=spec.shard_index, count=len(spec.shard_bounds) - 1, bounds=spec.shard_bounds
        )
        if spec.shard_bounds
        else None,
        compression=spec.compression,
        pull_compression=spec.pull_compression,
        min_workers=spec.min_workers,
        max_workers=spec.max_workers,
        global_batch=spec.global_batch,
        member_grace_seconds=spec.member_grace_seconds,
    )


def first_push_message(message: bytes) -> tuple[pb.PushHeader, int, memoryview]:
    """(header, offset, data) of a push's first message, which must carry the header."""
    try:
        raw_header, offset, data = decode_chunk_message(message)
        if raw_header is None:
            raise InvalidArgument("the first push message has no header.", Reason.BAD_HEADER)
        return pb.PushHeader.FromString(bytes(raw_header)), offset, data
    except (WireError, DecodeError):
        raise InvalidArgument(
            "the push header is not a valid message.", Reason.BAD_HEADER
        ) from None


def push_header(msg: pb.PushHeader, job_layout: pb.Layout) -> PushHeader:
    """The domain header; the layout is parsed only when it differs from the job's."""
    layout = None
    if msg.HasField("layout") and msg.layout != job_layout:
        try:
            layout = FlatLayout.from_proto(msg.layout)
        except WireError as exc:
            raise InvalidArgument(str(exc), Reason.BAD_LAYOUT) from None
    try:
        dtype = dtype_from_proto(msg.dtype)
    except WireError:
        dtype = None
    return PushHeader(
        job_id=msg.job_id,
        worker=msg.worker,
        step=msg.step,
        rows=msg.rows,
        loss=msg.loss,
        dtype=dtype,
        total_bytes=msg.total_bytes,
        layout=layout,
        shard=(msg.shard.index, tuple(msg.shard.bounds)) if msg.HasField("shard") else None,
        codec=msg.codec,
    )


def counters_to_proto(info: JobInfo) -> pb.JobCounters:
    c = info.counters
    return pb.JobCounters(
        received=c.received,
        accepted=c.accepted,
        duplicate=c.duplicate,
        dropped_late=c.dropped_late,
        rejected=c.rejected,
        dropped_removed=c.dropped_removed,
    )


def job_info(info: JobInfo, layout: pb.Layout) -> pb.JobInfo:
    msg = pb.JobInfo(
        job_id=info.job_id,
        spec=spec_to_proto(info.spec),
        state=STATES[info.state],
        version=info.version,
        layout=layout,
        counters=counters_to_proto(info),
        created_at=info.created_at,
        last_checkpoint_version=info.last_checkpoint_version,
        weights_fit_one_message=info.weights_fit_one_message,
        checkpoints=info.checkpoints,
        incarnation=info.incarnation,
    )
    if info.history is not None:
        msg.history.extend(step_records(info.history))
        msg.history_more = info.history.more
    if info.evaluation is not None:
        msg.latest_evaluation.step = info.evaluation.step
        msg.latest_evaluation.metrics.update(info.evaluation.metrics)
    if info.membership is not None:
        m = info.membership
        msg.members.extend(m.members)
        if m.pending:
            msg.next_members.extend(m.pending[0].members)
            msg.next_members_version = m.pending[0].version
        msg.membership.extend(membership_event(e) for e in m.events)
        msg.requested_workers = m.requested
    return msg


def membership_event(event: MembershipEvent) -> pb.MembershipEvent:
    return pb.MembershipEvent(
        version=event.version,
        old=event.old,
        new=event.new,
        reason=event.reason,
        mid_step=event.mid_step,
    )


def step_records(page: StepPage) -> list[pb.StepRecord]:
    return [
        pb.StepRecord(
            step=i[0],
            rows=i[1],
            contributors=i[2],
            loss=f[0],
            samples_per_sec=f[1],
            wall_time=f[2],
        )
        for i, f in zip(page.ints.tolist(), page.floats.tolist(), strict=True)
    ]


def weights_encoder(layout_msg: pb.Layout, codec: str, total_bytes: int) -> Encode:
    """Encodes pull messages (of `total_bytes`, the `codec`'s payload of the weights):
    each chunk, the first with its WeightsHeader."""

    def encode(version: int, state: JobState, events: int, offset: int, piece: memoryview) -> bytes:
        header = b""
        if offset == 0:
            header = pb.WeightsHeader(
                version=version,
                layout=layout_msg,
                total_bytes=total_bytes,
                state=STATES[state],
                codec=codec,
                membership_events=events,
            ).SerializeToString()
        return encode_chunk_message(offset, piece, header)

    return encode


def status_of(exc: GradfleetError) -> grpc.Status:
    """The call's status for `exc`: code, sentence, and the reason in the rich details."""
    status = status_pb2.Status(code=exc.code.value[0], message=exc.message)
    if exc.reason is not None:
        detail = any_pb2.Any()
        detail.Pack(pb.ErrorDetail(reason=pb.ErrorReason.Value(f"ERROR_REASON_{exc.reason.name}")))
        status.details.append(detail)
    return rpc_status.to_status(status)
