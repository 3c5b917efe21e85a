"""Fixtures shared by every test package: the real data in tests/data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run gRPC servers in this process and then start Ray, which forks its GCS and
# raylet. With grpcio's fork support on, its fork handlers run in the child, and when
# other threads were inside gRPC the child has been seen to hang before exec: Ray then
# times out waiting for the GCS ("Timed out waiting for file .../gcs_server_port_...",
# no GCS log written). Nothing here uses gRPC in a forked child, so turn that off
# (before grpc is imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST test set kept in the repository (tests/data/mnist, with its licence)."""
    return DATA / "mnist"


@pytest.fixture(scope="session")
def active_streams() -> Callable[[Any], int]:
    """Reads a server's pulls and pushes in flight from its metrics, as a scraper would."""

    def read(server: Any) -> int:
        return int(server.metrics.registry.get_sample_value("gradfleet_active_streams"))

    return read


@pytest.fixture(scope="session")
def scoring_processes() -> Callable[..., list[int]]:
    """Lists the held-out scoring processes that still run and whose parent is this test
    process (or `parent`), read from /proc as `ps` would."""

    def find(parent: int | None = None) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except (OSError, ValueError, IndexError):  # not a process, or one that just ended
                continue
            if ppid == (parent or os.getpid()) and b"gradfleet.worker.scoring" in command:
                found.append(int(entry))
        return found

    return find
