"""The gRPC edge: `ParameterService` methods, translating domain errors to status codes."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    REASON_KEY,
    ChunkAssembler,
    FlatLayout,
    WireError,
    decode_chunk_message,
)
from gradfleet.server import checkpoint
from gradfleet.server.errors import (
    BadRequest,
    DeadlineExceeded,
    JobExists,
    JobNotFound,
    OverLimit,
    ServerError,
    ShuttingDown,
    WrongState,
)
from gradfleet.server.jobs import (
    Job,
    JobSettings,
    build_initial_weights,
    check_job_id,
    new_job_id,
    spec_nbytes,
)
from gradfleet.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = "gradfleet.v1.ParameterService"
F = TypeVar("F", bound=Callable[..., Any])


def _check_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise BadRequest("the gradient contains NaN or Inf values.", "non_finite")


def _first_push_message(message: bytes) -> tuple[pb.PushHeader, int, memoryview]:
    """(header, offset, data) of a push's first message, which must carry the header."""
    try:
        raw_header, offset, data = decode_chunk_message(message)
        if raw_header is None:
            raise BadRequest("the first push message has no header.", "bad_header")
        return pb.PushHeader.FromString(bytes(raw_header)), offset, data
    except (WireError, DecodeError):
        raise BadRequest("the push header is not a valid message.", "bad_header") from None


