"""Every bad input gets its documented status and changes nothing (real server, loopback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import serve

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _header(job: str, job_layout: FlatLayout, **overrides: object) -> pb.PushHeader:
    fields: dict = {
        "job_id": job,
        "worker": 1,
        "step": 0,
        "rows": 4,
        "loss": 1.0,
        "dtype": pb.DTYPE_FLOAT64,
        "total_bytes": job_layout.nbytes,
        "layout": job_layout.to_proto(),
    }
    fields.update(overrides)
    return pb.PushHeader(**fields)


def _messages(header: pb.PushHeader, pieces: list[tuple[int, bytes]]) -> list[bytes]:
    out = []
    for i, (offset, data) in enumerate(pieces):
        out.append(
            encode_chunk_message(offset, data, header.SerializeToString() if i == 0 else b"")
        )
    return out


def _split(data: bytes) -> list[tuple[int, bytes]]:
    half = len(data) // 2 // 8 * 8
    return [(0, data[:half]), (half, data[half:])]


def _nan_in_second_chunk(data: bytes, value: float) -> list[tuple[int, bytes]]:
    arr = np.frombuffer(data, dtype=np.float64).copy()
    arr[-1] = value
    return _split(arr.tobytes())


def _wrong_layout(layout: FlatLayout) -> pb.Layout:
    msg = layout.to_proto()
    msg.tensors[0].shape[:] = list(reversed(msg.tensors[0].shape))
    return msg


# (name, header overrides, chunk maker, expected reason)
CASES: list[tuple[str, Callable, Callable, str]] = [
    ("short byte count", lambda j, lay: {"total_bytes": lay.nbytes - 8}, _split, "bad_bytes"),
    ("missing tail", lambda j, lay: {}, lambda d: _split(d)[:1], "bad_bytes"),
    ("hole", lambda j, lay: {}, lambda d: [(0, d[:64]), (72, d[72:])], "bad_bytes"),
    ("overlap", lambda j, lay: {}, lambda d: [(0, d[:72]), (64, d[64:])], "bad_bytes"),
    ("past the end", lambda j, lay: {}, lambda d: [(0, d), (len(d), d[:8])], "bad_bytes"),
    ("misaligned", lambda j, lay: {}, lambda d: [(0, d[:60]), (60, d[60:])], "bad_bytes"),
    (
        "wrong dtype",
        lambda j, lay: {"dtype": pb.DTYPE_FLOAT32, "total_bytes": lay.nbytes // 2},
        lambda d: [(0, d[: len(d) // 2])],
        "bad_dtype",
    ),
    ("unknown dtype", lambda j, lay: {"dtype": 9}, _split, "bad_dtype"),
    ("wrong layout", lambda j, lay: {"layout": _wrong_layout(lay)}, _split, "bad_layout"),
    ("NaN", lambda j, lay: {}, lambda d: _nan_in_second_chunk(d, np.nan), "non_finite"),
    ("Inf", lambda j, lay: {}, lambda d: _nan_in_second_chunk(d, -np.inf), "non_finite"),
    ("NaN loss", lambda j, lay: {"loss": float("nan")}, _split, "non_finite"),
    ("negative rows", lambda j, lay: {"rows": -1}, _split, "bad_rows"),
    ("worker >= N", lambda j, lay: {"worker": 2}, _split, "bad_worker"),
    ("negative worker", lambda j, lay: {"worker": -1}, _split, "bad_worker"),
]


@pytest.mark.parametrize(
    ("name", "overrides", "chunks", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_push_is_invalid_argument_and_changes_nothing(
    server, client: ParameterServerClient, make_job, state_of, kit, name, overrides, chunks, reason
) -> None:
    # prepare: worker 0 has already pushed (acknowledged), so a step's sum is in progress
    job, layout, _, ref = make_job(num_workers=2)
    g0, g1 = kit.gradient(layout, 0, 0), kit.gradient(layout, 1, 0)
    client.push_gradient(job, 0, 0, 4, 1.0, g0)
    before = state_of(job)
    messages = _messages(_header(job, layout, **overrides(job, layout)), chunks(g1.tobytes()))
    # execute
    with pytest.raises(grpc.RpcError) as err:
        kit.raw_push(server.address, messages)
    # assert
    assert err.value.code() == INVALID, err.value.details()
    assert err.value.details() and err.value.details().endswith(".")
    version, weights, counters = state_of(job)
    assert (version, weights) == before[:2]
    assert (counters.accepted, counters.duplicate, counters.dropped_late) == (1, 0, 0)
    assert dict(counters.rejected) == {reason: 1}  # worker 0's acknowledged push stands
    assert counters.received == 2
    client.push_gradient(job, 1, 0, 4, 1.0, g1)  # the server still serves, nothing lost
    _, after = client.pull_weights(job, min_version=1)
    assert after.tobytes() == ref.sync_step([g0, g1]).tobytes()


def _unary_push(address: str, message: bytes) -> pb.PushAck:
    with grpc.insecure_channel(address) as channel:
        push = channel.unary_unary(
            "/gradfleet.v1.ParameterService/PushGradientUnary",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        return push(message, timeout=10)


def test_a_unary_push_short_of_its_byte_count_leaves_other_acks_standing(
    server, client: ParameterServerClient, make_job, state_of, kit
) -> None:
    # prepare: worker 0's gradient is acknowledged; worker 1 sends one message 8 bytes short
    job, layout, _, ref = make_job(num_workers=2)
    g0, g1 = kit.gradient(layout, 0, 0), kit.gradient(layout, 1, 0)
    client.push_gradient(job, 0, 0, 4, 1.0, g0)
    before = state_of(job)
    message = encode_chunk_message(0, g1.tobytes()[:-8], _header(job, layout).SerializeToString())
    # execute
    with pytest.raises(grpc.RpcError) as err:
        _unary_push(server.address, message)
    # assert: refused before anything was added; worker 0 never has to push again
    version, weights, counters = state_of(job)
    assert err.value.code() == INVALID
    assert (version, weights) == before[:2]
    assert counters.accepted == 1 and dict(counters.rejected) == {"bad_bytes": 1}
    client.push_gradient(job, 1, 0, 4, 1.0, g1)
    _, after = client.pull_weights(job, min_version=1)
    assert after.tobytes() == ref.sync_step([g0, g1]).tobytes()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_nan_retry_of_an_accepted_push_is_invalid_argument(
    server, client: ParameterServerClient, make_job, state_of, kit, stream: bool
) -> None:
    # prepare: worker 0's gradient of step 0 is in; the same (worker, step) comes with NaN
    job, layout, *_ = make_job(num_workers=2)
    g0 = kit.gradient(layout, 0, 0)
    client.push_gradient(job, 0, 0, 4, 1.0, g0)
    before = state_of(job)
    bad = g0.copy()
    bad[-1] = np.nan
    header = _header(job, layout, worker=0)
    # execute: every push's data is checked, duplicates included
    with pytest.raises(grpc.RpcError) as err:
        if stream:
            kit.raw_push(server.address, _messages(header, _split(bad.tobytes())))
        else:
            _unary_push(
                server.address, encode_chunk_message(0, bad.tobytes(), header.SerializeToString())
            )
    # assert
    _, _, counters = state_of(job)
    assert err.value.code() == INVALID and "NaN" in (err.value.details() or "")
    assert state_of(job)[:2] == before[:2]
    assert counters.duplicate == 0 and dict(counters.rejected) == {"non_finite": 1}


@pytest.mark.parametrize(
    "messages",
    [[], [b"\xff\xff\xff\xff"], [encode_chunk_message(0, b"\x00" * 8)]],
    ids=["empty stream", "garbage", "no header"],
)
def test_malformed_push_stream_is_invalid_argument(
    server, client: ParameterServerClient, make_job, state_of, kit, messages
) -> None:
    # prepare
    job, *_ = make_job(num_workers=2)
    before = state_of(job)
    # execute
    with pytest.raises(grpc.RpcError) as err:
        kit.raw_push(server.address, messages)
    # assert
    assert err.value.code() == INVALID
    assert state_of(job)[:2] == before[:2]


def test_second_header_is_invalid_argument(
    server, make_job, state_of, kit, client: ParameterServerClient
) -> None:
    # prepare
    job, layout, *_ = make_job(num_workers=2)
    data = kit.gradient(layout, 1, 0).tobytes()
    header = _header(job, layout).SerializeToString()
    half = len(data) // 2 // 8 * 8
    messages = [
        encode_chunk_message(0, data[:half], header),
        encode_chunk_message(half, data[half:], header),
    ]
    before = state_of(job)
    # execute
    with pytest.raises(grpc.RpcError) as err:
        kit.raw_push(server.address, messages)
    # assert
    assert err.value.code() == INVALID
    assert state_of(job)[:2] == before[:2]


def test_unknown_job_is_not_found_everywhere(client: ParameterServerClient, kit) -> None:
    # prepare
    grad = np.zeros(3)
    calls = {
        "get": lambda: client.get_job("nope"),
        "pull": lambda: client.pull_weights("nope", 0),
        "push": lambda: client.push_gradient("nope", 0, 0, 1, 1.0, grad),
        "stop": lambda: client.stop_job("nope"),
        "delete": lambda: client.delete_job("nope"),
        "watch": lambda: list(client.watch("nope")),
    }
    for name, call in calls.items():
        # execute
        with pytest.raises(GradfleetError) as err:
            call()
        # assert
        assert err.value.code.name == "NOT_FOUND", name
        assert "does not exist" in err.value.message


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 2, "backup_workers": 2}, "backup_workers"),
        ({"total_steps": 0}, "total_steps"),
        ({"staleness_bound": -1}, "staleness_bound"),
        ({"optimizer": {"name": "nosuch", "lr": 0.1}}, "optimizer"),
        ({"optimizer": {"name": "sgd", "lr": -1.0}}, "optimizer"),
        ({"spec": {"type": "MLP", "sizes": [], "dtype": "float64"}}, "model spec"),
        ({"job_id": "../escape"}, "job id"),
    ],
)
def test_bad_job_config_is_invalid_argument(
    client: ParameterServerClient, kit, changes: dict, fragment: str
) -> None:
    # prepare
    args = {"spec": kit.SPEC64, "optimizer": kit.SGD, "total_steps": 5, "num_workers": 1}
    args.update(changes)
    spec, optimizer = args.pop("spec"), args.pop("optimizer")
    # execute
    with pytest.raises(GradfleetError) as err:
        client.create_job(spec, optimizer, **args)
    # assert
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert fragment in err.value.message
    assert client.list_jobs() == []


@pytest.mark.parametrize(
    ("model_spec_json", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        ('{"type": "MLP", "sizes": [1e400, 3]}', "cannot convert float infinity"),
        ('{"type": "MLP", "sizes": [6, 8, 3], "seed": 1e400}', "cannot convert float infinity"),
    ],
)
def test_bad_json_is_invalid_argument(server, model_spec_json: str, fragment: str) -> None:
    # prepare
    request = pb.CreateJobRequest(
        spec=pb.JobSpec(
            model_spec_json=model_spec_json, optimizer_json="{}", total_steps=1, num_workers=1
        )
    )
    # execute
    with grpc.insecure_channel(server.address) as channel:
        stub = channel.unary_unary(
            "/gradfleet.v1.ParameterService/CreateJob",
            request_serializer=pb.CreateJobRequest.SerializeToString,
            response_deserializer=pb.CreateJobResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            stub(request, timeout=10)
    # assert
    assert err.value.code() == INVALID
    assert fragment in err.value.details()


METHODS = [
    "CreateJob",
    "GetJob",
    "ListJobs",
    "DeleteJob",
    "StopJob",
    "CheckpointJob",
    "PullWeights",
    "PushGradient",
    "PullWeightsUnary",
    "PushGradientUnary",
    "WatchJob",
]


@pytest.mark.parametrize("method", METHODS)
def test_malformed_bytes_get_an_error_status_and_the_server_keeps_serving(
    server, client: ParameterServerClient, make_job, state_of, kit, method: str
) -> None:
    # prepare
    job, layout, *_ = make_job(num_workers=1)
    before = state_of(job)
    garbage = b"\x0a\xff\xff\xff\xff\x0f\x12"
    path = f"/gradfleet.v1.ParameterService/{method}"
    # execute
    with grpc.insecure_channel(server.address) as channel:
        if method == "PushGradient":
            call = channel.stream_unary(path)
            run = lambda: call(iter([garbage]), timeout=10)  # noqa: E731
        elif method in ("PullWeights", "WatchJob"):
            call = channel.unary_stream(path)
            run = lambda: list(call(garbage, timeout=10))  # noqa: E731
        else:
            call = channel.unary_unary(path)
            run = lambda: call(garbage, timeout=10)  # noqa: E731
        with pytest.raises(grpc.RpcError) as err:
            run()
    # assert
    assert err.value.code() != grpc.StatusCode.OK
    assert state_of(job)[:2] == before[:2]
    client.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
    assert client.pull_weights(job, 1)[0] == 1


def test_job_over_the_size_limit_is_resource_exhausted(kit) -> None:
    # prepare
    with (
        serve(port=0, max_job_bytes=1024) as small,
        ParameterServerClient(small.address) as c,
    ):
        # execute
        with pytest.raises(GradfleetError) as err:
            c.create_job({**kit.SPEC64, "sizes": [64, 64]}, kit.SGD, total_steps=2)
        # assert
        assert err.value.code.name == "RESOURCE_EXHAUSTED"
        assert "limit" in err.value.message
        assert c.list_jobs() == []


def test_message_over_the_size_limit_is_resource_exhausted(kit) -> None:
    # prepare: the server accepts 64 KiB messages; this client sends 128 KiB chunks
    spec = {**kit.SPEC64, "sizes": [128, 256]}
    with serve(port=0, max_message_bytes=64 << 10, chunk_bytes=12 << 10) as small:
        with ParameterServerClient(small.address) as c:
            job = c.create_job(spec, kit.SGD, total_steps=2)
            _, weights = c.pull_weights(job)
            before = weights.tobytes()
        with ParameterServerClient(
            small.address, chunk_bytes=128 << 10, max_message_bytes=1 << 20
        ) as big:
            # execute
            with pytest.raises(GradfleetError) as err:
                big.push_gradient(job, 0, 0, 1, 1.0, np.ones_like(weights))
            # assert
            assert err.value.code.name == "RESOURCE_EXHAUSTED"
            version, after = big.pull_weights(job)
        assert version == 0 and after.tobytes() == before
        with ParameterServerClient(small.address, chunk_bytes=16 << 10) as ok:
            assert ok.push_gradient(job, 0, 0, 1, 1.0, np.ones_like(weights)).version == 1


def test_too_many_concurrent_streams_is_resource_exhausted(kit, active_streams) -> None:
    # prepare: one stream allowed, held by a pull waiting for version 1
    with (
        serve(port=0, max_concurrent_streams=1) as small,
        ParameterServerClient(small.address) as c,
    ):
        job = c.create_job(kit.SPEC64, kit.SGD, total_steps=2)
        ended: list[str] = []

        def wait_for_version_1() -> None:
            try:
                c.pull_weights(job, 1, timeout=30)
                ended.append("OK")
            except GradfleetError as exc:
                ended.append(exc.code.name)

        waiter = threading.Thread(target=wait_for_version_1)
        waiter.start()
        held = time.monotonic() + 30
        while active_streams(small) == 0 and time.monotonic() < held:
            threading.Event().wait(0.01)
        # execute
        with pytest.raises(GradfleetError) as err:
            c.pull_weights(job, 0)
        # assert
        assert err.value.code.name == "RESOURCE_EXHAUSTED"
        assert c.get_job(job).version == 0
        c.stop_job(job)  # a unary call: it ends the waiting pull and frees its stream
        waiter.join(timeout=30)
        assert not waiter.is_alive() and ended == ["FAILED_PRECONDITION"]
