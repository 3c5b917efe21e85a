"""The Python SDK against a real server on a loopback port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from gradfleet import nn
from gradfleet.client import (
    Client,
    InvalidArgument,
    JobConfig,
    JobNotFound,
    ServerUnavailable,
    Unauthenticated,
    train,
)
from gradfleet.client.data import load_dataset
from gradfleet.server import serve
from gradfleet.worker.ray_runner import init_ray

pytestmark = [pytest.mark.integration]
TOKEN = "sdk-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    with serve(host="127.0.0.1", port=0, checkpoint_dir=checkpoints) as running:
        yield running.address


def iris_job(**changes: object) -> JobConfig:
    settings: dict = {
        "model": nn.MLP([4, 8, 3], seed=1),
        "dataset": load_dataset("iris"),
        "batch_size": 16,
        "steps": 12,
        "workers": 2,
    }
    return JobConfig(**(settings | changes))


def test_create_inspect_checkpoint_stop_delete(server: str) -> None:
    job = iris_job()

    with Client(server) as client:
        handle = client.create_job(job)
        status = handle.status()
        listed = [h.job_id for h in client.list_jobs()]
        model = handle.model()
        checkpoint = handle.checkpoint()
        checkpoint_written = Path(checkpoint).exists()
        handle.stop()
        stopped = handle.wait(timeout=10)
        handle.delete()
        with pytest.raises(JobNotFound, match="gradfleet status"):
            client.job(handle.job_id)

    assert status.state == "running"
    assert status.version == 0
    assert status.total_steps == job.total_steps
    assert handle.job_id in listed
    np.testing.assert_array_equal(model.flat, nn.MLP.from_spec(job.model_spec).flat)
    assert checkpoint_written
    assert not Path(checkpoint).exists()  # delete removes the job's checkpoints too
    assert stopped.state == "stopped"


def test_unknown_job_is_job_not_found(server: str) -> None:
    with Client(server) as client, pytest.raises(JobNotFound):
        client.job("no-such-job")


def test_bad_config_from_the_server_is_invalid_argument(server: str) -> None:
    job = iris_job()
    job.optimizer = {"name": "sgd", "lr": -1.0}  # bypasses JobConfig's own check

    with Client(server) as client, pytest.raises(InvalidArgument, match="learning rate"):
        client.create_job(job)


def test_unreachable_server_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    with pytest.raises(ServerUnavailable) as caught:
        Client(f"127.0.0.1:{port}", timeout=1.0)

    assert str(caught.value) == (
        f"no gradfleet server at 127.0.0.1:{port} (is `gradfleet server` running?)"
    )


def test_token_is_required_when_configured() -> None:
    with serve(host="127.0.0.1", port=0, token=TOKEN) as running:
        with Client(running.address) as anonymous, pytest.raises(Unauthenticated):
            anonymous.list_jobs()
        with Client(running.address, token="wrong") as wrong, pytest.raises(Unauthenticated):
            wrong.list_jobs()
        with Client(running.address, token=TOKEN) as right:
            assert right.list_jobs() == []


@pytest.mark.ray
def test_train_on_a_separate_server_then_follow_it_with_the_sdk() -> None:
    job = iris_job(steps=30)
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with serve(host="127.0.0.1", port=0, history_page=7) as running:  # 30 steps in 5 pages
        server = running.address
        try:
            result = train(job, backend="ray", server=server)
        finally:
            ray.shutdown()

        with Client(server) as client:
            handle = client.job(result.job_id)
            final = handle.wait(timeout=10)
            events = list(handle.watch())
            served = handle.model()

    assert final.state == "completed"
    assert final.version == job.total_steps
    assert [e.step for e in events if e.step is not None] == list(range(job.total_steps))
    assert [h["step"] for h in result.history] == list(range(1, job.total_steps + 1))
    assert final.last_loss == result.history[-1]["loss"]
    np.testing.assert_array_equal(served.flat, result.model.flat)


def test_progress_true_reports_through_logging_when_not_a_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    job = iris_job(steps=8)

    with caplog.at_level("INFO", logger="gradfleet.client.reporting"):
        result = train(job, backend="local", progress=True)

    assert result.final_metrics["steps"] == 8
    assert any("step 8/8" in message for message in caplog.messages)
