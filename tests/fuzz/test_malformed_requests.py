"""Malformed requests of every message type, sent to a real server (Hypothesis).

What "unchanged" means, exactly:
- weights, version and state of every job never change, and no job appears or vanishes;
- a rejected push that names an existing job (its header decoded and the job found)
  adds exactly 1 to that job's `received` and 1 to one `rejected[reason]`, so
  received == accepted + duplicate + dropped_late + sum(rejected) still holds;
  accepted, duplicate and dropped_late never change;
- a push rejected before its job is known (no header, undecodable header, unknown job),
  and every non-push request, changes no job's counters at all (the server's Prometheus
  metrics count those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import dtype_to_proto, encode_chunk_message

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = "/gradfleet.v1.ParameterService/"
METHODS = pb.DESCRIPTOR.services_by_name["ParameterService"].methods
UNARY_PUSHES = [m.name for m in METHODS if m.name in ("PushGradientUnary", "PushAndPullUnary")]
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ANSWER_DEADLINE = 10.0  # seconds for calls that answer at once: a busy machine may pause


@dataclass
class PushCase:
    job: str  # key into fuzz_server.jobs, or "" for no job
    defect: str
    messages: list[bytes]
    expected: set[grpc.StatusCode]
    counted: bool  # the named job's counters take the rejection


def header_for(job: Any, **changes: Any) -> pb.PushHeader:
    header = pb.PushHeader(
        job_id=job.job_id,
        worker=0,
        step=0,
        rows=4,
        loss=0.5,
        dtype=dtype_to_proto(job.layout.dtype),
        total_bytes=job.layout.nbytes,
    )
    for key, value in changes.items():
        if key == "layout":
            header.layout.CopyFrom(value)
        else:
            setattr(header, key, value)
    return header


def tile(job: Any, data: bytes, chunk: int) -> list[tuple[int, bytes]]:
    return [(start, data[start : start + chunk]) for start in range(0, len(data), chunk)]


def encode(header: pb.PushHeader, chunks: list[tuple[int, bytes]]) -> list[bytes]:
    raw = header.SerializeToString()
    if not chunks:
        return [encode_chunk_message(0, b"", raw)]
    return [
        encode_chunk_message(offset, data, raw if i == 0 else b"")
        for i, (offset, data) in enumerate(chunks)
    ]


@st.composite
def bad_layouts(draw: Any, job: Any) -> pb.Layout:
    """A Layout that differs from the job's: shapes (huge, negative), names, dtype, offsets."""
    layout = job.layout.to_proto()
    kind = draw(st.sampled_from(["shape", "name", "dtype", "offset", "drop", "empty"]))
    i = draw(st.integers(0, len(layout.tensors) - 1))
    if kind == "shape":
        shape = draw(st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=4))
        if shape == list(layout.tensors[i].shape):
            shape.append(2)
        del layout.tensors[i].shape[:]
        layout.tensors[i].shape.extend(shape)
    elif kind == "name":
        name = draw(st.text(max_size=8))
        layout.tensors[i].name = name if name != layout.tensors[i].name else name + "x"
    elif kind == "dtype":
        layout.dtype = draw(INT32.filter(lambda v: v != layout.dtype))
    elif kind == "offset":
        layout.tensors[i].offset = draw(INT64.filter(lambda v: v != layout.tensors[i].offset))
    elif kind == "drop":
        del layout.tensors[i]
        if not layout.tensors:
            layout.tensors.add(name="only", shape=[1], offset=0)
    else:
        del layout.tensors[:]
    return layout


