"""Fixtures: a real parameter server on 127.0.0.1, port 0, and helpers around it."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from gradfleet.nn.optim import make_optimizer
from gradfleet.nn.reduce import GradientSum
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout
from gradfleet.server import ParameterServer, serve

SPEC64 = {"type": "MLP", "sizes": [6, 8, 3], "activation": "relu", "dtype": "float64", "seed": 0}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


@pytest.fixture
def server() -> Iterator[ParameterServer]:
    with serve(host="127.0.0.1", port=0) as running:
        yield running


@pytest.fixture
def client(server: ParameterServer) -> Iterator[ParameterServerClient]:
    with ParameterServerClient(server.address, timeout=30.0) as c:
        yield c


def gradient(layout: FlatLayout, worker: int, step: int) -> np.ndarray:
    """A deterministic gradient for (worker, step), in the layout's dtype."""
    rng = np.random.default_rng(1000 * step + worker)
    return rng.standard_normal(layout.total_elements).astype(layout.dtype)


@dataclass
class Reference:
    """What every backend computes: the shared ordered-sum kernel, then the same optimiser."""

    layout: FlatLayout
    weights: np.ndarray
    optimizer_config: dict

    def __post_init__(self) -> None:
        self.weights = self.weights.copy()
        self.optimizer = make_optimizer(self.optimizer_config)

    def sync_step(self, grads: list[np.ndarray]) -> np.ndarray:
        total = GradientSum(self.layout.total_elements, self.layout.dtype)
        for g in grads[:-1]:
            total.add(g)
        mean = total.mean(last=grads[-1].copy())
        assert mean is not None
        self.optimizer.step(self.layout.views(self.weights), self.layout.views(mean))
        return self.weights

    def async_step(self, grad: np.ndarray) -> np.ndarray:
        self.optimizer.step(self.layout.views(self.weights), self.layout.views(grad.copy()))
        return self.weights


@pytest.fixture
def make_job(client: ParameterServerClient):
    """Create a job; returns (job_id, layout, initial weights, Reference)."""

    def create(
        num_workers: int = 2,
        *,
        spec: dict | None = None,
        optimizer: dict | None = None,
        total_steps: int = 100,
        **kwargs: object,
    ) -> tuple[str, FlatLayout, np.ndarray, Reference]:
        optimizer = optimizer or SGD
        job_id = client.create_job(
            spec or SPEC64, optimizer, num_workers=num_workers, total_steps=total_steps, **kwargs
        )
        version, weights = client.pull_weights(job_id, 0)
        assert version == 0
        layout = client.layout(job_id)
        return job_id, layout, weights, Reference(layout, weights, optimizer)

    return create


def snapshot(client: ParameterServerClient, job_id: str) -> tuple[int, bytes, pb.JobCounters]:
    """Version, weight bytes and counters, for bit-for-bit 'nothing changed' checks."""
    info = client.get_job(job_id, history=False)
    version, weights = client.pull_weights(job_id, 0)
    assert version == info.version
    return info.version, weights.tobytes(), info.counters


@pytest.fixture
def state_of(client: ParameterServerClient):
    return lambda job_id: snapshot(client, job_id)


def raw_push(address: str, messages: list[bytes], metadata: tuple = ()) -> pb.PushAck:
    """Send hand-made PushGradient messages (for malformed-input tests)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_unary(
            "/gradfleet.v1.ParameterService/PushGradient",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        return call(iter(messages), timeout=10.0, metadata=metadata)


@pytest.fixture
def kit() -> SimpleNamespace:
    """Helpers shared by the test modules (conftest is not importable under importlib)."""
    return SimpleNamespace(
        SPEC64=SPEC64, SGD=SGD, gradient=gradient, raw_push=raw_push, Reference=Reference
    )


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path
    client_cert: Path
    client_key: Path


def _self_signed_ca(name: str):  # -> (key, cert)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _self_signed_ca("gradfleet test CA")
    _, other_cert = _self_signed_ca("someone else's CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "worker-0")]))
        .issuer_name(ca_cert.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(
        ca_cert=out / "ca.pem",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        other_ca_cert=out / "other-ca.pem",
        client_cert=out / "client.pem",
        client_key=out / "client.key",
    )
    files.client_cert.write_bytes(client_cert.public_bytes(pem))
    files.client_key.write_bytes(
        client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca_cert.write_bytes(other_cert.public_bytes(pem))
    files.server_cert.write_bytes(cert.public_bytes(pem))
    files.server_key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files
