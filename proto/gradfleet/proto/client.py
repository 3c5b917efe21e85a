"""The Python client of the gradfleet parameter server, used by workers, the trainer and
the SDK alike (it imports no Ray).

    with ParameterServerClient("127.0.0.1:50051", token=None) as ps:
        job = ps.create_job(spec, {"name": "sgd", "lr": 0.1}, num_workers=2, total_steps=10)
        version, weights = ps.pull_weights(job, min_version=0)      # flat array
        ack = ps.push_gradient(job, worker=0, step=version, rows=32, loss=0.7, flat_grad=g)

Weights and gradients are flat arrays in the job's layout (`ps.layout(job)` names the
tensors). A failed call raises the `gradfleet.proto.errors` class of its reason
(`StaleGradient`, `JobStopped`, `JobNotFound`, ...).

Retries: the channel's gRPC retry policy retries a call that found no server
(UNAVAILABLE) a few times with backoff; beyond that this client keeps trying, for up to
`patience` seconds, and before each try asks `locate` (when given) where the server is
now, so a server that moved (a Ray actor restarted on another node) is followed. Every
call is idempotent (a push per (job, worker, step), a create by its job id), so retrying
is safe.

Compression: a job whose `compression` names a lossy codec gets each gradient as that
codec's payload, encoded here with an error-feedback residual per (job, worker); pulled
weights are decoded from the job's `pull_compression`. A new client starts with a zero
residual (see `gradfleet.proto.codecs`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_status import rpc_status

from gradfleet.proto.codecs import NO_CODEC, Codec, Residual
from gradfleet.proto.errors import (
    DataLoss,
    GradfleetError,
    Reason,
    ServerUnavailable,
    Unauthenticated,
    error_for,
)
from gradfleet.proto.exchange import StreamedExchange
from gradfleet.proto.runtime import keep_message_buffers_mapped
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from gradfleet.proto.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    KEEPALIVE_MS,
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

_SERVICE = "gradfleet.v1.ParameterService"
MODES = {"sync": pb.MODE_SYNC, "async": pb.MODE_ASYNC}
_T = TypeVar("_T")
# gRPC's own retries of a call that found no server: up to 5 attempts, 0.1 s to 1 s apart.
_RETRY_POLICY = {
    "methodConfig": [
        {
            # every method but the bidirectional PushAndPull: a retried attempt of it would
            # replay a push whose request stream is still being written, and a failed
            # overlapped step is redone by its worker instead
            "name": [
                {"service": _SERVICE, "method": method.name}
                for method in pb.DESCRIPTOR.services_by_name["ParameterService"].methods
                if method.name != "PushAndPull"
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                # CANCELLED: the server stopped while the call was in flight
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ]
}


def _error(exc: grpc.RpcError, address: str) -> GradfleetError:
    """The typed error a failed call stands for, its reason read from the rich status."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    reason = None
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        found = pb.ErrorDetail()
        if detail.Unpack(found) and found.reason:
            reason = Reason[pb.ErrorReason.Name(found.reason).removeprefix("ERROR_REASON_")]
    # a server that stops while a call is in flight ends it CANCELLED: it is as gone as
    # one that does not answer, and the caller looks for it again the same way
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and reason is None:
        return unreachable(address)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        problem = "wrong" if "wrong" in details else "missing"
        return Unauthenticated(
            f"the server at {address} refused the call: its token is {problem}; pass the "
            "server's token (token= in Python, --token-file on the command line)"
        )
    return error_for(code, details.rstrip(".") or f"the call failed with {code.name}", reason)


def unreachable(address: str) -> ServerUnavailable:
    return ServerUnavailable(
        f"no gradfleet server at {address} (is `gradfleet server` running?)", Reason.UNREACHABLE
    )


def counters_dict(counters: pb.JobCounters) -> dict[str, Any]:
    """A job's push counters as plain data: received, accepted, duplicate, dropped_late,
    rejected (by reason)."""
    return {
        "received": counters.received,
        "accepted": counters.accepted,
        "duplicate": counters.duplicate,
        "dropped_late": counters.dropped_late,
        "dropped_removed": counters.dropped_removed,
        "rejected": dict(counters.rejected),
    }


