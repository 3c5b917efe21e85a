"""Worker behaviour without Ray: async mode picks each worker's batches by that worker's own
step count (an epoch of updates walks every shard once, on the local backend and against a
real server)."""

from __future__ import annotations

import itertools
import threading

import numpy as np

from gradfleet.client import JobConfig, train
from gradfleet.nn import MLP, make_optimizer
from gradfleet.proto.client import ParameterServerClient
from gradfleet.server import serve
from gradfleet.worker.actor import GradientWorker, WorkerSpec
from gradfleet.worker.batches import BatchPlan, shard_rows
from gradfleet.worker.datasets import ArrayDataset


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


class RecordedRows(np.ndarray):
    """Features that remember which rows each gather took (what a worker computed on)."""

    seen: list[np.ndarray]

    @classmethod
    def of(cls, x: np.ndarray) -> RecordedRows:
        recorded = np.asarray(x).view(cls)
        recorded.seen = []
        return recorded

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        if isinstance(key, np.ndarray) and key.ndim == 1 and key.dtype.kind == "i":
            self.seen.append(key.copy())
        return np.asarray(super().__getitem__(key))


def batch_numbers(gathered: list[np.ndarray], plan: BatchPlan) -> list[int]:
    """The plan's batch number of each gather, looked for from where the last one was."""
    numbers, k = [], 0
    for rows in gathered:
        k = next(b for b in range(k, k + 50) if np.array_equal(plan.indices(b), rows))
        numbers.append(k)
    return numbers


def test_async_ray_workers_walk_their_batches_in_order_without_skipping() -> None:
    # prepare: 2 workers as threads against a real server; record each one's batch numbers
    job = _job(workers=2)
    data = job.dataset
    with serve(host="127.0.0.1", port=0) as server:
        with ParameterServerClient(server.address) as client:
            job_id = client.create_job(**job.server_settings())
        workers, shards = [], []
        for worker in range(2):
            start, stop = shard_rows(len(data.x), worker, 2)
            spec = WorkerSpec.for_job(job, server.address, job_id, worker)
            shards.append((RecordedRows.of(data.x[start:stop]), data.y[start:stop]))
            workers.append(GradientWorker(spec))
        # execute
        threads = [
            threading.Thread(target=w.run, args=shard)
            for w, shard in zip(workers, shards, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        with ParameterServerClient(server.address) as client:
            info = client.get_job(job_id)
    batches = [
        batch_numbers(x.seen, BatchPlan(job.seed, worker, len(x), job.rows_per_worker))
        for worker, (x, _) in enumerate(shards)
    ]
    # assert: every worker starts at batch 0 and moves on one batch at a time (a batch
    # is only computed again after a stale refusal); the job applied all its updates
    assert info.version == job.total_steps
    for steps in batches:
        assert steps[0] == 0
        assert all(b - a in (0, 1) for a, b in itertools.pairwise(steps))
    applied = sum(len(set(steps)) for steps in batches)
    assert applied >= job.total_steps
