"""Low-level Python client of the gradfleet parameter server (no Ray import here).

    with ParameterServerClient("127.0.0.1:50051", token=None) as ps:
        job = ps.create_job(spec, {"name": "sgd", "lr": 0.1}, num_workers=2, total_steps=10)
        version, weights = ps.pull_weights(job, min_version=0)      # flat array
        ack = ps.push_gradient(job, worker=0, step=version, rows=32, loss=0.7, flat_grad=g)

Weights and gradients are flat arrays in the job's layout (`ps.layout(job)` names the
tensors). Every failure the server reports raises `ParameterServerError` with the
gRPC status name in `.code` and the server's one-sentence explanation as the message.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gradfleet.proto.runtime import keep_message_buffers_mapped
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from gradfleet.proto.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    REASON_KEY,
    SINGLE_MESSAGE_FACTOR,
    ChunkAssembler,
    FlatLayout,
    WireError,
    as_bytes_view,
    client_options,
    decode_chunk_message,
    dtype_to_proto,
    encode_chunk_message,
    plan_chunk_bytes,
)

log = logging.getLogger(__name__)

_SERVICE = "/gradfleet.v1.ParameterService/"
MODES = {"sync": pb.MODE_SYNC, "async": pb.MODE_ASYNC}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
REPUSH_LIMIT = 10  # pushes of one step's gradient when the server keeps voiding it


class ParameterServerError(Exception):
    """A call failed; `code` is the gRPC status name (e.g. "NOT_FOUND") and `reason` the
    server's machine-readable reason (e.g. "stale"), when it gave one. Pickles cleanly."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    def __reduce__(self) -> tuple:
        return (type(self), (self.code, self.message, self.reason))

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


def _translate(exc: grpc.RpcError) -> ParameterServerError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    reason = dict(trailing or ()).get(REASON_KEY)
    return ParameterServerError(name, details or f"the call failed with {name}.", reason)


def counters_dict(counters: pb.JobCounters) -> dict[str, Any]:
    """A job's push counters as plain data: received, accepted, duplicate, dropped_late,
    rejected (by reason)."""
    return {
        "received": counters.received,
        "accepted": counters.accepted,
        "duplicate": counters.duplicate,
        "dropped_late": counters.dropped_late,
        "rejected": dict(counters.rejected),
    }


