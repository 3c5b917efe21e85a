"""Overlapped steps end to end on real Ray workers: each step one PushAndPull stream,
each layer's gradient sent as backward writes it; the weights are those of plain steps
and of local mode, bit for bit, for every codec and over two servers.

The model's weights are over 4 MiB, so with the default 1 MiB chunks a step's exchange
does not fit one message and the workers overlap (smaller models keep the unary call).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from threadpoolctl import threadpool_limits

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import load_dataset
from gradfleet.server import serve
from gradfleet.worker.ray_runner import init_ray
from gradfleet.worker.result import TrainResult

pytestmark = [pytest.mark.ray, pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def digits_job(**changes: Any) -> JobConfig:
    settings: dict[str, Any] = {
        "model": nn.MLP([64, 1100, 1000, 10], seed=3, dtype="float32"),  # 4.7 MB
        "dataset": load_dataset("digits"),
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "batch_size": 24,
        "steps": 15,
        "workers": 2,
        "seed": 11,
    }
    return JobConfig(**(settings | changes))


def local_weights(job: JobConfig) -> TrainResult:
    # the workers compute with one BLAS thread (WorkerSpec.blas_threads); OpenBLAS sums a
    # (12, 1100) @ (1100, 1000) product in another order with more
    with threadpool_limits(1):
        return train(dataclasses.replace(job, overlap=False), backend="local")


def exchange_seconds(result: TrainResult) -> list[float]:
    """Each worker's time spent in exchanges outside its compute: an overlapped step
    exchanges while it computes, so its workers count none."""
    return [timings["exchange"] for timings in result.final_metrics["worker_timings"]]


def assert_every_push_accepted(result: TrainResult, job: JobConfig) -> None:
    counters = result.final_metrics["server_counters"]
    assert counters["accepted"] == job.workers * job.total_steps
    assert counters["duplicate"] == 0 and not counters["rejected"]


@pytest.mark.parametrize(
    "changes",
    [
        {"compression": "none"},
        {"compression": "bf16", "pull_compression": "bf16"},
        {"compression": "sign"},
    ],
    ids=lambda changes: "-".join(str(v) for v in changes.values()),
)
def test_overlapped_steps_train_the_weights_of_plain_steps_and_local_mode(
    changes: dict[str, Any],
) -> None:
    job = digits_job(**changes)

    overlapped = train(dataclasses.replace(job, overlap=True), backend="ray")
    plain = train(job, backend="ray")
    local = local_weights(job)

    assert overlapped.model.flat.tobytes() == plain.model.flat.tobytes()
    assert overlapped.model.flat.tobytes() == local.model.flat.tobytes()
    np.testing.assert_allclose(overlapped.losses, local.losses, rtol=1e-12)
    assert exchange_seconds(overlapped) == [0.0, 0.0]
    assert all(seconds > 0 for seconds in exchange_seconds(plain))
    assert_every_push_accepted(overlapped, job)


def test_overlapped_steps_over_two_servers_train_the_weights_of_local_mode() -> None:
    # each server holds half the weights: 256 KiB chunks keep each half's exchange
    # from fitting one message
    job = digits_job(servers=2)
    with contextlib.ExitStack() as stack:
        addresses = [
            stack.enter_context(serve(port=0, chunk_bytes=256 << 10)).address for _ in range(2)
        ]

        overlapped = train(
            dataclasses.replace(job, overlap=True), backend="ray", server=",".join(addresses)
        )
        plain = train(job, backend="ray", server=",".join(addresses))
    local = local_weights(job)

    assert overlapped.model.flat.tobytes() == plain.model.flat.tobytes()
    assert overlapped.model.flat.tobytes() == local.model.flat.tobytes()
    assert exchange_seconds(overlapped) == [0.0, 0.0]
    assert all(seconds > 0 for seconds in exchange_seconds(plain))
    assert_every_push_accepted(overlapped, job)


def test_an_async_job_with_overlap_applies_every_step() -> None:
    job = digits_job(mode="async", staleness_bound=2, overlap=True)

    result = train(job, backend="ray")

    counters = result.final_metrics["server_counters"]
    assert result.final_metrics["steps"] == job.total_steps == len(result.history)
    assert [entry["step"] for entry in result.history] == list(range(1, job.total_steps + 1))
    assert exchange_seconds(result) == [0.0, 0.0]
    assert counters["accepted"] == job.total_steps
    assert set(counters["rejected"]) <= {"stale"}
    assert np.isfinite(result.model.flat).all()