def _status_edge(method: F) -> F:
    """Turn ServerError into `context.abort(code, sentence)` with its reason in the trailing
    metadata (`REASON_KEY`, e.g. "stale"); count it in the metrics."""

    def abort(self: ParameterService, context: grpc.ServicerContext, exc: ServerError) -> None:
        self.metrics.reject(exc.reason)
        context.set_trailing_metadata(((REASON_KEY, exc.reason),))
        context.abort(exc.code, exc.message)

    @functools.wraps(method)
    def unary(self: ParameterService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ServerError as exc:
            abort(self, context, exc)

    @functools.wraps(method)
    def stream(self: ParameterService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except ServerError as exc:
            abort(self, context, exc)

    return stream if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


class StreamLimiter:
    """Caps concurrent pull/push streams; over the cap a call gets RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        metrics.active_streams.set_function(lambda: self.active)  # read when scraped

    def __enter__(self) -> StreamLimiter:
        with self._lock:
            if self.active >= self.limit:
                raise OverLimit(
                    f"the server is at its limit of {self.limit} concurrent streams; retry later.",
                    "too_many_streams",
                )
            self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.active -= 1


class ParameterService:
    """Holds the jobs and implements every RPC of `gradfleet.v1.ParameterService`."""

    def __init__(
        self,
        *,
        metrics: ServerMetrics,
        checkpoint_dir: Path | None,
        checkpoint_every: int,
        max_job_bytes: int,
        max_concurrent_streams: int,
        chunk_bytes: int,
        receive_budget_bytes: int,
    ) -> None:
        self.metrics = metrics
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.max_job_bytes = max_job_bytes
        self.chunk_bytes = chunk_bytes
        self.receive_budget_bytes = receive_budget_bytes
        self.streams = StreamLimiter(max_concurrent_streams, metrics)
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ---- job registry --------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"job {job_id!r} does not exist on this server.", "not_found")
        return job

    def _install(self, job: Job) -> None:
        job.on_step = self._after_step
        self.jobs[job.job_id] = job
        self.metrics.jobs.set(len(self.jobs))

    def _after_step(self, job: Job) -> None:
        every = job.settings.checkpoint_every or self.checkpoint_every
        if self.checkpoint_dir is None:
            return
        if (every and job.version % every == 0) or job.state == pb.JOB_STATE_COMPLETED:
            try:
                self._write_checkpoint(job)
            except OSError:
                log.exception("checkpoint of job %s failed", job.job_id)

    def resume(self) -> int:
        """Load the latest good checkpoint of every job in the checkpoint directory."""
        if self.checkpoint_dir is None:
            return 0
        for loaded in checkpoint.scan(self.checkpoint_dir):
            try:
                job = Job(
                    loaded.job_id,
                    loaded.spec,
                    loaded.layout,
                    loaded.weights,
                    metrics=self.metrics,
                    chunk_bytes=self.chunk_bytes,
                    receive_budget_bytes=self.receive_budget_bytes,
                    optimizer_state=loaded.optimizer_state,
                    version=loaded.version,
                )
            except ServerError as exc:
                log.warning("cannot resume job %s: %s", loaded.job_id, exc.message)
                continue
            job.state = loaded.state
            job.counters = loaded.counters
            job.history = loaded.history
            job.created_at = loaded.created_at
            job.last_checkpoint_version = loaded.version
            with self._lock:
                self._install(job)
            log.info("resumed job %s at version %d", job.job_id, job.version)
        return len(self.jobs)

    def checkpoint_all(self) -> None:
        if self.checkpoint_dir is None:
            return
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:  # one job's failed write must not cost the others theirs
            with job.cond:
                if job.last_checkpoint_version != job.version:
                    try:
                        self._write_checkpoint(job)
                    except OSError:
                        log.exception("final checkpoint of job %s failed", job.job_id)

    def _write_checkpoint(self, job: Job) -> Path | None:
        """Checkpoint `job` (call with `job.cond` held); None, writing nothing, for a job
        deleted meanwhile, whose directory must not come back."""
        assert self.checkpoint_dir is not None
        if job.state == pb.JOB_STATE_DELETED:
            return None
        return checkpoint.write_checkpoint(self.checkpoint_dir, job)

    def begin_shutdown(self) -> None:
        """Wake every waiting pull and watch so they return UNAVAILABLE promptly."""
        self._stopping.set()
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            with job.cond:
                job.cond.notify_all()

    # ---- unary RPCs ----------------------------------------------------------------
    @_status_edge
    def CreateJob(
        self, request: pb.CreateJobRequest, context: grpc.ServicerContext
    ) -> pb.CreateJobResponse:
        settings = JobSettings.from_proto(request.spec)
        job_id = check_job_id(request.job_id) if request.job_id else new_job_id()
        with self._lock:
            existing = self.jobs.get(job_id)
        if existing is not None:
            return self._reattach(existing, request)
        if request.HasField("initial_layout") or request.initial_weights:
            try:
                layout = FlatLayout.from_proto(request.initial_layout)
            except WireError as exc:
                raise BadRequest(f"initial_layout is invalid: {exc}", "bad_layout") from None
            self._check_size(layout)
            if len(request.initial_weights) != layout.nbytes:
                raise BadRequest(
                    f"initial_weights has {len(request.initial_weights)} bytes, "
                    f"expected {layout.nbytes}.",
                    "bad_bytes",
                )
            weights = np.frombuffer(request.initial_weights, dtype=layout.dtype).copy()
            if not np.isfinite(weights).all():
                raise BadRequest("initial_weights contain NaN or Inf.", "non_finite")
        else:
            self._check_nbytes(spec_nbytes(settings.model_spec))
            layout, weights = build_initial_weights(settings.model_spec)
            self._check_size(layout)
        job = Job(
            job_id,
            request.spec,
            layout,
            weights,
            metrics=self.metrics,
            chunk_bytes=self.chunk_bytes,
            receive_budget_bytes=self.receive_budget_bytes,
        )
        with self._lock:
            existing = self.jobs.get(job_id)
            if existing is None:
                self._install(job)
        if existing is not None:
            return self._reattach(existing, request)
        if self.checkpoint_dir is not None:
            with job.cond:
                checkpoint.write_checkpoint(self.checkpoint_dir, job)
        log.info(
            "created job %s: %s, %d workers, %d parameters",
            job_id,
            settings.mode,
            settings.num_workers,
            layout.total_elements,
        )
        return pb.CreateJobResponse(
            job_id=job_id, created=True, layout=layout.to_proto(), version=0
        )

    def _check_size(self, layout: FlatLayout) -> None:
        self._check_nbytes(layout.nbytes)

    def _check_nbytes(self, nbytes: int) -> None:
        if nbytes > self.max_job_bytes:
            raise OverLimit(
                f"the model needs {nbytes} bytes, over this server's limit of "
                f"{self.max_job_bytes} bytes per job.",
                "job_too_large",
            )

    @staticmethod
    def _reattach(job: Job, request: pb.CreateJobRequest) -> pb.CreateJobResponse:
        """Same id and same settings (parsed JSON; job_config is metadata): re-attach."""
        ours = dataclasses.replace(job.settings, job_config={})
        theirs = dataclasses.replace(JobSettings.from_proto(request.spec), job_config={})
        if ours != theirs:
            raise JobExists(
                f"job {job.job_id!r} already exists with a different configuration; "
                "pick another job id or delete it first.",
                "job_exists",
            )
        with job.cond:
            return pb.CreateJobResponse(
                job_id=job.job_id, created=False, layout=job.layout.to_proto(), version=job.version
            )

    @_status_edge
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        return self._job(request.job_id).info(
            request.history_since_step, with_history=not request.omit_history
        )

    @_status_edge
    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        with self._lock:
            jobs = list(self.jobs.values())
        return pb.ListJobsResponse(jobs=[j.info(with_history=False) for j in jobs])

    @_status_edge
    def DeleteJob(
        self, request: pb.DeleteJobRequest, context: grpc.ServicerContext
    ) -> pb.DeleteJobResponse:
        with self._lock:
            job = self.jobs.pop(request.job_id, None)
            self.metrics.jobs.set(len(self.jobs))
        if job is None:
            raise JobNotFound(f"job {request.job_id!r} does not exist on this server.", "not_found")
        job.mark_deleted()
        if self.checkpoint_dir is not None:
            checkpoint.remove_job(self.checkpoint_dir, job.job_id)
        log.info("deleted job %s", job.job_id)
        return pb.DeleteJobResponse()

    @_status_edge
    def StopJob(self, request: pb.StopJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self._job(request.job_id)
        job.stop()
        if self.checkpoint_dir is not None:
            with job.cond:
                if self._write_checkpoint(job) is None:
                    raise JobNotFound(f"job {request.job_id!r} was deleted.", "not_found")
        return job.info(with_history=False)

    @_status_edge
    def CheckpointJob(
        self, request: pb.CheckpointJobRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointJobResponse:
        job = self._job(request.job_id)
        if self.checkpoint_dir is None:
            raise WrongState(
                "this server runs without --checkpoint-dir, so it cannot checkpoint.",
                "no_checkpoint_dir",
            )
        with job.cond:
            path = self._write_checkpoint(job)
            if path is None:
                raise JobNotFound(f"job {request.job_id!r} was deleted.", "not_found")
            return pb.CheckpointJobResponse(version=job.version, path=str(path))

    # ---- streams -------------------------------------------------------------------
    @_status_edge
    def PullWeights(
        self, request: pb.PullWeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        job = self._job(request.job_id)
        worker = request.worker if request.HasField("worker") else None
        with self.streams:
            self._wait(job, request.min_version, context, worker)
            yield from job.weight_messages()
            self.metrics.weight_bytes_out.inc(job.layout.nbytes)

    def _wait(
        self, job: Job, min_version: int, context: grpc.ServicerContext, worker: int | None
    ) -> None:
        """Wait (within the call's deadline) for `min_version`."""
        reached = job.wait_for_version(
            min_version, context.time_remaining(), self._gives_up(context), worker
        )
        if not reached:
            if self._stopping.is_set():
                raise ShuttingDown("the server is shutting down; retry shortly.", "shutdown")
            raise DeadlineExceeded(
                f"version {min_version} was not reached before the deadline.", "deadline"
            )

    @_status_edge
    def PullWeightsUnary(
        self, request: pb.PullWeightsRequest, context: grpc.ServicerContext
    ) -> bytes:
        job = self._job(request.job_id)
        if not job.weights_fit_one_message:
            raise WrongState(
                "these weights span several chunks; pull them with the PullWeights stream.",
                "too_large_for_unary",
            )
        (message,) = self.PullWeights.__wrapped__(self, request, context)  # type: ignore[attr-defined]
        return message

    @_status_edge
    def PushGradientUnary(self, request: bytes, context: grpc.ServicerContext) -> pb.PushAck:
        return self.PushGradient.__wrapped__(self, iter([request]), context)  # type: ignore[attr-defined]

    @_status_edge
    def PushAndPullUnary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Push one single-message gradient, then return the weights of version >= step + 1.

        Refused (FAILED_PRECONDITION) before the push is looked at when the job's weights
        do not fit one message, so a client can fall back to the separate calls.
        """
        header, offset, data = _first_push_message(request)
        job = self._job(header.job_id)
        if not job.weights_fit_one_message:
            raise WrongState(
                "these weights span several chunks; push with PushGradient and pull with "
                "the PullWeights stream.",
                "too_large_for_unary",
            )
        with self.streams:
            self._push(job, header, offset, data, iter(()), context)
            self._wait(job, min(header.step + 1, job.settings.total_steps), context, header.worker)
        snap = job.snapshot()
        self.metrics.weight_bytes_out.inc(snap.nbytes)
        return snap.messages[0]

    @_status_edge
    def PushGradient(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.PushAck:
        with self.streams:
            first = next(request_iterator, None)
            if first is None:
                raise BadRequest("the push stream is empty; send a header first.", "bad_header")
            header, offset, data = _first_push_message(first)
            job = self._job(header.job_id)
            outcome = self._push(job, header, offset, data, request_iterator, context)
            return pb.PushAck(
                outcome=cast(pb.PushOutcome, outcome), version=job.version, step=header.step
            )

    def _push(
        self,
        job: Job,
        header: pb.PushHeader,
        offset: int,
        data: memoryview,
        rest: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> int:
        """Check the header, then receive and commit the gradient unless its outcome is
        known without the data (duplicate, late); returns the PushOutcome, counted."""
        try:
            job.check_header(header)
            early = job.precheck(header)
        except ServerError as exc:
            job.count_rejected(exc.reason)
            raise
        if early is None:
            try:
                early, nbytes = self._take_gradient(job, header, offset, data, rest, context)
            except ServerError as exc:
                if not isinstance(exc, WrongState):  # the job counts its own rejections
                    job.count_rejected(exc.reason)
                raise
        else:
            job.count_outcome(early)
            nbytes = 0
        self.metrics.gradient_bytes_in.inc(nbytes)
        self.metrics.pushed(pb.PushOutcome.Name(early))
        return early

    def _gives_up(self, context: grpc.ServicerContext) -> Callable[[], bool]:
        """For waits inside a call: true once the client left or the server is stopping."""
        return lambda: self._stopping.is_set() or not context.is_active()

    def _take_gradient(
        self,
        job: Job,
        header: pb.PushHeader,
        offset: int,
        data: memoryview,
        rest: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> tuple[int, int]:
        """Receive, check and commit one push's data; returns (outcome, bytes received).

        A gradient that came as one message is checked where it lies and committed as a
        read-only view of that message (no copy). A sync stream is folded into the sum
        chunk by chunk (`_fold`); an async stream is assembled in a receive buffer first,
        because its gradient is applied to the weights as a whole.
        """
        nbytes = job.layout.nbytes
        try:
            if offset == 0 and data.nbytes == nbytes:
                second = next(rest, None)
                if second is None:
                    whole = np.frombuffer(data, dtype=job.layout.dtype)
                    _check_finite(whole)
                    outcome = job.commit(
                        header,
                        whole,
                        timeout=context.time_remaining(),
                        give_up=self._gives_up(context),
                    )[0]
                    return outcome, nbytes
                rest = itertools.chain([second], rest)
            if job.settings.mode == "sync":
                return self._fold(job, header, offset, data, rest, context)
            buf = job.take_buffer(
                context.time_remaining(),
                self._gives_up(context),
            )
            try:
                grad = self._assemble(ChunkAssembler(buf), offset, data, rest, buf)
                return job.commit(header, grad, buf)[0], nbytes
            finally:
                job.give_back(buf)
        except WireError as exc:
            raise BadRequest(str(exc), "bad_bytes") from None

    def _fold(
        self,
        job: Job,
        header: pb.PushHeader,
        offset: int,
        data: memoryview,
        rest: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> tuple[int, int]:
        """Fold a streamed sync gradient into the step's sum, one chunk in memory at a time;
        returns (outcome, bytes received)."""
        early = job.begin_fold(
            header,
            context.time_remaining(),
            self._gives_up(context),
        )
        if early is not None:
            return early, 0
        total, first = job.fold_target()
        touched = folded = False

        def fold(place: slice, chunk: np.ndarray) -> None:
            nonlocal touched
            touched = True
            if first:
                total[place] = chunk
            else:
                with np.errstate(over="ignore"):  # an overflow stops the job at the close
                    np.add(total[place], chunk, out=total[place])

        try:
            self._assemble(ChunkAssembler(total), offset, data, rest, fold)
            folded = True
            return job.finish_fold(header), job.layout.nbytes
        finally:
            if not folded:
                job.abort_fold(touched)

    @staticmethod
    def _assemble(
        assembler: ChunkAssembler,
        offset: int,
        data: memoryview,
        rest: Iterator[bytes],
        sink: np.ndarray | Callable[[slice, np.ndarray], None],
    ) -> np.ndarray:
        """Check every chunk's placement and finiteness and hand it to `sink` (a buffer to
        copy into, or a function); raises BadRequest/WireError; returns the assembler's array."""
        while True:
            if data.nbytes:
                place = assembler.place(offset, data.nbytes)
                chunk = np.frombuffer(data, dtype=assembler.out.dtype)
                _check_finite(chunk)
                if isinstance(sink, np.ndarray):
                    sink[place] = chunk
                else:
                    sink(place, chunk)
            raw = next(rest, None)
            if raw is None:
                break
            extra_header, offset, data = decode_chunk_message(raw)
            if extra_header is not None:
                raise BadRequest("only the first push message may carry a header.", "bad_header")
        assembler.finish()
        return assembler.out

    @_status_edge
    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        job = self._job(request.job_id)
        with self.streams:  # a watch holds a server thread like any other stream
            yield from self._job_events(job, request.from_version, context)

    def _job_events(
        self, job: Job, next_step: int, context: grpc.ServicerContext
    ) -> Iterator[pb.JobEvent]:
        last_state = None
        terminal = (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_STOPPED, pb.JOB_STATE_DELETED)
        while context.is_active() and not self._stopping.is_set():
            with job.cond:
                page = job.history.page(max(next_step, 0), job.HISTORY_PAGE)
                state, version = job.state, job.version
                if not len(page.ints) and state == last_state:
                    job.cond.wait(0.5)
                    continue
            records = page.records()  # built outside the lock
            for record in records:
                yield pb.JobEvent(
                    job_id=job.job_id, version=record.step + 1, state=state, step=record
                )
                next_step = record.step + 1
            if records and next_step < version:
                continue  # more pages of records before the state they led to
            if state != last_state:
                yield pb.JobEvent(job_id=job.job_id, version=version, state=state)
                last_state = state
            if state in terminal:
                return

    # ---- registration --------------------------------------------------------------
    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Handlers with raw-bytes framing for the two tensor streams."""
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
                response_serializer=None,  # the job's snapshot is already encoded
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
            "WatchJob": s(
                self.WatchJob,
                request_deserializer=pb.WatchJobRequest.FromString,
                response_serializer=pb.JobEvent.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