@st.composite
def push_cases(draw: Any, jobs: dict[str, Any]) -> PushCase:
    key = draw(st.sampled_from(["sync64", "sync32", "async64"]))
    job = jobs[key]
    itemsize = job.layout.dtype.itemsize
    nbytes = job.layout.nbytes
    finite = np.zeros(job.layout.total_elements, dtype=job.layout.dtype).tobytes()
    chunk = draw(st.sampled_from([itemsize, 4 * itemsize, 64, nbytes]))
    defect = draw(
        st.sampled_from(
            [
                "worker",
                "rows",
                "loss",
                "dtype",
                "total_bytes",
                "layout",
                "step_negative",
                "future_step",
                "stopped",
                "hole",
                "overlap",
                "misaligned",
                "out_of_range",
                "extra_bytes",
                "non_finite",
                "random_bytes_and_hole",
                "second_header",
                "no_header",
                "garbage_header",
                "unknown_job",
                "empty_stream",
            ]
        )
    )
    header = header_for(job)
    chunks = tile(job, finite, chunk)
    expected, counted = {INVALID}, True
    if defect == "worker":
        bad = draw(st.one_of(st.integers(-(2**31), -1), st.integers(job.num_workers, 2**31 - 1)))
        header.worker = bad
    elif defect == "rows":
        header.rows = draw(st.integers(-(2**63), -1))
    elif defect == "loss":
        header.loss = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif defect == "dtype":
        header.dtype = draw(INT32.filter(lambda v: v != dtype_to_proto(job.layout.dtype)))
    elif defect == "total_bytes":
        header.total_bytes = draw(INT64.filter(lambda v: v != nbytes))
    elif defect == "layout":
        header.layout.CopyFrom(draw(bad_layouts(job)))
    elif defect == "step_negative":
        header.step = draw(st.integers(-(2**63), -1))
    elif defect == "future_step":
        header.step = draw(st.integers(1, 2**63 - 1))
        expected = {PRECONDITION}
    elif defect == "stopped":
        job = jobs["stopped"]
        key = "stopped"
        header = header_for(job)
        chunks = tile(job, np.zeros(job.layout.total_elements, job.layout.dtype).tobytes(), 64)
        expected = {PRECONDITION}
    elif defect == "hole":
        if len(chunks) == 1:
            chunks = [(0, finite[: nbytes - itemsize])]
        else:
            del chunks[draw(st.integers(0, len(chunks) - 1))]
            chunks = chunks or [(0, b"")]
    elif defect == "overlap":
        start = draw(st.integers(0, job.layout.total_elements - 1)) * itemsize
        chunks.append((start, finite[start : start + itemsize]))
        chunks = draw(st.permutations(chunks))
    elif defect == "misaligned":
        offset = draw(st.integers(0, nbytes - 1).filter(lambda v: v % itemsize))
        chunks = [(offset, finite[:itemsize]), *chunks]
    elif defect == "out_of_range":
        offset = draw(st.one_of(st.integers(-(2**63), -1), st.integers(nbytes, 2**63 - 1)))
        chunks = [*chunks, (offset, finite[:itemsize])]
    elif defect == "extra_bytes":
        chunks = [(0, finite + finite[:itemsize])]
    elif defect == "non_finite":
        values = np.zeros(job.layout.total_elements, dtype=job.layout.dtype)
        where = draw(st.integers(0, values.size - 1))
        values[where] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        chunks = tile(job, values.tobytes(), chunk)
    elif defect == "random_bytes_and_hole":
        noise = draw(st.binary(min_size=nbytes, max_size=nbytes))
        chunks = tile(job, noise, chunk)[:-1] or [(0, noise[: nbytes - itemsize])]
    elif defect == "second_header":
        messages = encode(header, chunks)
        messages.append(encode_chunk_message(nbytes, b"", header.SerializeToString()))
        return PushCase(key, defect, messages, {INVALID}, True)
    elif defect == "no_header":
        return PushCase("", defect, [encode_chunk_message(0, finite)], {INVALID}, False)
    elif defect == "garbage_header":
        garbage = draw(st.binary(min_size=1, max_size=64))
        try:
            pb.PushHeader.FromString(garbage)
            expected = {NOT_FOUND, INVALID}  # parsed: names no job (or job "")
        except Exception:
            expected = {INVALID}
        return PushCase("", defect, [encode_chunk_message(0, finite, garbage)], expected, False)
    elif defect == "unknown_job":
        header.job_id = draw(st.text(max_size=70).filter(lambda s: not s.startswith("fuzz-")))
        return PushCase("", defect, encode(header, chunks), {NOT_FOUND}, False)
    elif defect == "empty_stream":
        return PushCase("", defect, [], {INVALID}, False)
    return PushCase(key, defect, encode(header, chunks), expected, counted)


