"""Token auth, TLS, health checking, reflection, metrics and the CLI's argument checks."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.server import ParameterServer, main, serve

TOKEN = "correct-horse-battery-staple"


def test_token_auth_accepts_the_right_token_and_rejects_others(kit) -> None:
    # prepare
    with serve(port=0, token=TOKEN) as server:
        with ParameterServerClient(server.address, token=TOKEN) as good:
            job = good.create_job(kit.SPEC64, kit.SGD, total_steps=2)
            _, before = good.pull_weights(job)
        layout_grad = before * 0 + 1
        for token in (None, "wrong", TOKEN + "x"):
            with ParameterServerClient(server.address, token=token) as bad:
                # execute
                for call in (
                    lambda c=bad: c.list_jobs(),
                    lambda c=bad: c.pull_weights(job),
                    lambda c=bad: c.push_gradient(job, 0, 0, 1, 1.0, layout_grad),
                ):
                    with pytest.raises(GradfleetError) as err:
                        call()
                    # assert
                    assert err.value.code.name == "UNAUTHENTICATED"
                    assert "token" in err.value.message
        with ParameterServerClient(server.address, token=TOKEN) as good:
            version, after = good.pull_weights(job)
        assert version == 0 and after.tobytes() == before.tobytes()


def test_health_answers_without_a_token_and_reflection_lists_the_service() -> None:
    # prepare
    with serve(port=0, token=TOKEN) as server, grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        # execute
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        service = health.Check(
            health_pb2.HealthCheckRequest(service="gradfleet.v1.ParameterService"), timeout=10
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(
            reflect.ServerReflectionInfo(
                iter([request]), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
        )
        file_request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="gradfleet.v1.ParameterService"
        )
        files = list(
            reflect.ServerReflectionInfo(
                iter([file_request]),
                timeout=10,
                metadata=(("authorization", f"Bearer {TOKEN}"),),
            )
        )
    # assert
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert service.status == health_pb2.HealthCheckResponse.SERVING
    names = [s.name for s in replies[0].list_services_response.service]
    assert "gradfleet.v1.ParameterService" in names
    assert "grpc.health.v1.Health" in names
    assert files[0].file_descriptor_response.file_descriptor_proto


def test_health_goes_not_serving_on_stop() -> None:
    # prepare
    server = serve(port=0).__enter__()
    health = server.health
    # execute
    server.stop(grace=0.5)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), None)
    # assert
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_tls_accepts_the_right_ca_and_rejects_others(tls_files, kit) -> None:
    # prepare
    with serve(port=0, tls_cert=tls_files.server_cert, tls_key=tls_files.server_key) as server:
        # execute
        with ParameterServerClient(server.address, tls_root_cert=tls_files.ca_cert) as good:
            job = good.create_job(kit.SPEC64, kit.SGD, total_steps=2)
            version, _ = good.pull_weights(job)
        outcomes = []
        for kwargs in ({"tls_root_cert": tls_files.other_ca_cert}, {}):
            with ParameterServerClient(server.address, timeout=3, patience=0, **kwargs) as bad:
                with pytest.raises(GradfleetError) as err:
                    bad.list_jobs()
                outcomes.append(err.value.code.name)
    # assert
    assert version == 0
    assert outcomes == ["UNAVAILABLE", "UNAVAILABLE"]


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tls_files, kit) -> None:
    # prepare
    with serve(
        port=0,
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        tls_client_ca=tls_files.ca_cert,
    ) as server:
        # execute
        with ParameterServerClient(
            server.address,
            tls_root_cert=tls_files.ca_cert,
            tls_client_cert=tls_files.client_cert,
            tls_client_key=tls_files.client_key,
        ) as good:
            jobs = good.list_jobs()
        with (
            ParameterServerClient(
                server.address, tls_root_cert=tls_files.ca_cert, timeout=3, patience=0
            ) as anonymous,
            pytest.raises(GradfleetError) as err,
        ):
            anonymous.list_jobs()
    # assert
    assert jobs == []
    assert err.value.code.name == "UNAVAILABLE"


def test_metrics_are_exposed_in_prometheus_format(kit) -> None:
    # prepare
    with serve(port=0, metrics_port=0) as server, ParameterServerClient(server.address) as c:
        job = c.create_job(kit.SPEC64, kit.SGD, total_steps=2)
        layout = c.layout(job)
        c.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
        with pytest.raises(GradfleetError):
            c.push_gradient(job, 3, 1, 1, 1.0, kit.gradient(layout, 0, 0))
        c.pull_weights(job, 1)
        # execute
        text = scrape_until(
            f"http://127.0.0.1:{server.metrics_port}/metrics", "gradfleet_active_streams 0.0"
        )
    # assert
    assert f'gradfleet_steps_applied_total{{job="{job}"}} 1.0' in text
    assert 'gradfleet_pushes_rejected_total{reason="bad_worker"} 1.0' in text
    assert "gradfleet_gradient_bytes_in_total" in text
    assert "gradfleet_weight_bytes_out_total" in text
    assert "gradfleet_step_latency_seconds_bucket" in text
    assert 'gradfleet_pushes_total{outcome="PUSH_OUTCOME_ACCEPTED"} 1.0' in text
    assert "gradfleet_active_streams 0.0" in text


def scrape_until(url: str, line: str, limit: float = 30.0) -> str:
    """The metrics page once it shows ``line``, or the last one read within ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        if line in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_metrics_count_streams_in_flight(kit) -> None:
    # prepare: a pull that waits for a version only the test's push will make
    with serve(port=0, metrics_port=0) as server, ParameterServerClient(server.address) as c:
        job = c.create_job(kit.SPEC64, kit.SGD, total_steps=2)
        layout = c.layout(job)
        versions = []

        def pull() -> None:
            versions.append(c.pull_weights(job, min_version=1, timeout=60)[0])

        waiting = threading.Thread(target=pull)
        waiting.start()
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        # execute
        during = scrape_until(url, "gradfleet_active_streams 1.0")
        c.push_gradient(job, 0, 0, 1, 0.5, np.zeros(layout.total_elements, layout.dtype))
        waiting.join(60)
        after = scrape_until(url, "gradfleet_active_streams 0.0")
    # assert
    assert "gradfleet_active_streams 1.0" in during
    assert versions == [1]
    assert "gradfleet_active_streams 0.0" in after