def membership_event(event: pb.MembershipEvent) -> dict[str, Any]:
    """A membership event as plain data (what local mode replays)."""
    return {
        "version": event.version,
        "old": list(event.old),
        "new": list(event.new),
        "reason": event.reason,
        "mid_step": event.mid_step,
    }


@dataclass(frozen=True)
class _JobWire:
    """What the client must know of a job to talk to it: its layout (parsed and as
    sent), whether the server sends its weights as one message, and the range of a
    sharded job this server holds."""

    job_id: str
    layout: FlatLayout
    layout_msg: pb.Layout
    weights_fit_one_message: bool
    shard: pb.ShardInfo | None = None
    codec: Codec = NO_CODEC  # the job's gradient compression


class ParameterServerClient:
    """One channel to a parameter server; thread-safe, reuse it for every call.

    `timeout` is each call's deadline (a pull may wait that long for its version);
    `patience` is how long an unreachable server is tried; `locate()` names the server's
    current address when it may move.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_root_cert: bytes | str | Path | None = None,
        timeout: float = 60.0,
        *,
        patience: float | None = None,
        locate: Callable[[], str] | None = None,
        tls_client_cert: bytes | str | Path | None = None,
        tls_client_key: bytes | str | Path | None = None,
        tls_server_name: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_ms: int = KEEPALIVE_MS,
    ) -> None:
        self.timeout = timeout
        self.patience = timeout if patience is None else patience
        self.chunk_bytes = chunk_bytes
        self._locate = locate
        keep_message_buffers_mapped()  # megabyte messages: reuse buffers, no page faults
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._options: list[tuple[str, Any]] = [
            *client_options(max_message_bytes, keepalive_ms),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(_RETRY_POLICY)),
        ]
        self._credentials = None
        if tls_root_cert is not None or tls_client_cert is not None:
            if tls_server_name:
                self._options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_root_cert),
                private_key=_pem(tls_client_key),
                certificate_chain=_pem(tls_client_cert),
            )
        self._jobs: dict[str, _JobWire] = {}
        self._residuals: dict[tuple[str, int], Residual] = {}  # (job, worker) -> feedback
        self._residuals_lock = threading.Lock()
        self._membership_events: dict[str, int] = {}  # per job, from the last weights
        self._connect(address)

    def _connect(self, address: str) -> None:
        self.address = address
        if self._credentials is not None:
            self._channel = grpc.secure_channel(address, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(address, options=self._options)
        self._stub = pb_grpc.ParameterServiceStub(self._channel)
        raw = {"request_serializer": None, "response_deserializer": None}
        self._pull = self._channel.unary_stream(
            f"/{_SERVICE}/PullWeights",
            request_serializer=pb.PullWeightsRequest.SerializeToString,
            response_deserializer=None,  # raw bytes, decoded without copies
        )
        self._pull_unary = self._channel.unary_unary(
            f"/{_SERVICE}/PullWeightsUnary",
            request_serializer=pb.PullWeightsRequest.SerializeToString,
            response_deserializer=None,
        )
        self._push = self._channel.stream_unary(
            f"/{_SERVICE}/PushGradient",
            request_serializer=None,  # messages are encoded by hand
            response_deserializer=pb.PushAck.FromString,
        )
        self._push_unary = self._channel.unary_unary(
            f"/{_SERVICE}/PushGradientUnary",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        self._exchange = self._channel.unary_unary(f"/{_SERVICE}/PushAndPullUnary", **raw)
        self._push_and_pull = self._channel.stream_stream(f"/{_SERVICE}/PushAndPull", **raw)

    def _call(self, attempt: Callable[[], _T]) -> _T:
        """Run `attempt()`; while no server answers (gRPC's own retries spent), ask
        `locate` where it is now and try again, with backoff, for up to `patience`."""
        deadline, delay = time.monotonic() + self.patience, 0.2
        while True:
            channel = self._channel
            try:
                return attempt()
            except (grpc.RpcError, ValueError) as exc:
                if self._channel is not channel:
                    continue  # another thread's call moved this client to the new address
                if not isinstance(exc, grpc.RpcError):
                    raise
                error = _error(exc, self.address)
            if not isinstance(error, ServerUnavailable):
                raise error from None
            address = self._locate() if self._locate is not None else self.address
            if address != self.address:
                log.warning("parameter server moved from %s to %s", self.address, address)
                self._channel.close()
                self._connect(address)
                deadline = time.monotonic() + self.patience  # a new server gets full patience
                continue
            if time.monotonic() > deadline:
                raise error from None
            log.debug("no server at %s, trying again in %.1fs", self.address, delay)
            time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)

    def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """`method` of the service stub (looked up per attempt: the channel may change)."""
        return self._call(
            lambda: getattr(self._stub, method)(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ParameterServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; ServerUnavailable if it does not in time."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise unreachable(self.address) from None

    # jobs

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
        keep_every: int = 0,
        shard: pb.ShardInfo | None = None,
        compression: str = "none",
        pull_compression: str = "none",
        min_workers: int = 0,
        max_workers: int = 0,
        global_batch: int = 0,
        member_grace_seconds: float = 0.0,
    ) -> str:
        """Create a job (or re-attach to an identical one with the same `job_id`).
        `keep_every` K: the job keeps every K-th version's weights for exact pulls;
        `shard`: this server holds one range of the job (see `ShardedClient`);
        `compression` / `pull_compression`: the codecs of gradients and pulled weights
        (`gradfleet.proto.codecs`); `min_workers`..`max_workers`: the sizes its
        membership may take (`set_members`), `global_batch` the rows every step's members
        split evenly (0: rows per worker), `member_grace_seconds` how long a silent member
        stays one while a step waits for it (0: until removed)."""
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
            keep_every=keep_every,
            shard=shard,
            compression=_codec_name(compression),
            pull_compression=_codec_name(pull_compression),
            min_workers=min_workers,
            max_workers=max_workers,
            global_batch=global_batch,
            member_grace_seconds=member_grace_seconds,
        )
        # a client-chosen id makes a retried create re-attach instead of creating twice
        request = pb.CreateJobRequest(job_id=job_id or uuid.uuid4().hex[:12], spec=spec)
        if initial_weights is not None:
            layout = FlatLayout.from_arrays(initial_weights)
            request.initial_layout.CopyFrom(layout.to_proto())
            request.initial_weights = layout.flatten(initial_weights).tobytes()
        response = self._unary("CreateJob", request)
        self._learn(response.job_id, response.layout, response.weights_fit_one_message, spec)
        return str(response.job_id)

    def _learn(
        self, job_id: str, layout: pb.Layout, one_message: bool, spec: pb.JobSpec
    ) -> _JobWire:
        shard = spec.shard if spec.HasField("shard") else None
        codec = Codec.parse(spec.compression)
        known = self._jobs.get(job_id)
        if known is None or (known.layout_msg, known.shard, known.codec) != (layout, shard, codec):
            parsed = FlatLayout.from_proto(layout)
            known = _JobWire(job_id, parsed, layout, one_message, shard, codec)
            self._jobs[job_id] = known
        return known

    def _wire(self, job_id: str) -> _JobWire:
        return self._jobs.get(job_id) or self._describe(job_id)

    def _describe(self, job_id: str) -> _JobWire:
        info = self.get_job(job_id, history=False)
        return self._learn(job_id, info.layout, info.weights_fit_one_message, info.spec)

    def get_job(self, job_id: str, history_since: int = 0, history: bool = True) -> pb.JobInfo:
        """State, version, layout, counters and the step records of a job from step
        `history_since`: at most a page of them (10,000), oldest first; ask again from the
        step after the last one received for more."""
        request = pb.GetJobRequest(
            job_id=job_id, history_since_step=history_since, omit_history=not history
        )
        return self._unary("GetJob", request)

    def list_jobs(self) -> list[pb.JobInfo]:
        return list(self._unary("ListJobs", pb.ListJobsRequest()).jobs)

    def delete_job(self, job_id: str) -> None:
        self._unary("DeleteJob", pb.DeleteJobRequest(job_id=job_id))
        self._jobs.pop(job_id, None)
        with self._residuals_lock:
            for key in [key for key in self._residuals if key[0] == job_id]:
                del self._residuals[key]

    def stop_job(self, job_id: str) -> pb.JobInfo:
        return self._unary("StopJob", pb.StopJobRequest(job_id=job_id))

    def checkpoint(self, job_id: str) -> pb.CheckpointJobResponse:
        return self._unary("CheckpointJob", pb.CheckpointJobRequest(job_id=job_id))

    def restore_job(self, job_id: str, version: int) -> pb.JobInfo:
        """Make the server go back to its checkpoint of `version` (see RestoreJob)."""
        return self._unary("RestoreJob", pb.RestoreJobRequest(job_id=job_id, version=version))

    def set_members(
        self,
        job_id: str,
        members: Sequence[int],
        reason: str = "",
        from_version: int | None = None,
        at_once: bool = True,
    ) -> pb.JobInfo:
        """Make `members` the job's workers from step `from_version`; None: for the open
        step when only workers that have not pushed to it leave, else from the next step
        (see SetMembers). One server always changes as soon as it may (`at_once`)."""
        request = pb.SetMembersRequest(
            job_id=job_id, members=list(members), reason=reason, from_version=from_version
        )
        return self._unary("SetMembers", request)

    def scale_job(self, job_id: str, workers: int) -> pb.JobInfo:
        """Ask whoever runs the job's workers for `workers` of them."""
        return self._unary("ScaleJob", pb.ScaleJobRequest(job_id=job_id, workers=workers))

    def membership_events(self, job_id: str) -> int:
        """The job's count of membership events in the last weights pulled (-1: none
        pulled yet); when it grows, `get_job` tells the new members."""
        return self._membership_events.get(job_id, -1)

    def record_evaluation(self, job_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Tell the server the held-out metrics of version `step` (`status` shows them)."""
        evaluation = pb.Evaluation(step=step, metrics=dict(metrics))
        request = pb.RecordEvaluationRequest(job_id=job_id, evaluation=evaluation)
        self._unary("RecordEvaluation", request)

    def layout(self, job_id: str) -> FlatLayout:
        """The job's tensor layout (asked once, then known)."""
        return self._wire(job_id).layout

    def exchanges_in_one_message(self, job_id: str) -> bool:
        """Whether a step's gradient and weights each travel as one message: then one
        unary `push_and_pull` is the cheapest exchange, and nothing could overlap."""
        wire = self._wire(job_id)
        size, dtype = wire.layout.total_elements, wire.layout.dtype
        payload = wire.codec.payload_bytes(size, dtype)
        return wire.weights_fit_one_message and payload <= plan_chunk_bytes(
            payload, self.chunk_bytes, 1
        )

    def watch(self, job_id: str, from_version: int = 0) -> Iterator[pb.JobEvent]:
        """Progress events (closed steps, state changes) until the job ends."""
        request = pb.WatchJobRequest(job_id=job_id, from_version=from_version)
        try:
            yield from self._stub.WatchJob(request, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc, self.address) from None

    # tensors

    def pull_weights(
        self,
        job_id: str,
        min_version: int = 0,
        out: np.ndarray | None = None,
        timeout: float | None = None,
        exact: bool = False,
        full_precision: bool = False,
    ) -> tuple[int, np.ndarray]:
        """Wait until version >= min_version, then return (version, flat weights).

        With `out` (a flat, C-contiguous array of the job's dtype and size) the chunks
        are written straight into it; otherwise a new array is allocated. With `exact`,
        the weights of min_version itself (a version the job keeps: see `keep_every`).
        Weights come through the job's pull_compression unless `exact` or
        `full_precision`.
        """
        request = pb.PullWeightsRequest(
            job_id=job_id, min_version=min_version, exact=exact, full_precision=full_precision
        )
        deadline = timeout or self.timeout
        wire = self._wire(job_id)
        if wire.weights_fit_one_message:
            return self._call(
                lambda: self._weights(
                    wire,
                    iter([self._pull_unary(request, timeout=deadline, metadata=self._metadata)]),
                    out,
                )
            )
        return self._call(
            lambda: self._weights(
                wire, self._pull(request, timeout=deadline, metadata=self._metadata), out
            )
        )

    def _weights(
        self, wire: _JobWire, messages: Iterator[bytes], out: np.ndarray | None
    ) -> tuple[int, np.ndarray]:
        """Assemble a pull's messages into `out` (or a new array), decoding a codec's
        payload; returns (version, out)."""
        version, assembler, codec = -1, None, NO_CODEC
        size, dtype = 0, np.dtype(np.uint8)
        target = _out(out, wire.layout)
        try:
            for raw in messages:
                header_bytes, offset, data = decode_chunk_message(raw)
                if header_bytes is not None:
                    header = pb.WeightsHeader.FromString(bytes(header_bytes))
                    if header.layout != wire.layout_msg:
                        raise WireError("the weights' layout is not the job's.")
                    codec = _parse_codec(header.codec)
                    self._membership_events[wire.job_id] = header.membership_events
                    size, dtype = wire.layout.total_elements, wire.layout.dtype
                    if header.total_bytes != codec.payload_bytes(size, dtype):
                        raise WireError(f"{header.total_bytes} bytes of {codec} weights.")
                    lossless = codec.name == "none"
                    buffer = target if lossless else np.empty(header.total_bytes, np.uint8)
                    version, assembler = header.version, ChunkAssembler(buffer)
                if assembler is None:
                    raise WireError("the server sent weights before their header.")
                assembler.add(offset, data)
            if assembler is None:
                raise WireError("the server sent no weights.")
            assembler.finish()
            if codec.name != "none":
                for place, values in codec.parts(assembler.out, size, dtype):
                    target[place] = values
        except WireError as exc:
            if hasattr(messages, "cancel"):
                messages.cancel()
            raise DataLoss(f"the weights from {self.address} are malformed: {exc}") from None
        return int(version), target

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
        Returns the PushAck (outcome ACCEPTED, DUPLICATE or DROPPED_LATE, and version)."""
        data, itemsize, header = self._push_message(job_id, worker, step, rows, loss, flat_grad)
        chunk = plan_chunk_bytes(data.nbytes, self.chunk_bytes, itemsize)
        deadline = timeout or self.timeout
        if data.nbytes <= chunk:  # one message: a unary call is cheaper than a stream
            message = encode_chunk_message(0, data, header)
            return self._call(
                lambda: self._push_unary(message, timeout=deadline, metadata=self._metadata)
            )

        def messages() -> Iterator[bytes]:
            for start in range(0, data.nbytes, chunk):
                piece = data[start : start + chunk]
                yield encode_chunk_message(start, piece, header if start == 0 else b"")

        return self._call(lambda: self._push(messages(), timeout=deadline, metadata=self._metadata))

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

        A worker's whole exchange of a step: one call when the gradient and the weights
        each fit one message (the server answers once the step has closed), otherwise
        `push_gradient` then `pull_weights(min_version=step + 1)`. Idempotent like the push.
        """
        wire = self._wire(job_id)
        data, itemsize, header = self._push_message(job_id, worker, step, rows, loss, flat_grad)
        one = plan_chunk_bytes(data.nbytes, self.chunk_bytes, itemsize)
        if not (wire.weights_fit_one_message and data.nbytes <= one):
            self.push_gradient(job_id, worker, step, rows, loss, flat_grad, timeout=timeout)
            return self.pull_weights(job_id, min_version=step + 1, out=out, timeout=timeout)
        message = encode_chunk_message(0, data, header)
        deadline = timeout or self.timeout
        return self._call(
            lambda: self._weights(
                wire,
                iter([self._exchange(message, timeout=deadline, metadata=self._metadata)]),
                out,
            )
        )

    def begin_exchange(
        self,
        job_id: str,
        worker: int,
        step: int,
        flat_grad: np.ndarray,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> StreamedExchange:
        """Start worker `worker`'s step `step` as one PushAndPull stream: `send` ranges of
        `flat_grad` as they become final, then read the next weights into `out` as they
        arrive (see `gradfleet.proto.exchange`). Idempotent like `push_and_pull`, which
        is the way to retry a failed exchange of the same step."""
        known = self._wire(job_id)
        grad = flat_grad.reshape(-1)
        if grad.dtype != known.layout.dtype or not grad.flags.c_contiguous:
            raise ValueError(f"the gradient must be a flat {known.layout.dtype.name} array.")
        total = known.codec.payload_bytes(grad.size, grad.dtype)
        residual = None if known.codec.name == "none" else self._residual(job_id, worker, grad)
        deadline = timeout or self.timeout

        def header(rows: int, loss: float) -> bytes:
            return self._header(known, job_id, worker, step, rows, loss, grad.dtype, total)

        return StreamedExchange(
            start=lambda requests: self._push_and_pull(
                requests, timeout=deadline, metadata=self._metadata
            ),
            header=header,
            grad=grad,
            out=_out(out, known.layout),
            step=step,
            codec=known.codec,
            residual=residual,
            pull_layout=known.layout_msg,
            chunk_bytes=self.chunk_bytes,
            error=lambda exc: _error(exc, self.address),
            on_header=lambda h: self._membership_events.__setitem__(job_id, h.membership_events),
        )

    def _push_message(
        self, job_id: str, worker: int, step: int, rows: int, loss: float, flat_grad: np.ndarray
    ) -> tuple[memoryview, int, bytes]:
        """What a push sends: its bytes (the gradient's, or the job codec's payload of it),
        their alignment, and the serialised PushHeader."""
        grad = np.ascontiguousarray(flat_grad).reshape(-1)
        known = self._wire(job_id)
        if known.codec.name == "none" or grad.dtype != known.layout.dtype:
            # a wrong dtype is for the server to refuse
            header = self._header(known, job_id, worker, step, rows, loss, grad.dtype, grad.nbytes)
            return as_bytes_view(grad), grad.dtype.itemsize, header
        payload = self._residual(job_id, worker, grad).encode(grad, step)
        header = self._header(known, job_id, worker, step, rows, loss, grad.dtype, payload.nbytes)
        return as_bytes_view(payload), 1, header

    def _residual(self, job_id: str, worker: int, grad: np.ndarray) -> Residual:
        """Worker `worker`'s error feedback for this job (zero when new)."""
        with self._residuals_lock:
            residual = self._residuals.get((job_id, worker))
            if residual is None or residual.size != grad.size:
                codec = self._wire(job_id).codec
                residual = self._residuals[job_id, worker] = Residual(codec, grad.size, grad.dtype)
            return residual

    @staticmethod
    def _header(
        known: _JobWire,
        job_id: str,
        worker: int,
        step: int,
        rows: int,
        loss: float,
        dtype: np.dtype,
        total_bytes: int,
    ) -> bytes:
        """A serialised PushHeader: the data is `known.codec`'s payload unless the dtype
        is not the job's (a push the server will refuse)."""
        header = pb.PushHeader(
            job_id=job_id,
            worker=worker,
            step=step,
            rows=rows,
            loss=float(loss),
            dtype=dtype_to_proto(dtype),
            total_bytes=total_bytes,
        )
        header.layout.CopyFrom(known.layout_msg)
        if known.shard is not None:
            header.shard.CopyFrom(known.shard)
        if known.codec.name != "none" and dtype == known.layout.dtype:
            header.codec = str(known.codec)
        return header.SerializeToString()


def _codec_name(text: str) -> str:
    """A codec's canonical name for the job spec ("" for none); ValueError if unknown."""
    codec = Codec.parse(text)
    return "" if codec.name == "none" else str(codec)


def _parse_codec(text: str) -> Codec:
    try:
        return Codec.parse(text)
    except ValueError as exc:
        raise WireError(str(exc)) from None


def _out(out: np.ndarray | None, layout: FlatLayout) -> np.ndarray:
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


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
