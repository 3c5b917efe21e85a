"""Fixtures shared by every test package: the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray's GCS gets 30 s to bind its port; a loaded 2-core CI machine has been seen to need
# more right after another test module shut its Ray down.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


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
