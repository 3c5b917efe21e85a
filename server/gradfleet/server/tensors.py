"""The data path's RPCs: pulls of weights, pushes of gradients, and both in one call.

A push is received whole (a single message is used where it lies; a stream's chunks are
kept under a receive slot), checked, then committed to its job, which acknowledges it for good. A
pull waits for the version it asks for, then sends the job's published weights.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc

from gradfleet.proto.errors import (
    DeadlineExceeded,
    GradfleetError,
    InvalidArgument,
    Reason,
    ServerUnavailable,
    WrongState,
)
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import as_bytes_view
from gradfleet.server import translate
from gradfleet.server.domain import PushOutcome
from gradfleet.server.edge import CallWaiters, StreamLimiter, remaining, status_edge
from gradfleet.server.job import Job
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.publishing import Encode
from gradfleet.server.receive import Gradient, read_chunks, whole_message
from gradfleet.server.registry import JobRegistry


@dataclass(frozen=True)
class Wire:
    """A job's layout as sent, and how its pulls are encoded: through the job's pull
    codec (`encode`), and in full precision (`exact`, pulls of a kept version)."""

    layout: pb.Layout
    encode: Encode
    exact: Encode


class TensorCalls:
    """The pull and push RPCs of `gradfleet.v1.ParameterService`."""

    def __init__(
        self,
        registry: JobRegistry,
        metrics: ServerMetrics,
        streams: StreamLimiter,
        waiters: CallWaiters,
    ) -> None:
        self.registry, self.metrics = registry, metrics
        self.streams, self.waiters = streams, waiters
        self._wires: weakref.WeakKeyDictionary[Job, Wire] = weakref.WeakKeyDictionary()

    def wire(self, job: Job) -> Wire:
        wire = self._wires.get(job)
        if wire is None:
            layout, codec = job.layout.to_proto(), job.publisher.codec
            encode = translate.weights_encoder(
                layout, "" if codec.name == "none" else str(codec), job.publisher.nbytes
            )
            exact = translate.weights_encoder(layout, "", job.layout.nbytes)
            wire = self._wires[job] = Wire(layout, encode, exact)
        return wire

    @status_edge
    def PullWeights(
        self, request: pb.PullWeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        job = self.registry.get(request.job_id)
        with self.streams:
            self._wait(job, request.min_version, context)
            wire = self.wire(job)
            if request.exact or (request.full_precision and job.publisher.codec.name != "none"):
                yield from self._exact(job, request, wire.exact)
                self.metrics.weight_bytes_out.inc(job.layout.nbytes)
                return
            if job.publisher.fits_one_message:
                yield job.weights_message(wire.encode)
            else:
                yield from job.publisher.stream(wire.encode)
            self.metrics.weight_bytes_out.inc(job.publisher.nbytes)

    @status_edge
    def PullWeightsUnary(
        self, request: pb.PullWeightsRequest, context: grpc.ServicerContext
    ) -> bytes:
        job = self.registry.get(request.job_id)
        self._fits_one_message(job)
        with self.streams:
            self._wait(job, request.min_version, context)
        if request.exact or (request.full_precision and job.publisher.codec.name != "none"):
            (message,) = self._exact(job, request, self.wire(job).exact)
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
        return job.weights_message(self.wire(job).encode)

    def _wait(self, job: Job, min_version: int, context: grpc.ServicerContext) -> None:
        """Wait (within the call's deadline) for `min_version`."""
        if min_version <= job.version:  # reached: no waiter needed (versions only grow)
            return
        waiter = self.waiters.new(context)
        if not job.wait_for_version(min_version, remaining(context), waiter):
            if self.waiters.stopping:
                raise ServerUnavailable(
                    "the server is shutting down; retry shortly.", Reason.SHUTDOWN
                )
            raise DeadlineExceeded(f"version {min_version} was not reached before the deadline.")

    @status_edge
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

    @status_edge
    def PushGradientUnary(self, request: bytes, context: grpc.ServicerContext) -> pb.PushAck:
        return self.PushGradient.__wrapped__(self, iter([request]), context)  # type: ignore[attr-defined]

    @status_edge
    def PushAndPullUnary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Push one single-message gradient, then return the weights of version >= step + 1."""
        decoded = translate.first_push_message(request)
        job = self.registry.get(decoded[0].job_id)
        self._fits_one_message(job)
        with self.streams:
            _, step = self._push(job, decoded, iter(()), context)
            self._wait(job, min(step + 1, job.settings.total_steps), context)
        return self._weights_message(job)

    @status_edge
    def PushAndPull(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Receive a push whole, then stream the weights of version >= step + 1."""
        with self.streams:
            job, decoded = self._first_push(request_iterator)
            _, step = self._push(job, decoded, request_iterator, context)
            self._wait(job, min(step + 1, job.settings.total_steps), context)
            encode = self.wire(job).encode
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
            header = translate.push_header(msg, self.wire(job).layout)
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
                    gradient = job.receive_slot(remaining(context), self.waiters.new(context))
                    read_chunks(job.push_format, offset, data, chunks, gradient)
                outcome, gradient = job.commit(header, gradient), None
        except GradfleetError as exc:
            if gradient is not None:
                job.release(gradient)
            job.count_rejected(exc.reason or Reason.BAD_HEADER)
            raise
        self.metrics.gradient_bytes_in.inc(job.push_format.nbytes)
        self.metrics.pushed(translate.OUTCOME_LABELS[outcome])
        return outcome, header.step
