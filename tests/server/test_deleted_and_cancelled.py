"""Calls that outlive their job or their client: a deleted job stays deleted (no
checkpoint brings it back, no in-flight push changes it), and a waiting call whose client
left gives its stream slot back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import ParameterServer, serve
from gradfleet.worker.ps_client import ParameterServerClient, ParameterServerError

SPEC64 = {"type": "MLP", "sizes": [6, 8, 3], "activation": "relu", "dtype": "float64", "seed": 0}
SGD = {"name": "sgd", "lr": 0.1}
SERVICE = "/gradfleet.v1.ParameterService/"


def _worker_0_header(job: str, layout: FlatLayout) -> bytes:
    """The serialised header of worker 0's push of step 0's float64 gradient."""
    return pb.PushHeader(
        job_id=job,
        worker=0,
        step=0,
        rows=1,
        loss=0.5,
        dtype=pb.DTYPE_FLOAT64,
        total_bytes=layout.nbytes,
        layout=layout.to_proto(),
    ).SerializeToString()


def _delete_between_lookup_and_work(server: ParameterServer, job_id: str) -> None:
    """Make the next job lookup run DeleteJob right after it found the job: the race of a
    call that looked the job up just before another client deleted it."""
    service = server.service
    lookup = service._job

    def lookup_then_delete(wanted: str):  # type: ignore[no-untyped-def]
        job = lookup(wanted)
        service._job = lookup  # only once
        with ParameterServerClient(server.address, timeout=10) as other:
            other.delete_job(job_id)
        return job

    service._job = lookup_then_delete  # type: ignore[method-assign]


@pytest.mark.parametrize("call", ["checkpoint", "stop"])
def test_a_job_deleted_while_a_checkpoint_or_stop_is_under_way_stays_deleted(
    tmp_path: Path, call: str
) -> None:
    # prepare
    with (
        serve(host="127.0.0.1", port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address, timeout=10) as ps,
    ):
        job = ps.create_job(SPEC64, SGD, num_workers=2, total_steps=5, job_id="victim")
        _delete_between_lookup_and_work(server, job)
        # execute
        with pytest.raises(ParameterServerError) as err:
            ps.checkpoint(job) if call == "checkpoint" else ps.stop_job(job)
    # assert: NOT_FOUND, no directory, and a restart does not bring the job back
    assert err.value.code == "NOT_FOUND"
    assert not (tmp_path / job).exists()
    with (
        serve(host="127.0.0.1", port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address, timeout=10) as ps,
    ):
        assert ps.list_jobs() == []


def test_an_async_push_in_flight_when_its_job_is_deleted_changes_nothing(tmp_path: Path) -> None:
    # prepare: an async job checkpointed at every step; a push stream sends its first chunk
    with (
        serve(host="127.0.0.1", port=0, checkpoint_dir=tmp_path, chunk_bytes=4096) as server,
        ParameterServerClient(server.address, timeout=10) as ps,
    ):
        job = ps.create_job(
            SPEC64, SGD, num_workers=2, total_steps=5, mode="async", checkpoint_every=1
        )
        layout = ps.layout(job)
        held = server.service.jobs[job]
        header = _worker_0_header(job, layout)
        data = np.ones(layout.total_elements).tobytes()
        first_sent, deleted = threading.Event(), threading.Event()

        def messages():  # type: ignore[no-untyped-def]
            yield encode_chunk_message(0, data[:256], header)
            first_sent.set()
            deleted.wait(10)
            yield encode_chunk_message(256, data[256:])

        errors: list[grpc.RpcError] = []

        def push() -> None:
            with grpc.insecure_channel(server.address) as channel:
                call = channel.stream_unary(SERVICE + "PushGradient")
                try:
                    call(messages(), timeout=20)
                except grpc.RpcError as exc:
                    errors.append(exc)

        pusher = threading.Thread(target=push)
        pusher.start()
        first_sent.wait(10)
        time.sleep(0.3)  # let the server read the header and wait for the rest
        # execute
        ps.delete_job(job)
        deleted.set()
        pusher.join(30)
    # assert: the push was refused; the deleted job kept version 0; nothing was written
    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND]
    assert held.version == 0 and held.state == pb.JOB_STATE_DELETED
    assert not (tmp_path / job).exists()


def test_pulls_whose_clients_left_give_their_stream_slots_back() -> None:
    # prepare: a server allowing 2 concurrent streams; a job that needs 2 workers per step
    with (
        serve(host="127.0.0.1", port=0, max_concurrent_streams=2) as server,
        ParameterServerClient(server.address, timeout=10) as ps,
    ):
        job = ps.create_job(SPEC64, SGD, num_workers=2, total_steps=5)
        layout = ps.layout(job)
        header = _worker_0_header(job, layout)
        exchange_message = encode_chunk_message(
            0, np.zeros(layout.total_elements).tobytes(), header
        )
        with grpc.insecure_channel(server.address) as channel:
            pull = channel.unary_stream(
                SERVICE + "PullWeights",
                request_serializer=pb.PullWeightsRequest.SerializeToString,
            )
            exchange = channel.unary_unary(SERVICE + "PushAndPullUnary")
            # a pull with no deadline and an exchange with an hour's, both waiting for
            # a version that needs worker 1
            waiting_pull = pull(pb.PullWeightsRequest(job_id=job, min_version=1))
            waiting_exchange = exchange.future(exchange_message, timeout=3600)
            _wait_until(lambda: server.service.streams.active == 2)
            # execute: both clients leave
            waiting_pull.cancel()
            waiting_exchange.cancel()
            # assert: the slots come back, and a live client's pull gets through
            _wait_until(lambda: server.service.streams.active == 0)
        version, _ = ps.pull_weights(job, 0, timeout=10)
    assert version == 0


def _wait_until(condition, limit: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll for a server-side state change; fails only if it never comes."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.05)


def test_watches_count_as_streams_so_they_cannot_starve_other_calls() -> None:
    # prepare: a server allowing 1 concurrent stream, one watch holding it
    with (
        serve(host="127.0.0.1", port=0, max_concurrent_streams=1) as server,
        ParameterServerClient(server.address, timeout=10) as ps,
        grpc.insecure_channel(server.address) as channel,
    ):
        job = ps.create_job(SPEC64, SGD, num_workers=2, total_steps=5)
        watch = channel.unary_stream(
            SERVICE + "WatchJob",
            request_serializer=pb.WatchJobRequest.SerializeToString,
            response_deserializer=pb.JobEvent.FromString,
        )
        first = watch(pb.WatchJobRequest(job_id=job))
        next(first)
        # execute: many more watchers
        refused = []
        for _ in range(40):
            try:
                next(watch(pb.WatchJobRequest(job_id=job), timeout=10))
            except grpc.RpcError as exc:
                refused.append(exc.code())
        # assert: each is refused at once, and unary calls still answer
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 40
        assert ps.get_job(job).version == 0
        first.cancel()
