"""`gradfleet server`: run a parameter server in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from gradfleet.proto.runtime import long_lived_objects_frozen
from gradfleet.proto.wire import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, KEEPALIVE_MS
from gradfleet.server.app import ParameterServer, PortInUse, ServerConfig

log = logging.getLogger("gradfleet.server")

TOKEN_ENV = "GRADFLEET_TOKEN"


def build_parser(prog: str = "gradfleet server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run a gradfleet parameter server.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    p.add_argument("--checkpoint-dir", type=Path, help="write and resume checkpoints here")
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="default checkpoint interval in steps"
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates from this CA")
    p.add_argument("--token-file", type=Path, help=f"bearer token file (or set {TOKEN_ENV})")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--max-job-bytes",
        type=int,
        default=4 << 30,
        help="refuse a job whose weights take more bytes (default 4 GiB)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message received or sent (default 64 MiB)",
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=64,
        help="pulls and pushes served at once; more are refused (RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help="size of the pieces weights and gradients are streamed in (default 1 MiB)",
    )
    p.add_argument(
        "--receive-budget-bytes",
        type=int,
        default=512 << 20,
        help="bytes of gradients one job may hold at once: every push is received whole "
        "before it is added, and early sync gradients wait for their turn in worker order",
    )
    p.add_argument(
        "--keepalive-ms",
        type=int,
        default=KEEPALIVE_MS,
        help="the shortest ping interval of the clients this server allows (half of it); "
        "clients ping a silent server at this interval during a call",
    )
    p.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on stop")
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="debug logging, gRPC's own log lines included",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=0,
        help="-q warnings and errors only, -qq errors only",
    )
    return p


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
        if not token:
            raise ValueError(f"token file {args.token_file} is empty.")
        return token
    return os.environ.get(TOKEN_ENV) or None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `gradfleet server`; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO + 10 * min(args.quiet, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token=_token(args),
            metrics_port=args.metrics_port,
            max_job_bytes=args.max_job_bytes,
            max_message_bytes=args.max_message_bytes,
            max_concurrent_streams=args.max_concurrent_streams,
            chunk_bytes=args.chunk_bytes,
            receive_budget_bytes=args.receive_budget_bytes,
            grace=args.grace,
            keepalive_ms=args.keepalive_ms,
        )
        server = ParameterServer(config).start()
    except PortInUse as exc:
        print(f"gradfleet server: {exc}; pick another --port.", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"gradfleet server: {exc}", file=sys.stderr)
        return 2
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with long_lived_objects_frozen():  # no full-GC pauses while serving
        while not stop_requested.wait(0.5):
            pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
