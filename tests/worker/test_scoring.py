"""The held-out scoring process against a real server on loopback (no Ray): it scores
the exact weights of every kept version, reports them to the server, brings its errors
back typed, and ends when stopped, even with the server gone."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gradfleet import nn
from gradfleet.client import JobConfig
from gradfleet.client.data import load_dataset
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import JobNotFound
from gradfleet.server import ParameterServer, serve
from gradfleet.worker.result import evaluate
from gradfleet.worker.scoring import Scorer, ScoringOrder


@pytest.fixture
def server() -> Iterator[ParameterServer]:
    with serve(host="127.0.0.1", port=0) as running:
        yield running


def digits_job(**changes: Any) -> JobConfig:
    settings: dict[str, Any] = {
        "model": nn.MLP([64, 16, 10], seed=3, dtype="float64"),
        "dataset": load_dataset("digits"),
        "optimizer": {"name": "sgd", "lr": 0.05},
        "batch_size": 16,
        "steps": 12,
        "workers": 1,
        "eval_every": 4,
    }
    return JobConfig(**(settings | changes))


def test_every_kept_version_is_scored_on_its_exact_weights(server: ParameterServer) -> None:
    job = digits_job()
    model = nn.MLP.from_spec(job.model_spec)
    rng = np.random.default_rng(0)
    expected = []
    with ParameterServerClient(server.address) as client:
        job_id = client.create_job(**job.server_settings())
        scorer = Scorer(ScoringOrder.for_job(job, server.address, job_id))
        assert scorer.wait_ready(60)
        for step in range(job.total_steps):
            gradient = rng.standard_normal(model.flat.size)
            client.push_gradient(job_id, 0, step, 16, 1.0, gradient)
            if (step + 1) % job.eval_every == 0:
                client.pull_weights(job_id, step + 1, out=model.flat, exact=True)
                expected.append(
                    {"step": step + 1, **evaluate(model, job.data.x_val, job.data.y_val, job.loss)}
                )
        scores = scorer.close(finished=True)
        reported = client.get_job(job_id).latest_evaluation

    assert [s["step"] for s in scores] == [e["step"] for e in expected] == [4, 8, 12]
    for ours, theirs in zip(scores, expected, strict=True):
        assert ours["val_accuracy"] == theirs["val_accuracy"]
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-12)
    assert reported.step == 12
    assert reported.metrics["val_accuracy"] == scores[-1]["val_accuracy"]


def test_an_error_in_the_scoring_process_comes_back_typed(server: ParameterServer) -> None:
    scorer = Scorer(ScoringOrder.for_job(digits_job(), server.address, "no-such-job"))

    with pytest.raises(JobNotFound, match="no-such-job"):
        scorer.close(finished=True)


def test_a_stopped_scorer_exits_with_the_scores_it_had_even_with_the_server_gone(
    scoring_processes: Callable[..., list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    job = digits_job(steps=1000)
    with serve(host="127.0.0.1", port=0) as running, ParameterServerClient(running.address) as c:
        job_id = c.create_job(**job.server_settings())
        scorer = Scorer(ScoringOrder.for_job(job, running.address, job_id))
        assert scorer.wait_ready(60)
        for step in range(job.eval_every):
            c.push_gradient(job_id, 0, step, 16, 1.0, np.zeros(c.layout(job_id).total_elements))
        deadline = time.monotonic() + 60
        while not scorer.latest() and time.monotonic() < deadline:  # version 4 is scored
            time.sleep(0.01)
    # the server is gone; the scorer waits for version 8, which will never come

    scores = scorer.close(finished=False)

    assert [s["step"] for s in scores] == [4]
    assert scoring_processes() == []
    assert "killing it" not in caplog.text  # it exited by itself when told to


def test_a_scorer_that_fails_to_start_says_why_before_training(server: ParameterServer) -> None:
    job = digits_job()
    order = ScoringOrder.for_job(job, server.address, "any-job")
    broken = dataclasses.replace(order, model_spec={**job.model_spec, "sizes": [64]})
    scorer = Scorer(broken)

    with pytest.raises(ValueError, match="sizes"):
        scorer.wait_ready(60)
    scorer.close(finished=False)


TRAINER = """
import sys, time
from gradfleet import nn
from gradfleet.client import JobConfig
from gradfleet.client.data import load_dataset
from gradfleet.proto.client import ParameterServerClient
from gradfleet.worker.scoring import Scorer, ScoringOrder

job = JobConfig(model=nn.MLP([64, 16, 10], seed=3), dataset=load_dataset("digits"),
                steps=1000, workers=1, batch_size=16, eval_every=4)
with ParameterServerClient(sys.argv[1]) as client:
    job_id = client.create_job(**job.server_settings())
scorer = Scorer(ScoringOrder.for_job(job, sys.argv[1], job_id))
assert scorer.wait_ready(60)
print("ready", flush=True)
time.sleep(600)
"""


def test_the_scorer_exits_when_its_trainer_is_killed(
    server: ParameterServer, scoring_processes: Callable[..., list[int]]
) -> None:
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, server.address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None and trainer.stdout.readline() == "ready\n"
        scorers = scoring_processes(trainer.pid)
        assert len(scorers) == 1
    finally:
        trainer.kill()
        trainer.wait()

    deadline = time.monotonic() + 60
    while is_running(scorers[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_running(scorers[0])


def is_running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie waiting for its new parent to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
