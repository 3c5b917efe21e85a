"""The gRPC service: each RPC translates its request, calls the jobs, and translates back.

The job calls (create, inspect, stop, checkpoint, restore, members, watch) are here; the
data path's pulls and pushes are `tensors.TensorCalls`; what every handler shares (errors
as statuses, deadlines, waiters, the stream cap) is `edge.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

import grpc
import numpy as np

from gradfleet.proto.errors import (
    GradfleetError,
    InvalidArgument,
    JobNotFound,
    Reason,
    WrongState,
)
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, WireError
from gradfleet.server import translate
from gradfleet.server.checkpoint_writer import Checkpointed
from gradfleet.server.domain import Evaluation, JobState
from gradfleet.server.edge import CallWaiters, StreamLimiter, status_edge
from gradfleet.server.job import Job
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.registry import JobRegistry
from gradfleet.server.settings import JobSettings, check_job_id, new_job_id
from gradfleet.server.tensors import TensorCalls

SERVICE_NAME = "gradfleet.v1.ParameterService"
_TERMINAL = (JobState.COMPLETED, JobState.STOPPED, JobState.DELETED)


class ParameterService:
    """Implements every RPC of `gradfleet.v1.ParameterService` over a `JobRegistry`."""

    def __init__(
        self, registry: JobRegistry, metrics: ServerMetrics, max_concurrent_streams: int
    ) -> None:
        self.registry, self.metrics = registry, metrics
        self.streams = StreamLimiter(max_concurrent_streams, metrics)
        self.waiters = CallWaiters()
        self.tensors = TensorCalls(registry, metrics, self.streams, self.waiters)

    def begin_shutdown(self) -> None:
        """Cancel every waiting call, so each answers UNAVAILABLE promptly."""
        self.waiters.cancel_all()
        self.registry.wake_all()

    # jobs

    @status_edge
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
            layout=self.tensors.wire(job).layout,
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

    @status_edge
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        since = None if request.omit_history else request.history_since_step
        return translate.job_info(job.info(since), self.tensors.wire(job).layout)

    @status_edge
    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        jobs = self.registry.all()
        infos = [translate.job_info(j.info(), self.tensors.wire(j).layout) for j in jobs]
        return pb.ListJobsResponse(jobs=infos)

    @status_edge
    def DeleteJob(
        self, request: pb.DeleteJobRequest, context: grpc.ServicerContext
    ) -> pb.DeleteJobResponse:
        self.registry.delete(request.job_id)
        return pb.DeleteJobResponse()

    @status_edge
    def StopJob(self, request: pb.StopJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        self._checkpointed(job, job.stop())
        return translate.job_info(job.info(), self.tensors.wire(job).layout)

    @status_edge
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

    @status_edge
    def RestoreJob(
        self, request: pb.RestoreJobRequest, context: grpc.ServicerContext
    ) -> pb.JobInfo:
        job = self.registry.restore(request.job_id, request.version)
        return translate.job_info(job.info(), self.tensors.wire(job).layout)

    @status_edge
    def SetMembers(
        self, request: pb.SetMembersRequest, context: grpc.ServicerContext
    ) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        since = request.from_version if request.HasField("from_version") else None
        job.set_members(tuple(request.members), request.reason, since)
        return translate.job_info(job.info(), self.tensors.wire(job).layout)

    @status_edge
    def ScaleJob(self, request: pb.ScaleJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.registry.get(request.job_id)
        job.scale(request.workers)
        return translate.job_info(job.info(), self.tensors.wire(job).layout)

    @status_edge
    def RecordEvaluation(
        self, request: pb.RecordEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.RecordEvaluationResponse:
        job = self.registry.get(request.job_id)
        found = request.evaluation
        job.record_evaluation(Evaluation(found.step, dict(found.metrics)))
        return pb.RecordEvaluationResponse()

    @status_edge
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
        waiter = self.waiters.new(context)
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
        t = self.tensors

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
                t.PullWeights,
                request_deserializer=pb.PullWeightsRequest.FromString,
                response_serializer=None,  # encoded by the job's publisher
            ),
            "PushGradient": grpc.stream_unary_rpc_method_handler(
                t.PushGradient,
                request_deserializer=None,  # decoded by hand, zero-copy
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "PullWeightsUnary": u(
                t.PullWeightsUnary,
                request_deserializer=pb.PullWeightsRequest.FromString,
                response_serializer=None,
            ),
            "PushGradientUnary": u(
                t.PushGradientUnary,
                request_deserializer=None,
                response_serializer=pb.PushAck.SerializeToString,
            ),
            "PushAndPullUnary": u(
                t.PushAndPullUnary, request_deserializer=None, response_serializer=None
            ),
            "PushAndPull": grpc.stream_stream_rpc_method_handler(
                t.PushAndPull, request_deserializer=None, response_serializer=None
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
