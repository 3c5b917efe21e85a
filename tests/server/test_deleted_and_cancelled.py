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

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import serve

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


@pytest.mark.parametrize("call", ["checkpoint", "stop"])
def test_a_job_deleted_while_checkpoints_or_stops_are_under_way_stays_deleted(
    tmp_path: Path, call: str
) -> None:
    # prepare: jobs whose checkpoint (or stop) calls race their deletion
    outcomes: list[str] = []
    with serve(host="127.0.0.1", port=0, checkpoint_dir=tmp_path) as server:
        for round_ in range(8):
            with ParameterServerClient(server.address, timeout=10) as ps:
                job = ps.create_job(
                    SPEC64, SGD, num_workers=2, total_steps=5, job_id=f"victim{round_}"
                )

            def ask(job: str = job) -> None:
                with ParameterServerClient(server.address, timeout=10) as own:
                    for _ in range(1000):  # until the job is gone
                        try:
                            own.checkpoint(job) if call == "checkpoint" else own.stop_job(job)
                            outcomes.append("OK")
                        except GradfleetError as exc:
                            outcomes.append(exc.code.name)
                            return

            askers = [threading.Thread(target=ask) for _ in range(3)]
            for t in askers:
                t.start()
            with ParameterServerClient(server.address, timeout=10) as ps:
                ps.delete_job(job)
            for t in askers:
                t.join(30)
    # assert: each call either finished before the deletion or found no job; nothing is
    # left on disk, and a restart brings no job back
    assert set(outcomes) <= {"OK", "NOT_FOUND"} and outcomes.count("NOT_FOUND") == 8 * 3
    assert list(tmp_path.iterdir()) == []
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
        applied = server.metrics.registry.get_sample_value(
            "gradfleet_steps_applied_total", {"job": job}
        )
    # assert: the push was refused; the deleted job applied no step; nothing was written
    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND]
    assert applied == 0.0
    assert not (tmp_path / job).exists()


def test_pulls_whose_clients_left_give_their_stream_slots_back(active_streams) -> None:
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
            _wait_until(lambda: active_streams(server) == 2)
            # execute: both clients leave
            waiting_pull.cancel()
            waiting_exchange.cancel()
            # assert: the slots come back, and a live client's pull gets through
            _wait_until(lambda: active_streams(server) == 0)
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