class ParameterServerClient:
    """One channel to a parameter server; thread-safe, reuse it for every call."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_root_cert: bytes | str | Path | None = None,
        timeout: float = 60.0,
        *,
        tls_client_cert: bytes | str | Path | None = None,
        tls_client_key: bytes | str | Path | None = None,
        tls_server_name: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retries: int | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.retries = retries
        keep_message_buffers_mapped()  # megabyte messages: reuse buffers, no page faults
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options: list[tuple[str, Any]] = client_options(max_message_bytes)
        if tls_root_cert is not None or tls_client_cert is not None:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_root_cert),
                private_key=_pem(tls_client_key),
                certificate_chain=_pem(tls_client_cert),
            )
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.ParameterServiceStub(self._channel)
        self._pull = self._channel.unary_stream(
            _SERVICE + "PullWeights",
            request_serializer=pb.PullWeightsRequest.SerializeToString,
            response_deserializer=None,  # raw bytes, decoded without copies
        )
        self._push = self._channel.stream_unary(
            _SERVICE + "PushGradient",
            request_serializer=None,  # messages are encoded by hand
            response_deserializer=pb.PushAck.FromString,
        )
        self._pull_unary = self._channel.unary_unary(
            _SERVICE + "PullWeightsUnary",
            request_serializer=pb.PullWeightsRequest.SerializeToString,
            response_deserializer=None,
        )
        self._push_unary = self._channel.unary_unary(
            _SERVICE + "PushGradientUnary",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        self._push_and_pull = self._channel.unary_unary(
            _SERVICE + "PushAndPullUnary",
            request_serializer=None,
            response_deserializer=None,
        )
        self._layouts: dict[str, FlatLayout] = {}
        self._layout_protos: dict[str, tuple[FlatLayout, pb.Layout]] = {}

    # ---- plumbing ------------------------------------------------------------------
    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        """A unary call; UNAVAILABLE is retried (every unary method is idempotent)."""
        return self._retrying(
            lambda: method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        )

    def _retrying(self, attempt: Any) -> Any:
        """Run `attempt()`, retrying while the server is away, with jittered exponential
        backoff, for up to `timeout` seconds (a restart takes a few) and, when `retries` is
        set, at most that many times.

        UNAVAILABLE means no server answered; CANCELLED reaches us when a server stops
        while our call is in flight (we never cancel these calls ourselves). Every call
        this client makes is idempotent, so both are safe to retry.
        """
        delay, deadline = 0.1, time.monotonic() + self.timeout
        for tries in itertools.count():
            try:
                return attempt()
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                out_of_tries = self.retries is not None and tries >= self.retries
                if code not in RETRYABLE or out_of_tries or time.monotonic() + delay > deadline:
                    raise _translate(exc) from None
                log.debug("server unavailable (%s), retrying in %.2fs", code.name, delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ParameterServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises ParameterServerError otherwise)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ParameterServerError(
                "UNAVAILABLE", f"no parameter server answered at {self.address}."
            ) from None

    # ---- jobs ----------------------------------------------------------------------
    def create_job(
        self,
        model_spec: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        *,
        total_steps: int,
        mode: str = "sync",
        num_workers: int = 1,
        backup_workers: int = 0,
        staleness_bound: int = 0,
        checkpoint_every: int = 0,
        seed: int = 0,
        job_config: Mapping[str, Any] | None = None,
        job_id: str | None = None,
        initial_weights: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Create a job (or re-attach to an identical one with the same `job_id`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}.")
        spec = pb.JobSpec(
            model_spec_json=json.dumps(dict(model_spec), sort_keys=True),
            optimizer_json=json.dumps(dict(optimizer), sort_keys=True),
            mode=MODES[mode],
            num_workers=num_workers,
            backup_workers=backup_workers,
            staleness_bound=staleness_bound,
            checkpoint_every=checkpoint_every,
            total_steps=total_steps,
            seed=seed,
            job_config_json=json.dumps(dict(job_config), sort_keys=True) if job_config else "",
        )
        # a client-chosen id makes a retried create re-attach instead of creating twice
        request = pb.CreateJobRequest(job_id=job_id or uuid.uuid4().hex[:12], spec=spec)
        if initial_weights is not None:
            layout = FlatLayout.from_arrays(initial_weights)
            request.initial_layout.CopyFrom(layout.to_proto())
            request.initial_weights = layout.flatten(initial_weights).tobytes()
        response = self._call(self._stub.CreateJob, request)
        self._layouts[response.job_id] = FlatLayout.from_proto(response.layout)
        return str(response.job_id)

    def get_job(self, job_id: str, history_since: int = 0, history: bool = True) -> pb.JobInfo:
        """State, version, layout, counters and the step records of a job from step
        `history_since`: at most a page of them (10,000), oldest first; ask again from the
        step after the last one received for more."""
        request = pb.GetJobRequest(
            job_id=job_id, history_since_step=history_since, omit_history=not history
        )
        return self._call(self._stub.GetJob, request)

    def list_jobs(self) -> list[pb.JobInfo]:
        return list(self._call(self._stub.ListJobs, pb.ListJobsRequest()).jobs)

    def delete_job(self, job_id: str) -> None:
        self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id))
        self._layouts.pop(job_id, None)
        self._layout_protos.pop(job_id, None)

    def stop_job(self, job_id: str) -> pb.JobInfo:
        return self._call(self._stub.StopJob, pb.StopJobRequest(job_id=job_id))

    def checkpoint(self, job_id: str) -> pb.CheckpointJobResponse:
        return self._call(self._stub.CheckpointJob, pb.CheckpointJobRequest(job_id=job_id))

    def layout(self, job_id: str) -> FlatLayout:
        """The job's tensor layout (cached after the first call)."""
        if job_id not in self._layouts:
            info = self.get_job(job_id, history=False)
            self._layouts[job_id] = FlatLayout.from_proto(info.layout)
        return self._layouts[job_id]

    def watch(self, job_id: str, from_version: int = 0) -> Iterator[pb.JobEvent]:
        """Progress events (closed steps, state changes) until the job ends."""
        request = pb.WatchJobRequest(job_id=job_id, from_version=from_version)
        try:
            yield from self._stub.WatchJob(request, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    # ---- tensors -------------------------------------------------------------------
    def pull_weights(
        self,
        job_id: str,
        min_version: int = 0,
        out: np.ndarray | None = None,
        timeout: float | None = None,
        worker: int | None = None,
    ) -> tuple[int, np.ndarray]:
        """Wait until version >= min_version, then return (version, flat weights).

        With `out` (a flat, C-contiguous array of the job's dtype and size) the chunks
        are written straight into it; otherwise a new array is allocated. A `worker`
        that pushed to the step it waits for learns (ABORTED) when that gradient was
        voided and must be pushed again, instead of waiting for the deadline.
        """
        request = pb.PullWeightsRequest(job_id=job_id, min_version=min_version, worker=worker)
        return self._retrying(lambda: self._pull_once(request, out, timeout or self.timeout))

    def _is_small(self, nbytes: int) -> bool:
        return nbytes <= SINGLE_MESSAGE_FACTOR * self.chunk_bytes

    def _pull_once(
        self, request: pb.PullWeightsRequest, out: np.ndarray | None, timeout: float
    ) -> tuple[int, np.ndarray]:
        layout = self._layouts.get(request.job_id)
        if layout is not None and self._is_small(layout.nbytes):
            try:
                raw = self._pull_unary(request, timeout=timeout, metadata=self._metadata)
                return self._assemble(request.job_id, iter([raw]), out, None)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                    raise
                # the server chunks these weights (or the job ended): use the stream
        stream = self._pull(request, timeout=timeout, metadata=self._metadata)
        return self._assemble(request.job_id, stream, out, stream)

    def _assemble(
        self, job_id: str, messages: Iterator[bytes], out: np.ndarray | None, stream: Any
    ) -> tuple[int, np.ndarray]:
        version, assembler = -1, None
        try:
            for raw in messages:
                header_bytes, offset, data = decode_chunk_message(raw)
                if header_bytes is not None:
                    header = pb.WeightsHeader.FromString(bytes(header_bytes))
                    layout = self._known_layout(job_id, header.layout)
                    out = self._check_out(out, layout)
                    version, assembler = header.version, ChunkAssembler(out)
                if assembler is None:
                    raise WireError("the server sent weights before their header.")
                assembler.add(offset, data)
        except WireError as exc:
            if stream is not None:
                stream.cancel()
            raise ParameterServerError("DATA_LOSS", f"malformed weights stream: {exc}") from None
        if assembler is None:
            raise ParameterServerError("DATA_LOSS", "the server sent no weights.")
        try:
            assembler.finish()
        except WireError as exc:
            raise ParameterServerError("DATA_LOSS", f"incomplete weights: {exc}") from None
        return int(version), assembler.out

    def _known_layout(self, job_id: str, msg: pb.Layout) -> FlatLayout:
        """The job's layout from a weights header, parsed only when it changed."""
        cached = self._layout_protos.get(job_id)
        if cached is not None and cached[1] == msg and self._layouts.get(job_id) is cached[0]:
            return cached[0]
        layout = FlatLayout.from_proto(msg)
        self._layouts[job_id] = layout
        self._layout_protos[job_id] = (layout, msg)
        return layout

    @staticmethod
    def _check_out(out: np.ndarray | None, layout: FlatLayout) -> np.ndarray:
        if out is None:
            return layout.empty()
        if (
            out.dtype != layout.dtype
            or out.shape != (layout.total_elements,)
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(
                f"out must be a writable flat C-contiguous {layout.dtype.name} array of "
                f"{layout.total_elements} elements."
            )
        return out

    def push_gradient(
        self,
        job_id: str,
        worker: int,
        step: int,
        rows: int,
        loss: float,
        flat_grad: np.ndarray,
        timeout: float | None = None,
    ) -> pb.PushAck:
        """Send one gradient; idempotent per (job, worker, step), so retries are safe.

        Payloads up to four chunks go as one unary message, larger ones as a stream.

        Returns the PushAck (outcome ACCEPTED, DUPLICATE or DROPPED_LATE, and version).
        """
        grad, header_bytes = self._push_header(job_id, worker, step, rows, loss, flat_grad)
        data = as_bytes_view(grad)
        chunk = plan_chunk_bytes(grad.nbytes, self.chunk_bytes, grad.dtype.itemsize)

        def messages() -> Iterator[bytes]:
            for start in range(0, max(1, data.nbytes), chunk):
                piece = data[start : start + chunk]
                yield encode_chunk_message(start, piece, header_bytes if start == 0 else b"")

        deadline = timeout or self.timeout
        if data.nbytes <= chunk:  # one message: a unary call is cheaper than a stream
            message = encode_chunk_message(0, data, header_bytes)
            return self._retrying(
                lambda: self._push_unary(message, timeout=deadline, metadata=self._metadata)
            )
        return self._retrying(
            lambda: self._push(messages(), timeout=deadline, metadata=self._metadata)
        )

    def push_and_pull(
        self,
        job_id: str,
        worker: int,
        step: int,
        rows: int,
        loss: float,
        flat_grad: np.ndarray,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> tuple[int, np.ndarray]:
        """Push the gradient of `step`, then return (version, weights) with version > step.

        A worker's whole exchange of a step. When gradient and weights each fit one
        message this is a single call (the server answers once the step has closed);
        otherwise it is `push_gradient` then `pull_weights(min_version=step + 1)`.
        Idempotent like the push, so a retry after a lost answer is safe. When the server
        voids the acknowledged gradient (another worker's push failed half-way through
        the step's sum: ABORTED), the gradient is pushed again.
        """
        grad = np.ascontiguousarray(flat_grad).reshape(-1)
        for attempt in itertools.count(1):
            try:
                return self._push_and_pull_once(
                    job_id, worker, step, rows, loss, grad, out, timeout
                )
            except ParameterServerError as exc:
                if exc.code != "ABORTED" or attempt >= REPUSH_LIMIT:
                    raise
                log.info("step %d was started again (%s); pushing again", step, exc.message)
        raise AssertionError("unreachable")

    def _push_and_pull_once(
        self,
        job_id: str,
        worker: int,
        step: int,
        rows: int,
        loss: float,
        grad: np.ndarray,
        out: np.ndarray | None,
        timeout: float | None,
    ) -> tuple[int, np.ndarray]:
        layout = self._layouts.get(job_id)
        if layout is not None and self._is_small(layout.nbytes) and self._is_small(grad.nbytes):
            grad, header_bytes = self._push_header(job_id, worker, step, rows, loss, grad)
            message = encode_chunk_message(0, as_bytes_view(grad), header_bytes)
            deadline = timeout or self.timeout
            try:
                return self._retrying(lambda: self._exchange_once(job_id, message, out, deadline))
            except ParameterServerError as exc:
                if exc.reason != "too_large_for_unary":
                    raise  # refused (stale, stopped, ...): pushing again would count it twice
                # the server chunks these weights: a push stream, then a pull stream
        self.push_gradient(job_id, worker, step, rows, loss, grad, timeout=timeout)
        return self.pull_weights(
            job_id, min_version=step + 1, out=out, timeout=timeout, worker=worker
        )

    def _exchange_once(
        self, job_id: str, message: bytes, out: np.ndarray | None, timeout: float
    ) -> tuple[int, np.ndarray]:
        raw = self._push_and_pull(message, timeout=timeout, metadata=self._metadata)
        return self._assemble(job_id, iter([raw]), out, None)

    def _push_header(
        self, job_id: str, worker: int, step: int, rows: int, loss: float, flat_grad: np.ndarray
    ) -> tuple[np.ndarray, bytes]:
        """The flat C-contiguous gradient and its serialised PushHeader."""
        grad = np.ascontiguousarray(flat_grad).reshape(-1)
        header = pb.PushHeader(
            job_id=job_id,
            worker=worker,
            step=step,
            rows=rows,
            loss=float(loss),
            dtype=dtype_to_proto(grad.dtype),
            total_bytes=grad.nbytes,
        )
        layout = self._layouts.get(job_id)
        if layout is not None:
            cached = self._layout_protos.get(job_id)
            if cached is None or cached[0] is not layout:
                cached = self._layout_protos[job_id] = (layout, layout.to_proto())
            header.layout.CopyFrom(cached[1])
        return grad, header.SerializeToString()


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
