"""The server process killed, stopped and restarted under training (rows 4-6).

The server is a real `gradfleet server` subprocess with a checkpoint directory; the
workers are `GradientWorker`s (the Ray actor's class) in threads of the test, so they
outlive the server. Their batches depend only on (seed, version, worker), so however
often the server goes back to a checkpoint, a sync job ends with the weights of an
undisturbed run, bit for bit.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradfleet import nn
from gradfleet.client import Client, JobConfig, train
from gradfleet.client.data import load_dataset
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import encode_chunk_message
from gradfleet.server import checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESUMED = re.compile(r"resumed job (\S+) at version (\d+)")


def digits_job(steps: int, hidden: int = 32, every: int = 3) -> JobConfig:
    return JobConfig(
        model=nn.MLP([64, hidden, hidden, 10], seed=3, dtype="float64"),
        dataset=load_dataset("digits"),
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        batch_size=24,
        steps=steps,
        workers=2,
        seed=11,
        checkpoint_every=every,
    )


def wait_for_version(ps: ParameterServerClient, job_id: str, version: int) -> int:
    while True:
        info = ps.get_job(job_id, history=False)
        if info.version >= version or info.state != pb.JOB_STATE_RUNNING:
            return int(info.version)
        time.sleep(0.01)


def wait_for_temp_file(
    job_dir: Path, ps: ParameterServerClient, job_id: str, before_version: int
) -> bool:
    """Spin until a checkpoint write is in progress (its temporary file exists), or
    give up once the job reaches ``before_version``, so a round never eats the job."""
    while True:
        for _ in range(200):
            if any(name.endswith(".tmp") for name in os.listdir(job_dir)):
                return True
        if ps.get_job(job_id, history=False).version >= before_version:
            return False


def refused_checkpoints(job_dir: Path) -> list[str]:
    """Committed (renamed into place) checkpoints that do not load: must stay empty."""
    refused = []
    for meta in sorted(job_dir.glob("ckpt-*.json")):
        try:
            checkpoint._load_one(meta)
        except checkpoint.CheckpointError as exc:
            refused.append(str(exc))
    return refused


def test_server_sigkilled_in_a_loop_resumes_from_complete_checkpoints(
    tmp_path: Path, chaos: Any
) -> None:
    rounds, every = chaos.ROUNDS, 3
    # a 300k-parameter model: each checkpoint write (2.4 MB, fsynced) takes a moment,
    # long enough to be caught in the act; enough steps to outlive the kills (a round
    # waits for ~15, and workers that reconnect before this test's client run on)
    job = digits_job(steps=60 * rounds + 40, hidden=512, every=every)
    ckpt = tmp_path / "ckpt"
    server = chaos.server_process("--checkpoint-dir", str(ckpt)).start()
    rng = random.Random(1)
    mid_write, torn_left, losses = 0, 0, []
    with ParameterServerClient(server.address, patience=60) as ps:
        job_id = chaos.create_training_job(ps, job, "loop")
        workers = chaos.ThreadWorkers(job, server.address, job_id, pull_wait=2.0).start()
        resumed_at = 0
        for kill in range(rounds):
            seen = wait_for_version(ps, job_id, resumed_at + 2)
            assert seen < job.total_steps, f"the job finished after only {kill} kills"
            if kill % 2 == 0 and wait_for_temp_file(ckpt / job_id, ps, job_id, resumed_at + 15):
                mid_write += 1  # killed while a checkpoint file is being written
            else:
                time.sleep(rng.uniform(0.0, 0.3))
            server.kill()
            torn_left += any(p.name.endswith(".tmp") for p in (ckpt / job_id).iterdir())
            assert refused_checkpoints(ckpt / job_id) == []
            latest = checkpoint.load_latest(ckpt / job_id)
            assert latest is not None
            server.start()
            resumed = [int(v) for j, v in RESUMED.findall(server.log()) if j == job_id]
            assert len(resumed) == kill + 1
            resumed_at = resumed[-1]
            assert resumed_at == latest.version  # the newest complete checkpoint
            # lost: the interval being filled and the checkpoints still being written
            # (a job keeps at most two in flight, a third waits for the disk)
            assert resumed_at >= seen - 3 * every
            losses.append(seen - resumed_at)
        workers.join()
        info = ps.get_job(job_id)
        version, weights = ps.pull_weights(job_id, 0)
    undisturbed = train(job, backend="local")

    print(
        f"{rounds} SIGKILLs, {mid_write} during a checkpoint write ({torn_left} left a "
        f"temporary file behind); steps seen minus resumed: {losses}; counters {info.counters}"
    )
    assert mid_write >= 1
    assert version == job.total_steps == len(info.history)
    np.testing.assert_array_equal(weights, undisturbed.model.flat)
    assert chaos.reconciles(info.counters)
    assert info.counters.accepted == job.workers * job.total_steps
    assert not list((ckpt / job_id).glob(".*.tmp"))  # leftovers are cleaned up


def test_server_down_for_seconds_workers_retry_and_resume(tmp_path: Path, chaos: Any) -> None:
    job = digits_job(steps=200, every=5)
    server = chaos.server_process("--checkpoint-dir", str(tmp_path / "ckpt")).start()
    with ParameterServerClient(server.address, patience=60) as ps:
        job_id = chaos.create_training_job(ps, job, "outage")
        workers = chaos.ThreadWorkers(job, server.address, job_id, pull_wait=2.0).start()
        wait_for_version(ps, job_id, 20)
        server.kill()
        time.sleep(3.0)  # down for a few seconds while the workers keep trying
        server.start()
        workers.join()
        info = ps.get_job(job_id)
        version, weights = ps.pull_weights(job_id, 0)
    undisturbed = train(job, backend="local")

    print(f"counters after the outage: {info.counters}")
    assert version == job.total_steps == len(info.history)
    np.testing.assert_array_equal(weights, undisturbed.model.flat)  # nothing applied twice
    assert all(record.contributors == job.workers for record in info.history)
    assert info.counters.accepted == job.workers * job.total_steps
    assert chaos.reconciles(info.counters)


def test_workers_survive_graceful_restarts(tmp_path: Path, chaos: Any) -> None:
    cycles = 5
    job = digits_job(steps=100_000, every=1000)  # only the shutdown checkpoints
    server = chaos.server_process("--checkpoint-dir", str(tmp_path / "ckpt")).start()
    with ParameterServerClient(server.address, patience=60) as ps:
        job_id = chaos.create_training_job(ps, job, "graceful")
        workers = chaos.ThreadWorkers(job, server.address, job_id, pull_wait=2.0).start()
        try:
            for _ in range(cycles):
                version = wait_for_version(ps, job_id, 0)
                wait_for_version(ps, job_id, version + 10)
                server.signal(signal.SIGTERM)
                assert server.wait() == 0
                time.sleep(1.0)
                server.start()
                if workers.errors:
                    break
            errors = list(workers.errors)
        finally:
            workers.abandon()

    assert errors == []


def test_sdk_call_during_a_short_outage_retries_until_the_server_is_back(
    tmp_path: Path, chaos: Any
) -> None:
    server = chaos.server_process("--checkpoint-dir", str(tmp_path / "ckpt")).start()
    spec = {"type": "MLP", "sizes": [4, 3], "dtype": "float32", "seed": 0}
    with ParameterServerClient(server.address) as ps:
        job_id = ps.create_job(spec, {"name": "sgd", "lr": 0.1}, total_steps=5, job_id="sdk")
    with Client(server.address, timeout=30) as client:
        handle = client.job(job_id)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        statuses: list[Any] = []
        errors: list[BaseException] = []

        def status() -> None:
            try:
                statuses.append(handle.status())
            except Exception as exc:
                errors.append(exc)

        sdk_call = threading.Thread(target=status)
        sdk_call.start()  # issued while the server is down
        time.sleep(5.0)
        server.start()
        sdk_call.join(timeout=60)

    assert errors == []
    assert statuses[0].job_id == job_id and statuses[0].version == 0


def test_a_server_gone_silent_ends_a_waiting_pull_unavailable_not_at_its_deadline(
    chaos: Any,
) -> None:
    # A stopped process answers like a vanished host: the kernel keeps the connection,
    # nothing replies. Keepalive must turn that into UNAVAILABLE, which callers act on
    # (look the server up again); a deadline would just be tried again on the same
    # dead connection.
    keepalive_ms = 1000  # the default's behaviour, ten times sooner
    server = chaos.server_process("--keepalive-ms", str(keepalive_ms)).start()
    spec = {"type": "MLP", "sizes": [4, 3], "dtype": "float32", "seed": 0}
    with ParameterServerClient(server.address, patience=0, keepalive_ms=keepalive_ms) as ps:
        job_id = ps.create_job(spec, {"name": "sgd", "lr": 0.1}, total_steps=5)
        ps.pull_weights(job_id)  # the connection is up
        server.signal(signal.SIGSTOP)
        try:
            with pytest.raises(GradfleetError) as waited:
                ps.pull_weights(job_id, min_version=1, timeout=90)
        finally:
            server.signal(signal.SIGCONT)

    assert waited.value.code.name == "UNAVAILABLE"


def test_sigterm_drains_in_flight_calls_checkpoints_and_exits_zero(
    tmp_path: Path, chaos: Any
) -> None:
    spec = {"type": "MLP", "sizes": [64, 64, 10], "dtype": "float32", "seed": 0}
    ckpt = tmp_path / "ckpt"
    server = chaos.server_process("--checkpoint-dir", str(ckpt), "--grace", "20").start()
    with ParameterServerClient(server.address) as ps:
        job_id = ps.create_job(spec, {"name": "sgd", "lr": 0.1}, num_workers=1, total_steps=5)
        layout = ps.layout(job_id)
    grad = np.full(layout.total_elements, 0.01, dtype=np.float32).tobytes()
    header = pb.PushHeader(
        job_id=job_id,
        worker=0,
        step=0,
        rows=1,
        loss=1.0,
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=len(grad),
    ).SerializeToString()
    first_sent = threading.Event()
    chunk = 4096

    def slow_push() -> Any:  # 4 KiB chunks, 50 ms apart: in flight across the SIGTERM
        for start in range(0, len(grad), chunk):
            yield encode_chunk_message(
                start, grad[start : start + chunk], header if not start else b""
            )
            first_sent.set()
            time.sleep(0.05)

    with grpc.insecure_channel(server.address) as channel:
        statuses: list[int] = []
        watching = threading.Event()

        def watch_health() -> None:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for reply in stub.Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    statuses.append(reply.status)
                    watching.set()
            except grpc.RpcError:
                pass  # the stream ends when the server goes away

        watcher = threading.Thread(target=watch_health)
        watcher.start()
        assert watching.wait(30), "the health watch never answered"
        push = channel.stream_unary(
            "/gradfleet.v1.ParameterService/PushGradient",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        pending = push.future(slow_push(), timeout=60)
        first_sent.wait(10)
        time.sleep(0.2)
        server.signal(signal.SIGTERM)
        ack = pending.result()
        exit_code = server.wait()
        watcher.join(10)
    final = checkpoint.load_latest(ckpt / job_id)

    assert ack.outcome == pb.PUSH_OUTCOME_ACCEPTED and ack.version == 1
    assert exit_code == 0
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert final is not None and final.version == 1
    assert "received SIGTERM" in server.log()