def call_push(channel: grpc.Channel, method: str, messages: list[bytes]) -> grpc.StatusCode:
    try:
        if method == "PushGradient":
            call = channel.stream_unary(SERVICE + method, request_serializer=None)
            call(iter(messages), timeout=20)
        else:
            call = channel.unary_unary(SERVICE + method, request_serializer=None)
            call(messages[0], timeout=20)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def assert_unchanged(before: dict, after: dict, counted_job: str | None, kit: Any) -> None:
    assert after.keys() == before.keys()
    for job_id, (version, state, weights, counters) in before.items():
        a_version, a_state, a_weights, a_counters = after[job_id]
        assert (a_version, a_state) == (version, state)
        assert a_weights == weights
        assert a_counters.accepted == counters.accepted
        assert a_counters.duplicate == counters.duplicate
        assert a_counters.dropped_late == counters.dropped_late
        bump = 1 if job_id == counted_job else 0
        assert a_counters.received == counters.received + bump
        assert kit.rejected_total(a_counters) == kit.rejected_total(counters) + bump


def examples() -> Any:
    import os

    return settings(
        max_examples=int(os.environ.get("GRADFLEET_FUZZ_EXAMPLES", "300")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=False,
    )


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_malformed_pushes_get_their_status_and_change_nothing(
    fuzz_server: Any, fuzz_kit: Any, transport: str
) -> None:
    @examples()
    @given(case=push_cases(fuzz_server.jobs), unary=st.sampled_from(UNARY_PUSHES))
    def check(case: PushCase, unary: str) -> None:
        if transport == "unary" and len(case.messages) != 1:
            return  # a unary push carries exactly one message
        method = "PushGradient" if transport == "stream" else unary
        if method == "PushAndPullUnary" and case.defect == "no_header":
            return  # a reported bug, see test_push_and_pull_without_a_header_is_invalid
        before = fuzz_server.state()
        code = call_push(fuzz_server.channel, method, case.messages)
        after = fuzz_server.state()
        assert code in case.expected, f"{case.defect}: got {code}"
        counted = fuzz_server.jobs[case.job].job_id if case.counted and case.job else None
        assert_unchanged(before, after, counted, fuzz_kit)

    check()


def test_push_and_pull_without_a_header_is_invalid(fuzz_server: Any) -> None:
    data = np.zeros(4, dtype=np.float64).tobytes()
    code = call_push(fuzz_server.channel, "PushAndPullUnary", [encode_chunk_message(0, data)])
    assert code == INVALID


@st.composite
def bad_creates(draw: Any, jobs: dict[str, Any]) -> tuple[str, pb.CreateJobRequest, set]:
    good = pb.JobSpec(
        model_spec_json='{"type": "MLP", "sizes": [4, 3], "dtype": "float32", "seed": 0}',
        optimizer_json='{"name": "sgd", "lr": 0.1}',
        mode=pb.MODE_SYNC,
        num_workers=2,
        total_steps=5,
    )
    request = pb.CreateJobRequest(job_id=f"new-{draw(st.integers(0, 10**6))}", spec=good)
    spec = request.spec
    defect = draw(
        st.sampled_from(
            [
                "num_workers",
                "backup_workers",
                "staleness",
                "checkpoint_every",
                "total_steps",
                "mode",
                "model_json",
                "optimizer_json",
                "job_config_json",
                "job_id",
                "exists",
                "weights_bytes",
                "weights_nan",
                "huge_layout",
                "layout",
            ]
        )
    )
    expected = {INVALID}
    not_json = st.text(max_size=30).filter(lambda s: not _is_json_object(s))
    if defect == "num_workers":
        spec.num_workers = draw(st.integers(-(2**31), 0))
    elif defect == "backup_workers":
        spec.backup_workers = draw(st.one_of(st.integers(-(2**31), -1), st.integers(2, 2**31 - 1)))
    elif defect == "staleness":
        spec.staleness_bound = draw(st.integers(-(2**31), -1))
    elif defect == "checkpoint_every":
        spec.checkpoint_every = draw(st.integers(-(2**31), -1))
    elif defect == "total_steps":
        spec.total_steps = draw(st.integers(-(2**63), 0))
    elif defect == "mode":
        spec.mode = draw(INT32.filter(lambda v: v not in (0, 1, 2)))
    elif defect == "model_json":
        spec.model_spec_json = draw(
            st.one_of(
                not_json,
                st.sampled_from(
                    [
                        '{"type": "MLP"}',
                        '{"type": "CNN", "sizes": [2, 2]}',
                        '{"sizes": "abc"}',
                        '{"type": "MLP", "sizes": [4, 3], "bogus": 1}',
                        "[]",
                        '""',
                    ]
                ),
            )
        )
    elif defect == "optimizer_json":
        spec.optimizer_json = draw(
            st.one_of(
                not_json,
                st.sampled_from(['{"name": "nope"}', '{"name": "sgd", "lr": "fast"}', "[1]"]),
            )
        )
    elif defect == "job_config_json":
        spec.job_config_json = draw(not_json.filter(bool))
    elif defect == "job_id":
        request.job_id = draw(
            st.text(min_size=1, max_size=80).filter(
                lambda s: (
                    not (
                        len(s) <= 64
                        and s.isascii()
                        and s[0].isalnum()
                        and all(c.isalnum() or c in "_.-" for c in s)
                    )
                )
            )
        )
    elif defect == "exists":
        request.job_id = jobs["sync64"].job_id
        expected = {grpc.StatusCode.ALREADY_EXISTS}
    elif defect in ("weights_bytes", "weights_nan", "huge_layout", "layout"):
        layout = pb.Layout(dtype=pb.DTYPE_FLOAT32)
        layout.tensors.add(name="layers.0.weight", shape=[3, 4], offset=0)
        layout.tensors.add(name="layers.0.bias", shape=[3], offset=12)
        request.initial_layout.CopyFrom(layout)
        values = np.zeros(15, dtype=np.float32)
        if defect == "weights_bytes":
            size = draw(st.integers(0, 200).filter(lambda n: n != 60))
            request.initial_weights = draw(st.binary(min_size=size, max_size=size))
        elif defect == "weights_nan":
            values[draw(st.integers(0, 14))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            request.initial_weights = values.tobytes()
        elif defect == "huge_layout":  # declared, never sent: refused before allocating
            request.initial_layout.tensors[1].shape[0] = draw(st.integers(2**20, 2**40))
            request.initial_weights = values.tobytes()
            expected = {grpc.StatusCode.RESOURCE_EXHAUSTED}
        else:
            request.initial_layout.tensors[1].offset = draw(INT64.filter(lambda v: v != 12))
            request.initial_weights = values.tobytes()
    return defect, request, expected


def _is_json_object(text: str) -> bool:
    import json

    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_malformed_job_creation_gets_its_status_and_creates_nothing(
    fuzz_server: Any, fuzz_kit: Any
) -> None:
    create = fuzz_server.channel.unary_unary(
        SERVICE + "CreateJob",
        request_serializer=pb.CreateJobRequest.SerializeToString,
        response_deserializer=pb.CreateJobResponse.FromString,
    )

    @examples()
    @given(case=bad_creates(fuzz_server.jobs))
    def check(case: tuple[str, pb.CreateJobRequest, set]) -> None:
        defect, request, expected = case
        before = fuzz_server.state()
        try:
            create(request, timeout=20)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        after = fuzz_server.state()
        assert code in expected, f"{defect}: got {code}"
        assert_unchanged(before, after, None, fuzz_kit)

    check()


@st.composite
def bad_lookups(draw: Any, jobs: dict[str, Any]) -> tuple[str, bytes, bool, set, float]:
    """(method, serialised request, server-streaming?, expected codes, deadline): a short
    deadline only where running into it is the expected answer, a long one elsewhere so
    that a pause of the busy machine cannot pass for a wrong status."""
    unknown = st.text(max_size=70).filter(lambda s: not s.startswith("fuzz-"))
    method = draw(
        st.sampled_from(
            [
                "GetJob",
                "DeleteJob",
                "StopJob",
                "CheckpointJob",
                "WatchJob",
                "PullWeights",
                "PullWeightsUnary",
            ]
        )
    )
    if method.startswith("PullWeights") and draw(st.booleans()):
        job = jobs[draw(st.sampled_from(["sync64", "sync32", "async64"]))]
        if draw(st.booleans()):  # a version the job can never reach
            version = draw(st.integers(job.total_steps + 1, 2**63 - 1))
            expected, deadline = {PRECONDITION}, ANSWER_DEADLINE
        else:  # a reachable version that does not come before the deadline
            version = draw(st.integers(1, job.total_steps))
            expected, deadline = {grpc.StatusCode.DEADLINE_EXCEEDED}, 0.1
        request = pb.PullWeightsRequest(job_id=job.job_id, min_version=version)
        return method, request.SerializeToString(), method == "PullWeights", expected, deadline
    if method == "CheckpointJob" and draw(st.booleans()):  # a server without a directory
        request = pb.CheckpointJobRequest(job_id=jobs["sync64"].job_id)
        return method, request.SerializeToString(), False, {PRECONDITION}, ANSWER_DEADLINE
    job_id = draw(unknown)
    request_type = {
        "GetJob": pb.GetJobRequest,
        "DeleteJob": pb.DeleteJobRequest,
        "StopJob": pb.StopJobRequest,
        "CheckpointJob": pb.CheckpointJobRequest,
        "WatchJob": pb.WatchJobRequest,
        "PullWeights": pb.PullWeightsRequest,
        "PullWeightsUnary": pb.PullWeightsRequest,
    }[method]
    request = request_type(job_id=job_id)
    streaming = method in ("WatchJob", "PullWeights")
    return method, request.SerializeToString(), streaming, {NOT_FOUND}, ANSWER_DEADLINE


def test_requests_for_unknown_jobs_and_versions_get_their_status(
    fuzz_server: Any, fuzz_kit: Any
) -> None:
    @examples()
    @given(case=bad_lookups(fuzz_server.jobs))
    def check(case: tuple[str, bytes, bool, set, float]) -> None:
        method, raw, streaming, expected, deadline = case
        make = fuzz_server.channel.unary_stream if streaming else fuzz_server.channel.unary_unary
        call = make(SERVICE + method, request_serializer=None, response_deserializer=None)
        before = fuzz_server.state()
        try:
            result = call(raw, timeout=deadline)
            if streaming:
                list(result)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        after = fuzz_server.state()
        assert code in expected, f"{method}: got {code}"
        assert_unchanged(before, after, None, fuzz_kit)

    check()


def test_garbage_bytes_to_every_method_get_an_error_and_the_server_stays_healthy(
    fuzz_server: Any, fuzz_kit: Any
) -> None:
    read_only = {"ListJobs", "GetJob", "WatchJob", "PullWeights", "PullWeightsUnary"}
    may_wait = {"WatchJob", "PullWeights", "PullWeightsUnary"}  # bytes that parse may wait

    @examples()
    @given(method=st.sampled_from(list(METHODS)), garbage=st.binary(max_size=256))
    def check(method: Any, garbage: bytes) -> None:
        channel = fuzz_server.channel
        kind = (method.client_streaming, method.server_streaming)
        make = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[kind]
        call = make(SERVICE + method.name, request_serializer=None, response_deserializer=None)
        before = fuzz_server.state()
        try:
            deadline = 0.5 if method.name in may_wait else ANSWER_DEADLINE
            result = call(iter([garbage]) if method.client_streaming else garbage, timeout=deadline)
            if method.server_streaming:
                list(result)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        after = fuzz_server.state()
        # bytes that happen to be a valid request may be answered, by read-only methods
        assert code != grpc.StatusCode.OK or method.name in read_only, method.name
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE), method.name
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        counted = None
        if method.name.startswith("Push") and code != grpc.StatusCode.OK:
            counted = _job_named_by(garbage, fuzz_server)
        assert_unchanged(before, after, counted, fuzz_kit)

    check()


def _job_named_by(garbage: bytes, fuzz_server: Any) -> str | None:
    """The existing job a garbage push names in a decodable header, if any (rare)."""
    from gradfleet.proto.wire import WireError, decode_chunk_message

    try:
        raw_header = decode_chunk_message(garbage)[0]
        header = pb.PushHeader.FromString(bytes(raw_header or b""))
    except (WireError, Exception):
        return None
    known = {job.job_id for job in fuzz_server.jobs.values()}
    return header.job_id if header.job_id in known else None
