"""The gRPC edge: each RPC translates its request, calls the jobs, and translates back.

Domain errors (`gradfleet.proto.errors`) become a status code with one sentence and the
error's reason in the rich status details. A call that waits holds a `Waiter` that its
own end (the client left) and the server's shutdown cancel.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import numpy as np

from gradfleet.proto.errors import (
    DeadlineExceeded,
    GradfleetError,
    InvalidArgument,
    JobNotFound,
    Reason,
    ResourceExhausted,
    ServerUnavailable,
    WrongState,
)
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, WireError, as_bytes_view
from gradfleet.server import translate
from gradfleet.server.checkpoint_writer import Checkpointed
from gradfleet.server.domain import Evaluation, JobState, PushOutcome
from gradfleet.server.job import Job
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.publishing import Encode
from gradfleet.server.receive import Gradient, read_chunks, whole_message
from gradfleet.server.registry import JobRegistry
from gradfleet.server.settings import JobSettings, check_job_id, new_job_id
from gradfleet.server.waiting import Waiter

log = logging.getLogger(__name__)

SERVICE_NAME = "gradfleet.v1.ParameterService"
F = TypeVar("F", bound=Callable[..., Any])
_TERMINAL = (JobState.COMPLETED, JobState.STOPPED, JobState.DELETED)


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds a handler may wait before the call's deadline, less a fifth (at most
    0.25 s) so that its answer reaches the client before the client gives up; None when
    the call has no deadline (grpcio then reports an enormous number)."""
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(0.0, left - min(0.25, left / 5))


