"""Security rows: token auth on every RPC, tokens kept out of logs, TLS and mutual TLS
through the CLI, loopback by default."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.server import ServerConfig, serve
from gradfleet.server.cli import build_parser

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-8d1f0b6a"
WRONG = "wrong-token-5e7c21aa"
SPEC = {"type": "MLP", "sizes": [64, 64, 10], "dtype": "float32", "seed": 0}
METHODS = pb.DESCRIPTOR.services_by_name["ParameterService"].methods


def raw_call(channel: grpc.Channel, method: Any, metadata: tuple) -> grpc.StatusCode:
    """Call `method` with empty raw bytes, of its own streaming kind; return the status."""
    path = f"/gradfleet.v1.ParameterService/{method.name}"
    kind = (method.client_streaming, method.server_streaming)
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[kind]
    call = make(path, request_serializer=None, response_deserializer=None)
    request: Any = iter([b""]) if method.client_streaming else b""
    try:
        result = call(request, timeout=10, metadata=metadata)
        if method.server_streaming:
            list(result)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("presented", [None, WRONG, TOKEN + "x", "Bearer"], ids=str)
def test_every_method_but_health_requires_the_token(presented: str | None) -> None:
    metadata = (("authorization", f"Bearer {presented}"),) if presented else ()
    with serve(port=0, token=TOKEN) as server:
        with ParameterServerClient(server.address, token=TOKEN) as good:
            job_id = good.create_job(SPEC, {"name": "sgd", "lr": 0.1}, total_steps=2)
            before = good.get_job(job_id, history=False)
        with grpc.insecure_channel(server.address) as channel:
            codes = {m.name: raw_call(channel, m, metadata) for m in METHODS}
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        with ParameterServerClient(server.address, token=TOKEN) as good:
            after = good.get_job(job_id, history=False)

    assert set(codes) >= {"CreateJob", "PullWeights", "PushGradient", "WatchJob"}
    assert codes == {name: grpc.StatusCode.UNAUTHENTICATED for name in codes}
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert after.version == before.version and after.counters == before.counters


def test_the_right_token_works_for_unary_and_streaming_calls() -> None:
    # 4 KiB chunks: the 17 KB model's pulls and pushes go as streams
    with (
        serve(port=0, token=TOKEN) as server,
        ParameterServerClient(server.address, token=TOKEN, chunk_bytes=4096) as ps,
    ):
        job_id = ps.create_job(SPEC, {"name": "sgd", "lr": 0.1}, total_steps=1)
        _, weights = ps.pull_weights(job_id, 0)
        ack = ps.push_gradient(job_id, 0, 0, 1, 0.5, weights * 0)
        events = list(ps.watch(job_id))
        version, _ = ps.pull_weights(job_id, 1)

    assert weights.nbytes > 4 * 4096
    assert ack.outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert version == 1 and events[-1].state == pb.JOB_STATE_COMPLETED


def test_tokens_never_appear_in_the_server_log(chaos: Any) -> None:
    server = chaos.server_process("-v", env={"GRADFLEET_TOKEN": TOKEN}).start()
    with ParameterServerClient(server.address, token=TOKEN) as good:
        job_id = good.create_job(SPEC, {"name": "sgd", "lr": 0.1}, total_steps=2)
        good.pull_weights(job_id, 0)
    for token in (WRONG, None):
        with ParameterServerClient(server.address, token=token, patience=0) as bad:
            with pytest.raises(GradfleetError) as err:
                bad.get_job(job_id)
            assert err.value.code.name == "UNAUTHENTICATED"
            assert WRONG not in str(err.value) and TOKEN not in str(err.value)
    server.signal(signal.SIGTERM)
    exit_code = server.wait()
    log = server.log()

    assert exit_code == 0
    assert "rejected" in log  # the debug log did record the rejections
    assert TOKEN not in log and WRONG not in log


def test_tls_through_the_cli_and_a_plaintext_client_fails_cleanly(
    chaos: Any, tls_dir: Path
) -> None:
    server = chaos.server_process(
        "--tls-cert", str(tls_dir / "server.pem"), "--tls-key", str(tls_dir / "server.key")
    )
    server.start(wait=False)
    with ParameterServerClient(server.address, tls_root_cert=tls_dir / "ca.pem") as good:
        good.wait_ready(timeout=60)
        job_id = good.create_job(SPEC, {"name": "sgd", "lr": 0.1}, total_steps=2)
        version, _ = good.pull_weights(job_id, 0)
    failures = []
    for kwargs in ({}, {"tls_root_cert": tls_dir / "other-ca.pem"}):
        with ParameterServerClient(server.address, timeout=5, patience=0, **kwargs) as bad:
            with pytest.raises(GradfleetError) as err:
                bad.list_jobs()
            failures.append(err.value.code.name)

    assert version == 0
    assert failures == ["UNAVAILABLE", "UNAVAILABLE"]
    assert server.proc is not None and server.proc.poll() is None  # still serving


def test_mutual_tls_through_the_cli_requires_a_client_certificate_from_the_ca(
    chaos: Any, tls_dir: Path
) -> None:
    server = chaos.server_process(
        "--tls-cert",
        str(tls_dir / "server.pem"),
        "--tls-key",
        str(tls_dir / "server.key"),
        "--tls-client-ca",
        str(tls_dir / "ca.pem"),
    )
    server.start(wait=False)
    ca = tls_dir / "ca.pem"
    with ParameterServerClient(
        server.address,
        tls_root_cert=ca,
        tls_client_cert=tls_dir / "client.pem",
        tls_client_key=tls_dir / "client.key",
    ) as good:
        good.wait_ready(timeout=60)
        jobs = good.list_jobs()
    with (
        ParameterServerClient(server.address, tls_root_cert=ca, timeout=5, patience=0) as bad,
        pytest.raises(GradfleetError) as err,
    ):
        bad.list_jobs()
    # a certificate signed by another CA is refused too
    with (
        ParameterServerClient(
            server.address,
            tls_root_cert=ca,
            tls_client_cert=tls_dir / "other-ca.pem",
            tls_client_key=tls_dir / "other-ca.key",
            timeout=5,
            patience=0,
        ) as foreign,
        pytest.raises(GradfleetError) as foreign_err,
    ):
        foreign.list_jobs()

    assert jobs == []
    assert err.value.code.name == foreign_err.value.code.name == "UNAVAILABLE"


def test_default_bind_is_loopback_and_other_binds_warn_without_a_token(chaos: Any) -> None:
    open_bind = chaos.server_process("--host", "0.0.0.0").start(wait=False)
    with_token = chaos.server_process("--host", "0.0.0.0", env={"GRADFLEET_TOKEN": TOKEN})
    with_token.start(wait=False)
    for server in (open_bind, with_token):
        server.wait_healthy()
        server.stop()

    assert build_parser().parse_args([]).host == "127.0.0.1"
    assert ServerConfig().host == "127.0.0.1" and ServerConfig().is_loopback
    assert "without a token" in open_bind.log()
    assert "without a token" not in with_token.log()
