"""Worker behaviour without Ray: async mode picks each worker's batches by that worker's own
step count (an epoch of updates walks every shard once, on the local backend and against a
real server), and a worker's patience with an unreachable server is bounded."""

from __future__ import annotations

import itertools
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from gradfleet.client import JobConfig, train
from gradfleet.nn import MLP, make_optimizer
from gradfleet.server import serve
from gradfleet.worker.actor import GradientWorker
from gradfleet.worker.batches import BatchPlan, shard_rows
from gradfleet.worker.datasets import ArrayDataset
from gradfleet.worker.ps_client import ParameterServerClient, ParameterServerError


def _job(workers: int, **changes) -> JobConfig:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 5))
    y = rng.integers(0, 3, 240)
    settings = {
        "model": MLP([5, 8, 3], seed=0, dtype="float64"),
        "dataset": ArrayDataset(x, y, x[:20], y[:20]),
        "optimizer": {"name": "sgd", "lr": 0.1},
        "batch_size": 8 * workers,
        "epochs": 1,
        "workers": workers,
        "mode": "async",
        "seed": 3,
    }
    return JobConfig(**(settings | changes))


def test_local_async_applies_one_worker_at_a_time_on_its_own_batch_sequence() -> None:
    # prepare: the same job computed by hand, update v from worker v % 2, batch v // 2
    job = _job(workers=2)
    data = job.dataset
    model = MLP.from_spec(job.model_spec)
    optimizer = make_optimizer(job.optimizer_settings)
    plans, seen = [], [[], []]
    for worker in range(2):
        start, stop = shard_rows(len(data.x), worker, 2)
        plans.append((start, BatchPlan(job.seed, worker, stop - start, 8)))
    grad = np.empty_like(model.flat)
    for step in range(job.total_steps):
        worker, own_step = step % 2, step // 2
        start, plan = plans[worker]
        rows = start + plan.indices(own_step)
        seen[worker] += rows.tolist()
        model.loss_and_grads(data.x[rows], data.y[rows], job.loss, out=grad)
        optimizer.step(model.unflatten(model.flat), model.unflatten(grad))
    # execute
    result = train(job, backend="local")
    # assert: the same weights bit for bit, and one epoch used each training row once
    assert job.total_steps == 30 and len(result.history) == 30
    np.testing.assert_array_equal(result.model.flat, model.flat)
    assert sorted(seen[0] + seen[1]) == list(range(240))


def test_async_ray_workers_walk_their_batches_in_order_without_skipping() -> None:
    # prepare: 2 workers as threads against a real server; record each one's batch numbers
    job = _job(workers=2)
    data = job.dataset
    with serve(host="127.0.0.1", port=0) as server:
        with ParameterServerClient(server.address) as client:
            job_id = client.create_job(**job.server_settings())
        workers, batches = [], [[], []]
        for worker in range(2):
            start, stop = shard_rows(len(data.x), worker, 2)
            gradient_worker = GradientWorker(
                server.address,
                job_id,
                worker,
                data.x[start:stop],
                data.y[start:stop],
                job.model_spec,
                job.loss,
                job.rows_per_worker,
                job.seed,
                job.total_steps,
                job.mode,
                num_workers=2,
            )
            indices = gradient_worker.plan.indices

            def recording(step: int, worker: int = worker, indices=indices):  # type: ignore[no-untyped-def]
                batches[worker].append(step)
                return indices(step)

            gradient_worker.plan.indices = recording  # type: ignore[method-assign]
            workers.append(gradient_worker)
        # execute
        threads = [threading.Thread(target=w.run) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        with ParameterServerClient(server.address) as client:
            info = client.get_job(job_id)
    # assert: every worker starts at batch 0 and moves on one batch at a time (a batch
    # is only computed again after a stale refusal); the job applied all its updates
    assert info.version == job.total_steps
    for steps in batches:
        assert steps[0] == 0
        assert all(b - a in (0, 1) for a, b in itertools.pairwise(steps))
    applied = sum(len(set(steps)) for steps in batches)
    assert applied >= job.total_steps


def _worker_of_a_server_actor(server_patience: float) -> GradientWorker:
    """A worker told that its server runs as the named Ray actor "server"; nothing listens
    at the address it starts with."""
    return GradientWorker(
        "127.0.0.1:9",
        "job",
        0,
        np.zeros((8, 4)),
        np.zeros(8, dtype=np.int64),
        {"type": "MLP", "sizes": [4, 3]},
        "cross_entropy",
        4,
        0,
        10,
        server_actor_name="server",
        server_patience=server_patience,
    )


def test_a_worker_gives_up_after_its_patience_even_when_it_can_ask_a_server_actor() -> None:
    # prepare: a worker whose server (a named Ray actor) keeps answering with an address
    # nobody serves on; asking the actor is replaced by counting the questions
    worker = _worker_of_a_server_actor(server_patience=0.3)
    asked: list[int] = []
    worker._reconnect = lambda: asked.append(1)  # type: ignore[method-assign]
    unavailable = ParameterServerError("UNAVAILABLE", "no server")
    # execute: the worker's loop would call _recover after each failed call
    with pytest.raises(ParameterServerError, match="giving up"):
        for _ in range(10_000):
            worker._recover(unavailable)
            time.sleep(0.01)
    # assert: it asked for the address while it was patient, then gave up
    assert asked


def test_a_server_that_moved_gets_the_full_patience_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # prepare: the server actor answers with a new address (Ray restarted it elsewhere)
    import ray

    worker = _worker_of_a_server_actor(server_patience=60.0)
    addresses = iter(["127.0.0.1:9", "127.0.0.1:10"])
    actor = SimpleNamespace(get_address=SimpleNamespace(remote=lambda: None))
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: actor)
    monkeypatch.setattr(ray, "get", lambda ref, timeout: next(addresses))
    unavailable = ParameterServerError("UNAVAILABLE", "no server")
    # execute: the same address keeps the clock running; a new one restarts it
    worker._recover(unavailable)
    same = worker._unavailable_since
    worker._recover(unavailable)
    # assert
    assert same is not None and worker._unavailable_since is None
    assert worker.client.address == "127.0.0.1:10"
    worker.client.close()