def _status_edge(method: F) -> F:
    """Turn a GradfleetError into the call's status, and count it in the metrics."""

    def abort(self: ParameterService, context: grpc.ServicerContext, exc: GradfleetError) -> None:
        self.metrics.reject(exc.reason.value if exc.reason else "error")
        context.abort_with_status(translate.status_of(exc))

    @functools.wraps(method)
    def unary(self: ParameterService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except GradfleetError as exc:
            abort(self, context, exc)

    @functools.wraps(method)
    def stream(self: ParameterService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except GradfleetError as exc:
            abort(self, context, exc)

    return stream if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


class StreamLimiter:
    """Caps concurrent streaming and waiting calls; over the cap: RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        metrics.active_streams.set_function(lambda: self.active)  # read when scraped

    def __enter__(self) -> StreamLimiter:
        with self._lock:
            if self.active >= self.limit:
                raise ResourceExhausted(
                    f"the server is at its limit of {self.limit} concurrent streams; retry later.",
                    Reason.TOO_MANY_STREAMS,
                )
            self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.active -= 1


@dataclass(frozen=True)
class _Wire:
    """A job's layout as sent, and how its pulls are encoded: through the job's pull
    codec (`encode`), and in full precision (`exact`, pulls of a kept version)."""

    layout: pb.Layout
    encode: Encode
    exact: Encode


class ParameterService:
    """Implements every RPC of `gradfleet.v1.ParameterService` over a `JobRegistry`."""

    def __init__(
        self, registry: JobRegistry, metrics: ServerMetrics, max_concurrent_streams: int
    ) -> None:
        self.registry, self.metrics = registry, metrics
        self.streams = StreamLimiter(max_concurrent_streams, metrics)
        self._stopping = False
        self._waiters: weakref.WeakSet[Waiter] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wires: weakref.WeakKeyDictionary[Job, _Wire] = weakref.WeakKeyDictionary()

    def begin_shutdown(self) -> None:
        """Cancel every waiting call, so each answers UNAVAILABLE promptly."""
        with self._lock:
            self._stopping = True
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.cancel()
        self.registry.wake_all()

    def _waiter(self, context: grpc.ServicerContext) -> Waiter:
        """A waiter cancelled when this call ends or the server stops."""
        waiter = Waiter()
        with self._lock:
            self._waiters.add(waiter)
            stopping = self._stopping
        if stopping or not context.add_callback(waiter.cancel):
            waiter.cancel()
        return waiter

    def _wire(self, job: Job) -> _Wire:
        wire = self._wires.get(job)
        if wire is None:
            layout, codec = job.layout.to_proto(), job.publisher.codec
            encode = translate.weights_encoder(
                layout, "" if codec.name == "none" else str(codec), job.publisher.nbytes
            )
            exact = translate.weights_encoder(layout, "", job.layout.nbytes)
            wire = self._wires[job] = _Wire(layout, encode, exact)
        return wire

    # jobs

    @_status_edge
    def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.ServicerContext
    ) -> pb.CreateJobResponse:
        settings = JobSettings.validate(translate.spec_from_proto(request.spec))
        job_id = check_job_id(request.job_id) if request.job_id else new_job_id()
        given = None
        if request.HasField("initial_layout") or request.initial_weights:
            given = self._initial_weights(request)
        job, created = self.registry.create(job_id, settings, given)
        info = job.info()
        return pb.CreateJobResponse(
            job_id=job_id,
            created=created,
            layout=self._wire(job).layout,
            version=info.version,
            weights_fit_one_message=info.weights_fit_one_message,
        )

    def _initial_weights(self, request: pb.CreateJobRequest) -> tuple[FlatLayout, np.ndarray]:
        try:
            layout = FlatLayout.from_proto(request.initial_layout)
        except WireError as exc:
            raise InvalidArgument(f"initial_layout is invalid: {exc}", Reason.BAD_LAYOUT) from None
        self.registry.check_size(layout.nbytes)
        if len(request.initial_weights) != layout.nbytes:
            raise InvalidArgument(
                f"initial_weights has {len(request.initial_weights)} bytes, "
                f"expected {layout.nbytes}.",
                Reason.BAD_BYTES,
            )
        weights = np.frombuffer(request.initial_weights, dtype=layout.dtype).copy()
        if not np.isfinite(weights).all():
            raise InvalidArgument("initial_weights contain NaN or Inf.", Reason.NON_FINITE)
        return layout, weights

    @_status_edge
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        since = None if request.omit_history else request.history_since_step
        return translate.job_info(job.info(since), self._wire(job).layout)

    @_status_edge
    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        jobs = self.registry.all()
        infos = [translate.job_info(j.info(), self._wire(j).layout) for j in jobs]
        return pb.ListJobsResponse(jobs=infos)

    @_status_edge
    def DeleteJob(
        self, request: pb.DeleteJobRequest, context: grpc.ServicerContext
    ) -> pb.DeleteJobResponse:
        self.registry.delete(request.job_id)
        return pb.DeleteJobResponse()

    @_status_edge
    def StopJob(self, request: pb.StopJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        self._checkpointed(job, job.stop())
        return translate.job_info(job.info(), self._wire(job).layout)

    @_status_edge
    def CheckpointJob(
        self, request: pb.CheckpointJobRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointJobResponse:
        job = self.registry.get(request.job_id)
        if self.registry.checkpoint_dir is None:
            raise WrongState(
                "this server runs without --checkpoint-dir, so it cannot checkpoint.",
                Reason.NO_CHECKPOINT_DIR,
            )
        written = self._checkpointed(job, job.checkpoint())
        assert written is not None
        return pb.CheckpointJobResponse(version=written.version, path=str(written.path))

    def _checkpointed(self, job: Job, future: Future[Checkpointed] | None) -> Checkpointed | None:
        """Wait for a requested checkpoint (off the job's lock); a job deleted meanwhile is
        NOT_FOUND, with nothing of it left on disk."""
        written = None
        if future is not None:
            try:
                written = future.result()
            except CancelledError:  # the job was deleted before its snapshot was written
                pass
            except OSError as exc:
                raise GradfleetError(f"the checkpoint could not be written: {exc}") from None
        if job.info().state is JobState.DELETED or (future is not None and written is None):
            raise JobNotFound(f"job {job.job_id!r} was deleted.")
        return written

    # tensors

    @_status_edge
    def PullWeights(
        self, request: pb.PullWeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        job = self.registry.get(request.job_id)
        with self.streams:
            self._wait(job, request.min_version, context)
            wire = self._wire(job)
            if request.exact or (request.full_precision and job.publisher.codec.name != "none"):
                yield from self._exact(job, request, wire.exact)
                self.metrics.weight_bytes_out.inc(job.layout.nbytes)
                return
            if job.publisher.fits_one_message:
                yield job.weights_message(wire.encode)
            else:
                yield from job.publisher.stream(wire.encode)
            self.metrics.weight_bytes_out.inc(job.publisher.nbytes)

    @_status_edge
    def PullWeightsUnary(
        self, request: pb.PullWeightsRequest, context: grpc.ServicerContext
    ) -> bytes:
        job = self.registry.get(request.job_id)
        self._fits_one_message(job)
        with self.streams:
            self._wait(job, request.min_version, context)
        if request.exact or (request.full_precision and job.publisher.codec.name != "none"):
            (message,) = self._exact(job, request, self._wire(job).exact)
            self.metrics.weight_bytes_out.inc(job.layout.nbytes)
            return message
        return self._weights_message(job)

    @staticmethod
    def _exact(job: Job, request: pb.PullWeightsRequest, encode: Encode) -> Iterator[bytes]:
        """The messages of exactly min_version's weights (kept by the job), or of the
        current weights in full precision."""
        if request.exact:
            version = request.min_version
            weights, state = job.exact_weights(version)
        else:
            version, weights, state = job.current_weights()
        data, events = as_bytes_view(weights), len(job.membership.events)
        step = job.publisher.chunk_bytes
        for start in range(0, len(data), step):
            yield encode(version, state, events, start, data[start : start + step])

    def _fits_one_message(self, job: Job) -> None:
        if not job.publisher.fits_one_message:
            raise WrongState(
                "these weights span several chunks (the job says weights_fit_one_message is "
                "false); pull them with the PullWeights stream.",
                Reason.USE_STREAM,
            )

    def _weights_message(self, job: Job) -> bytes:
        self.metrics.weight_bytes_out.inc(job.publisher.nbytes)
        return job.weights_message(self._wire(job).encode)

    def _wait(self, job: Job, min_version: int, context: grpc.ServicerContext) -> None:
        """Wait (within the call's deadline) for `min_version`."""
        if min_version <= job.version:  # reached: no waiter needed (versions only grow)
            return
        waiter = self._waiter(context)
        if not job.wait_for_version(min_version, _remaining(context), waiter):
            if self._stopping:
                raise ServerUnavailable(
                    "the server is shutting down; retry shortly.", Reason.SHUTDOWN
                )
            raise DeadlineExceeded(f"version {min_version} was not reached before the deadline.")

    @_status_edge
    def PushGradient(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.PushAck:
        with self.streams:
            job, decoded = self._first_push(request_iterator)
            outcome, step = self._push(job, decoded, request_iterator, context)
            return pb.PushAck(
                outcome=cast(pb.PushOutcome, translate.OUTCOMES[outcome]),
                version=job.version,
                step=step,
            )

    def _first_push(self, request_iterator: Iterator[bytes]) -> tuple[Job, Any]:
        """The job of a push stream and its first message, decoded."""
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument(
                "the push stream is empty; send a header first.", Reason.BAD_HEADER
            )
        decoded = translate.first_push_message(first)
        return self.registry.get(decoded[0].job_id), decoded

    @_status_edge
    def PushGradientUnary(self, request: bytes, context: grpc.ServicerContext) -> pb.PushAck:
        return self.PushGradient.__wrapped__(self, iter([request]), context)  # type: ignore[attr-defined]

    @_status_edge
    def PushAndPullUnary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Push one single-message gradient, then return the weights of version >= step + 1."""
        decoded = translate.first_push_message(request)
        job = self.registry.get(decoded[0].job_id)
        self._fits_one_message(job)
        with self.streams:
            _, step = self._push(job, decoded, iter(()), context)
            self._wait(job, min(step + 1, job.settings.total_steps), context)
        return self._weights_message(job)

    @_status_edge
    def PushAndPull(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Receive a push whole, then stream the weights of version >= step + 1."""
        with self.streams:
            job, decoded = self._first_push(request_iterator)
            _, step = self._push(job, decoded, request_iterator, context)
            self._wait(job, min(step + 1, job.settings.total_steps), context)
            encode = self._wire(job).encode
            if job.publisher.fits_one_message:
                yield job.weights_message(encode)
            else:
                yield from job.publisher.stream(encode)
            self.metrics.weight_bytes_out.inc(job.publisher.nbytes)

    def _push(
        self,
        job: Job,
        decoded: tuple[pb.PushHeader, int, memoryview],
        rest: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> tuple[PushOutcome, int]:
        """Receive, check and commit one push, whose first message is `decoded`; returns
        (outcome, step). A push refused for any reason is counted in its job's counters."""
        msg, offset, data = decoded
        gradient: Gradient | None = None
        try:
            header = translate.push_header(msg, self._wire(job).layout)
            job.check_header(header)
            early = job.admit(header)
            second = next(rest, None)
            whole = whole_message(job.push_format, offset, data) if second is None else None
            chunks = rest if second is None else itertools.chain([second], rest)
            if early is not None:  # checked, then answered without adding it
                if whole is None:
                    read_chunks(job.push_format, offset, data, chunks, None)
                outcome = job.count_early(early)
            else:
                if whole is not None:
                    gradient = Gradient(whole)
                else:
                    gradient = job.receive_buffer(_remaining(context), self._waiter(context))
                    read_chunks(job.push_format, offset, data, chunks, gradient.data)
                outcome, gradient = job.commit(header, gradient), None
        except GradfleetError as exc:
            if gradient is not None:
                job.release(gradient)
            job.count_rejected(exc.reason or Reason.BAD_HEADER)
            raise
        self.metrics.gradient_bytes_in.inc(job.push_format.nbytes)
        self.metrics.pushed(translate.OUTCOME_LABELS[outcome])
        return outcome, header.step

    @_status_edge
    def RestoreJob(
        self, request: pb.RestoreJobRequest, context: grpc.ServicerContext
    ) -> pb.JobInfo:
        job = self.registry.restore(request.job_id, request.version)
        return translate.job_info(job.info(), self._wire(job).layout)

    @_status_edge
    def SetMembers(
        self, request: pb.SetMembersRequest, context: grpc.ServicerContext
    ) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        since = request.from_version if request.HasField("from_version") else None
        job.set_members(tuple(request.members), request.reason, since)
        return translate.job_info(job.info(), self._wire(job).layout)

    @_status_edge
    def ScaleJob(self, request: pb.ScaleJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        job.scale(request.workers)
        return translate.job_info(job.info(), self._wire(job).layout)

    @_status_edge
    def RecordEvaluation(
        self, request: pb.RecordEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.RecordEvaluationResponse:
        job = self.registry.get(request.job_id)
        found = request.evaluation
        job.record_evaluation(Evaluation(found.step, dict(found.metrics)))
        return pb.RecordEvaluationResponse()

    @_status_edge
    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        job = self.registry.get(request.job_id)
        with self.streams:  # a watch holds a server thread like any other stream
            yield from self._job_events(job, request.from_version, context)

    def _job_events(
        self, job: Job, next_step: int, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        """Step records from `next_step` on, then each change of members or state, until
        the job ends."""
        waiter = self._waiter(context)
        last_state, events_seen = None, 0
        while not waiter.cancelled:
            info = job.info(history_since=max(next_step, 0))
            assert info.history is not None and info.membership is not None
            records = translate.step_records(info.history)
            state = translate.STATES[info.state]
            for record in records:
                yield pb.JobEvent(
                    job_id=job.job_id, version=record.step + 1, state=state, step=record
                )
                next_step = record.step + 1
            if records and next_step < info.version:
                continue  # more pages of records before the state they led to
            for event in info.membership.events[events_seen:]:
                membership = translate.membership_event(event)
                yield pb.JobEvent(
                    job_id=job.job_id, version=event.version, state=state, membership=membership
                )
            events_seen = len(info.membership.events)
            if info.state is not last_state:
                yield pb.JobEvent(job_id=job.job_id, version=info.version, state=state)
                last_state = info.state
            if info.state in _TERMINAL:
                return
            job.wait_for_change(
                max(next_step, info.version), info.state, None, waiter, events=events_seen
            )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Handlers with raw-bytes framing for the tensor messages."""
        u, s = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler

        def unary(fn: Callable, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return u(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        handlers = {
            "CreateJob": unary(self.CreateJob, pb.CreateJobRequest, pb.CreateJobResponse),
            "GetJob": unary(self.GetJob, pb.GetJobRequest, pb.JobInfo),
            "ListJobs": unary(self.ListJobs, pb.ListJobsRequest, pb.ListJobsResponse),
            "DeleteJob": unary(self.DeleteJob, pb.DeleteJobRequest, pb.DeleteJobResponse),
            "StopJob": unary(self.StopJob, pb.StopJobRequest, pb.JobInfo),
            "CheckpointJob": unary(
                self.CheckpointJob, pb.CheckpointJobRequest, pb.CheckpointJobResponse
            ),
            "PullWeights": s(
                self.PullWeights,
                request_deserializer=pb.PullWeightsRequest.FromString,
                response_serializer=None,  # encoded by the job's publisher
            ),
            "PushGradient": grpc.stream_unary_rpc_method_handler(
                self.PushGradient,
                request_deserializer=None,  # decoded by hand, zero-copy
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "PullWeightsUnary": u(
                self.PullWeightsUnary,
                request_deserializer=pb.PullWeightsRequest.FromString,
                response_serializer=None,
            ),
            "PushGradientUnary": u(
                self.PushGradientUnary,
                request_deserializer=None,
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "PushAndPullUnary": u(
                self.PushAndPullUnary, request_deserializer=None, response_serializer=None
            ),
            "PushAndPull": grpc.stream_stream_rpc_method_handler(
                self.PushAndPull, request_deserializer=None, response_serializer=None
            ),
            "RestoreJob": unary(self.RestoreJob, pb.RestoreJobRequest, pb.JobInfo),
            "SetMembers": unary(self.SetMembers, pb.SetMembersRequest, pb.JobInfo),
            "ScaleJob": unary(self.ScaleJob, pb.ScaleJobRequest, pb.JobInfo),
            "RecordEvaluation": unary(
                self.RecordEvaluation, pb.RecordEvaluationRequest, pb.RecordEvaluationResponse
            ),
            "WatchJob": s(
                self.WatchJob,
                request_deserializer=pb.WatchJobRequest.FromString,
                response_serializer=pb.JobEvent.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
