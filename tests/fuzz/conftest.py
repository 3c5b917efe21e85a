"""A real server with a few jobs for the property-based bad-input suites.

``GRADFLEET_FUZZ_EXAMPLES`` (default 300) sets Hypothesis' examples per property.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout
from gradfleet.server import ParameterServer, serve

FUZZ_EXAMPLES = int(os.environ.get("GRADFLEET_FUZZ_EXAMPLES", "300"))
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


@dataclass
class FuzzJob:
    job_id: str
    num_workers: int
    total_steps: int
    layout: FlatLayout
    mode: str
    stopped: bool = False


@dataclass
class FuzzServer:
    """A running server, a client, and the jobs on it."""

    server: ParameterServer
    client: ParameterServerClient
    channel: grpc.Channel
    jobs: dict[str, FuzzJob] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.server.address

    def state(self) -> dict[str, tuple[int, int, bytes, pb.JobCounters]]:
        """(version, state, weight bytes, counters) of every job, for 'unchanged' checks."""
        out = {}
        for info in self.client.list_jobs():
            version, weights = self.client.pull_weights(info.job_id, 0)
            assert version == info.version
            out[info.job_id] = (info.version, info.state, weights.tobytes(), info.counters)
        return out


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[FuzzServer]:
    with (
        serve(host="127.0.0.1", port=0, max_job_bytes=1 << 20) as server,
        ParameterServerClient(server.address, timeout=30.0, patience=0) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        fuzz = FuzzServer(server, client, channel)
        settings: list[tuple[str, dict[str, Any], int, str]] = [
            ("sync64", {"sizes": [6, 8, 3], "dtype": "float64"}, 2, "sync"),
            ("sync32", {"sizes": [5, 4, 3], "dtype": "float32"}, 3, "sync"),
            ("async64", {"sizes": [4, 3], "dtype": "float64"}, 2, "async"),
            ("stopped", {"sizes": [4, 3], "dtype": "float32"}, 1, "sync"),
        ]
        for name, model, workers, mode in settings:
            spec = {"type": "MLP", "seed": 0, **model}
            job_id = client.create_job(
                spec,
                SGD,
                num_workers=workers,
                total_steps=50,
                mode=mode,
                staleness_bound=2,
                job_id=f"fuzz-{name}",
            )
            fuzz.jobs[name] = FuzzJob(job_id, workers, 50, client.layout(job_id), mode)
        client.stop_job(fuzz.jobs["stopped"].job_id)
        fuzz.jobs["stopped"].stopped = True
        yield fuzz


def rejected_total(counters: pb.JobCounters) -> int:
    return sum(counters.rejected.values())


@pytest.fixture
def fuzz_kit() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(EXAMPLES=FUZZ_EXAMPLES, rejected_total=rejected_total, np=np)
