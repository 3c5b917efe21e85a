"""Workers killed by pid while they train (rows 1-3 of the fault matrix).

A killed worker is restarted by Ray and resumes at the server's version, so in sync mode
the job ends with exactly `total_steps` steps and the very weights of an undisturbed run.
When workers die more often than `max_restarts` allows, `train` raises `WorkersFailed`
naming the cause, and the server's view of the job stays coherent.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import grpc
import numpy as np
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.util.state import list_actors

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import load_dataset
from gradfleet.proto.client import ParameterServerClient
from gradfleet.server import serve
from gradfleet.worker.ray_runner import WorkerOptions, WorkersFailed, init_ray

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]

STATE_API: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Any:
    # The dashboard serves Ray's state API, which finds the actors' pids.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = init_ray(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=port,
        log_to_driver=False,
    )
    STATE_API["address"] = f"http://{context.dashboard_url}"
    yield
    ray.shutdown()


def digits_job(steps: int, workers: int = 2) -> JobConfig:
    return JobConfig(
        model=nn.MLP([64, 32, 10], seed=3, dtype="float64"),
        dataset=load_dataset("digits"),
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        batch_size=12 * workers,
        steps=steps,
        workers=workers,
        seed=11,
    )


def live_workers() -> list[Any]:
    """Our worker actors that are alive now (a restarting one is left out)."""
    return sorted(
        list_actors(
            address=STATE_API["address"],
            filters=[("class_name", "=", "GradientWorker"), ("state", "=", "ALIVE")],
            detail=True,
        ),
        key=lambda a: a.actor_id,
    )


class Killer:
    """A progress callback that SIGKILLs worker processes by pid following a plan.

    `plan` is a list of (min_step, how) where `how` is "one" (the first actor, by id),
    "same" (the actor killed last, as soon as Ray has restarted it) or "all".
    """

    def __init__(self, plan: list[tuple[int, str]]) -> None:
        self.plan = list(plan)
        self.killed: list[int] = []
        self.last_actor: str | None = None
        self.last_pid: int | None = None
        self.max_restarts_seen = 0

    def __call__(self, entry: dict[str, float]) -> None:
        actors = live_workers()
        self.max_restarts_seen = max([self.max_restarts_seen, *(a.num_restarts for a in actors)])
        if not self.plan or entry["step"] < self.plan[0][0]:
            return
        how = self.plan[0][1]
        if how == "same":
            targets = [
                a for a in actors if a.actor_id == self.last_actor and a.pid != self.last_pid
            ]
        elif how == "all":
            targets = actors if len(actors) == 2 else []
        else:
            targets = actors[:1]
        if not targets:
            return  # not restarted yet: try again on the next poll
        for target in targets:
            os.kill(target.pid, signal.SIGKILL)
            self.killed.append(target.pid)
        self.last_actor, self.last_pid = targets[0].actor_id, targets[0].pid
        self.plan.pop(0)


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param([(5, "one")], id="once"),
        pytest.param([(5, "one"), (0, "same")], id="twice-in-a-row"),
        pytest.param([(5, "all")], id="two-at-once"),
    ],
)
def test_killed_workers_cost_nothing(plan: list[tuple[int, str]], chaos: Any) -> None:
    # The run must outlast every planned kill and the poll that sees each restart: the
    # job runs at up to ~400 steps/s here, and the monitor polls every 0.5 s.
    job = digits_job(steps=1500)
    killer = Killer(plan)

    undisturbed = train(job, backend="local")
    disturbed = train(job, backend="ray", progress=killer)

    counters = disturbed.final_metrics["server_counters"]
    print(f"killed pids {killer.killed}, counters {counters}")
    assert killer.plan == [], "the job ended before every planned kill"
    assert killer.max_restarts_seen >= 1
    assert disturbed.final_metrics["steps"] == job.total_steps
    assert len(disturbed.history) == job.total_steps
    np.testing.assert_array_equal(disturbed.model.flat, undisturbed.model.flat)
    assert counters["accepted"] == job.workers * job.total_steps
    assert chaos.reconciles(counters)


def test_worker_killed_every_few_steps_within_max_restarts(chaos: Any) -> None:
    kills = max(3, chaos.ROUNDS // 2)
    job = digits_job(steps=150 + 600 * kills)  # a kill cycle lasts a few polls at ~400 steps/s
    # alternate: kill a worker, and as soon as it is back and 3 steps later, the next
    plan = [(5, "one")] + [(0, "same") if i % 2 else (0, "one") for i in range(kills - 1)]
    killer = Killer(plan)
    progress_gate: dict[str, float] = {"next": 5}

    def every_few_steps(entry: dict[str, float]) -> None:
        if entry["step"] >= progress_gate["next"]:
            before = len(killer.killed)
            killer(entry)
            if len(killer.killed) > before:
                progress_gate["next"] = entry["step"] + 3
        else:
            killer.max_restarts_seen = max(
                [killer.max_restarts_seen, *(a.num_restarts for a in live_workers())]
            )

    undisturbed = train(job, backend="local")
    disturbed = train(
        job,
        backend="ray",
        progress=every_few_steps,
        worker_options=WorkerOptions(max_restarts=kills + 1),
    )

    counters = disturbed.final_metrics["server_counters"]
    print(f"{len(killer.killed)} kills: {killer.killed}; counters {counters}")
    assert len(killer.killed) == kills
    assert disturbed.final_metrics["steps"] == job.total_steps
    np.testing.assert_array_equal(disturbed.model.flat, undisturbed.model.flat)
    assert counters["accepted"] == job.workers * job.total_steps
    assert chaos.reconciles(counters)


@pytest.mark.parametrize("who", ["all", "one"])
def test_workers_dying_beyond_max_restarts_fail_the_job_clearly(who: str, chaos: Any) -> None:
    job = digits_job(steps=100_000)

    def kill_whenever_alive(entry: dict[str, float]) -> None:
        actors = live_workers()
        for actor in actors if who == "all" else actors[:1]:
            os.kill(actor.pid, signal.SIGKILL)

    with serve(host="127.0.0.1", port=0) as server:
        with pytest.raises(WorkersFailed) as failure:
            train(
                job,
                backend="ray",
                server=server.address,
                progress=kill_whenever_alive,
                worker_options=WorkerOptions(max_restarts=1),
            )
        with ParameterServerClient(server.address) as ps:
            (info,) = ps.list_jobs()
            version, weights = ps.pull_weights(info.job_id, 0)
            full = ps.get_job(info.job_id)
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    message = str(failure.value)
    print(message, "| version", version, "| counters", info.counters)
    assert "max_restarts" in message and "died" in message
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert chaos.reconciles(info.counters)
    assert 0 <= info.counters.accepted - job.workers * version < job.workers
    assert len(full.history) == version
    assert all(record.contributors == job.workers for record in full.history)
    if version:  # what was applied is exactly the first `version` steps of the job
        truncated = digits_job(steps=version)
        np.testing.assert_array_equal(weights, train(truncated, backend="local").model.flat)
