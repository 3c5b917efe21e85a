"""Random sequences of sync pushes against one `Job`: single messages, streamed folds that
finish or fail before or after touching the sum, in any worker order, with and without
backup workers, few or many receive slots, patient or impatient ordering.

After every closed step the weights must have moved by exactly the mean of the gradients
of the workers the step says it counted, and the push counters must reconcile. The
gradients are powers of two, so every sum is exact whatever the order.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.errors import ServerError
from gradfleet.server.jobs import Job
from gradfleet.server.metrics import ServerMetrics

SIZE = 64
STEPS = 4


def _gradient(worker: int, step: int) -> np.ndarray:
    return np.full(SIZE, float(2**worker) * (step + 1))


def _header(worker: int, step: int) -> pb.PushHeader:
    return pb.PushHeader(job_id="j", worker=worker, step=step, rows=1, loss=0.0)


def _random_job(rng: random.Random) -> Job:
    workers = rng.randint(2, 5)
    spec = pb.JobSpec(
        model_spec_json="{}",
        optimizer_json='{"name": "sgd", "lr": 1.0}',
        mode=pb.MODE_SYNC,
        num_workers=workers,
        backup_workers=rng.randint(0, workers - 1),
        total_steps=STEPS,
    )
    weights = np.zeros(SIZE)
    job = Job(
        "j",
        spec,
        FlatLayout.from_arrays({"w": weights}),
        weights,
        metrics=ServerMetrics(),
        receive_budget_bytes=rng.choice([SIZE * 8, 2 * SIZE * 8, 1 << 30]),
    )
    job.ORDER_PATIENCE = rng.choice([0.0, 1e9])
    return job


class _Driver:
    """Applies one random action at a time; a fold in progress stays open across actions."""

    def __init__(self, job: Job, rng: random.Random) -> None:
        self.job, self.rng = job, rng
        self.fold: tuple[int, int, bool] | None = None  # (worker, step, first into the sum)

    def act(self) -> None:
        job, rng = self.job, self.rng
        step, worker = job.version, rng.randrange(job.settings.num_workers)
        try:
            if self.fold is None and rng.random() < 0.4:
                if job.begin_fold(_header(worker, step), -1, lambda: True) is None:
                    self.fold = (worker, step, job.fold_target()[1])
            elif self.fold is not None and rng.random() < 0.25:
                self._end_fold(rng.choice(["finish", "finish", "fail after", "fail before"]))
            else:
                job.commit(_header(worker, step), _gradient(worker, step), timeout=-1)
        except ServerError:
            pass  # refused or would wait: the job must be unchanged, which the checks see

    def _end_fold(self, how: str) -> None:
        assert self.fold is not None
        worker, step, first = self.fold
        total, _ = self.job.fold_target()
        self.fold = None
        if how == "finish":
            total[:] = _gradient(worker, step) if first else total + _gradient(worker, step)
            self.job.finish_fold(_header(worker, step))
            return
        if how == "fail after":  # part of the push went into the sum
            total[: SIZE // 2] = 12345.0 if first else total[: SIZE // 2] + 7.0
        self.job.abort_fold(touched=how == "fail after")


@pytest.mark.parametrize("seed", range(300))
def test_every_closed_step_applies_the_exact_mean_of_its_counted_gradients(seed: int) -> None:
    rng = random.Random(seed)
    job = _random_job(rng)
    driver = _Driver(job, rng)
    expected, version = job.weights.copy(), 0
    for _ in range(200):
        if job.version >= STEPS or job.state != pb.JOB_STATE_RUNNING:
            break
        driver.act()
        if job.version != version:
            step, counted = job._closed_contributors[-1]
            expected -= sum(_gradient(w, step) for w in counted) / len(counted)
            np.testing.assert_array_equal(job.weights, expected, err_msg=f"step {step}")
            version = job.version
        c = job.counters
        assert c.received == c.accepted + c.duplicate + c.dropped_late + sum(c.rejected.values())
    assert job.version >= 1  # the sequences do get steps closed