@pytest.mark.parametrize(
    "argv",
    [
        ["--tls-cert", "cert.pem"],
        ["--port", "70000"],
        ["--chunk-bytes", "10"],
        ["--metrics-port", "70000"],
        ["--max-message-bytes", str(2**32)],
        ["--max-message-bytes", str(2 << 20)],  # too small for 4 default chunks
    ],
)
def test_cli_rejects_bad_settings_with_exit_code_2(argv: list[str], capsys) -> None:
    # execute
    code = main(["-q", *argv])
    # assert
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradfleet server: ") and err.strip().endswith(".")
    assert len(err.strip().splitlines()) == 1


def test_cli_names_the_address_or_files_when_it_cannot_listen(tmp_path: Path, capsys) -> None:
    # prepare: a port already taken, and a "certificate" that is not PEM
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a certificate")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        # execute
        codes = [
            main(["-q", "--port", port]),
            main(["-q", "--tls-cert", str(bad_pem), "--tls-key", str(bad_pem)]),
        ]
    # assert: one line each, exit code 2, no traceback
    lines = capsys.readouterr().err.strip().splitlines()
    assert codes == [2, 2] and len(lines) == 2
    assert f"127.0.0.1:{port}" in lines[0] and "PEM" in lines[1]
    assert all(line.startswith("gradfleet server: could not listen on ") for line in lines)


def test_a_port_held_by_another_gradfleet_server_is_refused() -> None:
    # grpcio's default SO_REUSEPORT would let both bind and split the clients between them
    with serve(port=0) as first:
        port = int(first.address.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}"):
            ParameterServer(port=port).start()
        with ParameterServerClient(first.address) as client:
            assert client.list_jobs() == []


def test_a_metrics_port_already_taken_leaves_no_grpc_server_running() -> None:
    # prepare: a free port for gRPC, a taken one for metrics
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        server = ParameterServer(port=port, metrics_port=taken.getsockname()[1])
        # execute
        with pytest.raises(OSError, match="could not serve metrics"):
            server.start()
    # assert: nothing listens on the gRPC port, and a server can start there
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with serve(port=port) as again, ParameterServerClient(again.address) as client:
        assert client.list_jobs() == []


def test_binding_beyond_loopback_without_a_token_warns(caplog: pytest.LogCaptureFixture) -> None:
    # execute
    with caplog.at_level("WARNING", logger="gradfleet.server"), serve(host="0.0.0.0", port=0):
        pass
    # assert
    assert any("without a token" in r.getMessage() for r in caplog.records)
