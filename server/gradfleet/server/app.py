"""`ParameterServer`: the gRPC server with health, reflection, TLS, auth and metrics."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradfleet.proto.runtime import keep_message_buffers_mapped
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    KEEPALIVE_MS,
    SINGLE_MESSAGE_FACTOR,
    server_options,
)
from gradfleet.server.auth import TokenAuthInterceptor
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.registry import JobRegistry
from gradfleet.server.service import SERVICE_NAME, ParameterService

log = logging.getLogger(__name__)
_GRPC_INT_MAX = 2**31 - 1


@dataclass
class ServerConfig:
    """Settings of one parameter server; validates itself and names the bad setting."""

    host: str = "127.0.0.1"
    port: int = 0
    checkpoint_dir: Path | str | None = None
    checkpoint_every: int = 0  # default K for jobs whose spec says 0; 0 = shutdown only
    tls_cert: Path | str | None = None
    tls_key: Path | str | None = None
    tls_client_ca: Path | str | None = None  # set to require client certificates
    token: str | None = None
    metrics_port: int | None = None
    max_job_bytes: int = 4 << 30
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_streams: int = 64
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    receive_budget_bytes: int = 512 << 20  # gradients a job may hold at once
    history_page: int = 10_000  # step records per GetJob or WatchJob answer
    grace: float = 5.0
    keepalive_ms: int = KEEPALIVE_MS  # the clients' ping interval to allow (half of it)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0..65535, got {self.port}.")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be within 0..65535, got {self.metrics_port}.")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together.")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key as well.")
        for name in (
            "max_job_bytes",
            "max_message_bytes",
            "max_concurrent_streams",
            "receive_budget_bytes",
            "history_page",
            "keepalive_ms",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1.")
        if self.max_message_bytes > _GRPC_INT_MAX:
            raise ValueError(f"max_message_bytes must be at most {_GRPC_INT_MAX} (gRPC's limit).")
        if self.chunk_bytes < 4096 or SINGLE_MESSAGE_FACTOR * self.chunk_bytes > (
            self.max_message_bytes - 4096
        ):
            raise ValueError(
                f"chunk_bytes must be at least 4096 and at most (max_message_bytes - 4096) / "
                f"{SINGLE_MESSAGE_FACTOR}: weights of up to {SINGLE_MESSAGE_FACTOR} chunks "
                "travel as one message."
            )
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be 0 (shutdown only) or more.")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be blank; omit it to disable auth.")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = Path(self.checkpoint_dir)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _read(path: Path | str) -> bytes:
    return Path(path).read_bytes()


class PortInUse(OSError):
    """Another process (another server?) listens on the port a server was to bind."""


def _bind_failure(host: str, port: int, bind: str, grpc_says: str, secure: bool) -> OSError:
    """Why `bind` failed, in words: gRPC says only that it did (its reason goes to its
    own log), so a plain socket tries the same address and the OS names the reason."""
    reason = None
    if port != 0:
        try:
            candidates = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError:
            candidates = []
        for family, kind, proto, _, address in candidates:
            with socket.socket(family, kind, proto) as probe:
                # as gRPC binds: a closed connection's TIME_WAIT does not hold the port
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                except OSError as exc:
                    reason = reason or exc
                    if exc.errno == errno.EADDRINUSE:
                        return PortInUse(
                            f"could not listen on {bind}: the port is in use (another server?)"
                        )
    if reason is not None and reason.strerror:
        return OSError(f"could not listen on {bind}: {reason.strerror.lower()}")
    tls = " with the TLS certificate and key given (are they valid PEM?)" * secure
    return OSError(f"could not listen on {bind}{tls}: {grpc_says}")


class ParameterServer:
    """A running (after `start`) gRPC parameter server.

    `stop(grace)` sets health to NOT_SERVING, wakes waiting pulls, lets in-flight calls
    finish within `grace` seconds, then writes a final checkpoint of every job.
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self.config = config or ServerConfig(**overrides)
        self.metrics = ServerMetrics()
        c = self.config
        self.registry = JobRegistry(
            metrics=self.metrics,
            checkpoint_dir=c.checkpoint_dir,  # type: ignore[arg-type]
            checkpoint_every=c.checkpoint_every,
            max_job_bytes=c.max_job_bytes,
            chunk_bytes=c.chunk_bytes,
            receive_budget_bytes=c.receive_budget_bytes,
            history_page=c.history_page,
        )
        self.service = ParameterService(self.registry, self.metrics, c.max_concurrent_streams)
        self.health = health.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def secure(self) -> bool:
        return self.config.tls_cert is not None

    def start(self) -> ParameterServer:
        c = self.config
        if not c.is_loopback and c.token is None:
            log.warning(
                "binding %s without a token: anyone who can reach this port can read and "
                "change every job; pass --token-file or set GRADFLEET_TOKEN.",
                c.host,
            )
        keep_message_buffers_mapped()  # megabyte messages: reuse buffers, no page faults
        resumed = self.registry.resume()
        interceptors = []
        if c.token is not None:
            interceptors.append(
                TokenAuthInterceptor(c.token, lambda: self.metrics.reject("unauthenticated"))
            )
        # every stream can hold a thread while it waits; leave room for unary calls, and
        # refuse (RESOURCE_EXHAUSTED) rather than queue calls once every thread is taken
        threads = c.max_concurrent_streams + 32
        pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradfleet-ps")
        server = grpc.server(
            pool,
            interceptors=interceptors,
            options=server_options(c.max_message_bytes, c.keepalive_ms),
            maximum_concurrent_rpcs=threads,
        )
        server.add_generic_rpc_handlers((self.service.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["ParameterService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        # metrics first: grpcio listens from add_port on, and a server that never
        # started does not let its port go
        if c.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(c.metrics_port, c.host)
            except OSError as exc:
                self._abandon_start()
                raise OSError(
                    f"could not serve metrics on {c.host}:{c.metrics_port}: {exc}"
                ) from None
        bind = f"{c.host}:{c.port}" if ":" not in c.host else f"[{c.host}]:{c.port}"
        try:
            if self.secure:
                creds = grpc.ssl_server_credentials(
                    [(_read(c.tls_key), _read(c.tls_cert))],  # type: ignore[arg-type]
                    root_certificates=_read(c.tls_client_ca) if c.tls_client_ca else None,
                    require_client_auth=c.tls_client_ca is not None,
                )
                self.port = server.add_secure_port(bind, creds)
            else:
                self.port = server.add_insecure_port(bind)
        except RuntimeError as exc:  # grpcio reports a failed bind this way
            self._abandon_start()
            raise _bind_failure(c.host, c.port, bind, str(exc), self.secure) from None
        if self.port == 0:
            self._abandon_start()
            raise _bind_failure(c.host, c.port, bind, "gRPC bound no address", self.secure)
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gradfleet parameter server on %s (%s%s), %d job(s) resumed",
            self.address,
            "TLS" if self.secure else "plaintext",
            ", token auth" if c.token else "",
            resumed,
        )
        return self

    def _abandon_start(self) -> None:
        """Undo what a start that failed had begun: the resumed jobs' writer, metrics."""
        try:
            self.registry.close()
        finally:
            self.metrics.close()

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown; idempotent."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace if grace is None else grace
        self.health.enter_graceful_shutdown()
        _end_health_watches(self.health)
        self.service.begin_shutdown()
        self._server.stop(grace).wait()
        try:
            self.registry.close()
        finally:
            self.metrics.close()
            log.info("gradfleet parameter server on %s stopped", self.address)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop` has run (True) or the timeout passes."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> ParameterServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _end_health_watches(servicer: health.HealthServicer) -> None:
    """End open Health.Watch streams after their NOT_SERVING update.

    A watch never ends by itself, so without this one watching client (a load balancer,
    a sidecar) would hold `stop` for the whole grace period. grpcio-health-checking ends
    a watch when its callback gets None; the callbacks are private, hence the guard.
    """
    lock = getattr(servicer, "_lock", None)
    callbacks = getattr(servicer, "_send_response_callbacks", None)
    if lock is None or not isinstance(callbacks, dict):
        return
    with lock:
        pending = [callback for group in callbacks.values() for callback in group]
    for callback in pending:
        with contextlib.suppress(Exception):
            callback(None)


@contextmanager
def serve(config: ServerConfig | None = None, **overrides: Any) -> Iterator[ParameterServer]:
    """Start a server (port 0 picks a free port) and stop it on exit.

    with serve(port=0) as server:
        client = ParameterServerClient(server.address)
    """
    server = ParameterServer(config, **overrides).start()
    try:
        yield server
    finally:
        server.stop()
