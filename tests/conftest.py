"""Fixtures shared by every test package: the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run gRPC servers in this process and then start Ray, which forks its GCS and
# raylet. With grpcio's fork support on, its fork handlers run in the child, and when
# other threads were inside gRPC the child has been seen to hang before exec: Ray then
# times out waiting for the GCS ("Timed out waiting for file .../gcs_server_port_...",
# no GCS log written). Nothing here uses gRPC in a forked child, so turn that off
# (before grpc is imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def shared_data_dir() -> Path:
    """``$GRADFLEET_DATA_DIR``, else the ``shared/data`` folder beside the repository."""
    configured = os.environ.get("GRADFLEET_DATA_DIR")
    candidates = [Path(configured)] if configured else []
    candidates += [REPO.parent / "shared" / "data", REPO / ".." / ".." / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "mnist").is_dir():
            return candidate.resolve()
    raise FileNotFoundError(
        "the shared MNIST data was not found: set GRADFLEET_DATA_DIR to the folder holding mnist/"
    )


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return shared_data_dir() / "mnist"
