"""Fixtures for the chaos suite: `gradfleet server` subprocesses, thread workers, knobs.

Loop counts: ``GRADFLEET_CHAOS_ROUNDS`` (default 6) sets how many times the heaviest
loops break something (server SIGKILLs, repeated worker kills scale with it too).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.worker.actor import GradientWorker, WorkerSpec
from gradfleet.worker.batches import shard_rows
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset

CHAOS_ROUNDS = int(os.environ.get("GRADFLEET_CHAOS_ROUNDS", "6"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gradfleet_command() -> list[str]:
    """The installed `gradfleet` console script (falls back to the module)."""
    script = Path(sys.executable).parent / "gradfleet"
    if script.exists():
        return [str(script), "server"]
    found = shutil.which("gradfleet")
    return [found, "server"] if found else [sys.executable, "-m", "gradfleet.server.cli"]


class ServerProcess:
    """A `gradfleet server` subprocess on a fixed port, restartable on the same port/dir.

    Its stdout and stderr go to `log_path` (appended across restarts), so a test can
    grep them.
    """

    def __init__(
        self, log_path: Path, *args: str, port: int | None = None, env: dict | None = None
    ):
        self.port = port or free_port()
        self.args = list(args)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*_gradfleet_command(), "--port", str(self.port), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.starts += 1
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    # this process's own server, not another that took the port meanwhile
                    started = re.findall(rf"parameter server on \S+:{self.port} \(", self.log())
                    listening = len(started) == self.starts
                    if reply.status == health_pb2.HealthCheckResponse.SERVING and listening:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"server on {self.address} did not become healthy: {self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit code."""
        assert self.proc is not None
        self.proc.kill()
        return self.proc.wait(timeout=30)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop it if it still runs (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Any]:
    """A factory of `ServerProcess`es; every one is stopped when the test ends."""
    started: list[ServerProcess] = []

    def make(*args: str, port: int | None = None, env: dict | None = None) -> ServerProcess:
        process = ServerProcess(tmp_path / f"server-{len(started)}.log", *args, port=port, env=env)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


def reconciles(counters: pb.JobCounters | dict) -> bool:
    """received == accepted + duplicate + dropped_late + sum(rejected)."""
    c = SimpleNamespace(**counters) if isinstance(counters, dict) else counters
    return bool(
        c.received == c.accepted + c.duplicate + c.dropped_late + sum(dict(c.rejected).values())
    )


def create_training_job(client: ParameterServerClient, job: JobConfig, job_id: str) -> str:
    """The job `train(job, backend="ray")` would create."""
    return client.create_job(
        model_spec=job.model_spec,
        optimizer=job.optimizer,
        mode=job.mode,
        num_workers=job.workers,
        backup_workers=job.backup_workers,
        staleness_bound=job.staleness_bound,
        checkpoint_every=job.checkpoint_every,
        total_steps=job.total_steps,
        seed=job.seed,
        job_config=job.summary(),
        job_id=job_id,
    )


class ThreadWorkers:
    """`GradientWorker`s (the Ray actor's class) run in threads of this process.

    The server-fault tests need workers that survive the server, not Ray; threads keep
    them cheap. Errors are collected in `errors`.
    """

    def __init__(self, job: JobConfig, address: str, job_id: str, pull_wait: float = 10.0) -> None:
        """`pull_wait`: after a server restart from an older checkpoint, a worker waiting
        for a version the server no longer reaches on its own re-syncs only when its long
        poll times out; a short wait keeps such tests quick."""
        data = job.data
        assert isinstance(data, ArrayDataset)
        self.address, self.job_id = address, job_id
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        for worker in range(job.workers):
            start, stop = shard_rows(len(data.x), worker, job.workers)
            spec = WorkerSpec.for_job(
                job, address, job_id, worker, server_patience=120.0, pull_wait=pull_wait
            )
            shard = (data.x[start:stop], data.y[start:stop])
            self.threads.append(
                threading.Thread(target=self._run, args=(GradientWorker(spec), shard), daemon=True)
            )

    def _run(self, worker: GradientWorker, shard: tuple[np.ndarray, np.ndarray]) -> None:
        try:
            worker.run(*shard)
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    def start(self) -> ThreadWorkers:
        for thread in self.threads:
            thread.start()
        return self

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float = 240.0) -> None:
        """Wait for every worker to finish; fail at the first worker error."""
        deadline = time.monotonic() + timeout
        while self.alive() and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.errors or self.alive():
            self.abandon()
        assert not self.errors, f"workers failed: {self.errors!r}"
        assert not self.alive(), "the workers did not finish"

    def abandon(self, timeout: float = 30.0) -> None:
        """Stop the job, so the workers leave their loop (with JobStopped)."""
        with (
            contextlib.suppress(GradfleetError),
            ParameterServerClient(self.address, timeout=5, patience=0) as client,
        ):
            client.stop_job(self.job_id)
        for thread in self.threads:
            thread.join(timeout)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture
def chaos(server_process: Any) -> SimpleNamespace:
    """Helpers shared by the chaos modules (conftest is not importable under importlib)."""
    return SimpleNamespace(
        ROUNDS=CHAOS_ROUNDS,
        server_process=server_process,
        reconciles=reconciles,
        create_training_job=create_training_job,
        ThreadWorkers=ThreadWorkers,
        relative_difference=relative_difference,
        free_port=free_port,
    )


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.pem/.key (127.0.0.1, localhost), client.pem/.key, other-ca.pem."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: Any = None, ca: bool = False, san: bool = False):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        signer_name, signer_key = issuer or (name, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(signer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        if ca:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(signer_key, hashes.SHA256())

    def write(name: str, key: Any, certificate: Any) -> None:
        pem = serialization.Encoding.PEM
        (out / f"{name}.pem").write_bytes(certificate.public_bytes(pem))
        (out / f"{name}.key").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("gradfleet chaos CA", ca_key, ca=True)
    write("ca", ca_key, ca)
    other_key = ec.generate_private_key(ec.SECP256R1())
    write("other-ca", other_key, cert("someone else's CA", other_key, ca=True))
    for name, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, cert(name, key, issuer=(ca.subject, ca_key), san=san))
    return out
