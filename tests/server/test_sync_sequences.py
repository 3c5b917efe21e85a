"""Random sequences of sync pushes against one `Job`: single messages and streams into
receive slots that complete or fail, duplicates, in any worker order, with and without
backup workers, few or many receive slots.

After every closed step the weights must have moved by exactly the mean of the gradients
the job accepted for that step, every accepted push stays accepted (an ack is final),
and the push counters reconcile. The gradients are powers of two, so every sum is exact
whatever the order.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from gradfleet.proto.errors import GradfleetError, Reason
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.domain import JobSnapshot, JobState, PushHeader, PushOutcome
from gradfleet.server.job import Job, JobResources
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.receive import Gradient
from gradfleet.server.settings import JobSettings, JobSpec
from gradfleet.server.waiting import Waiter

SIZE = 64
STEPS = 4


def _gradient(worker: int, step: int) -> np.ndarray:
    return np.full(SIZE, float(2**worker) * (step + 1))


def _header(worker: int, step: int) -> PushHeader:
    return PushHeader("j", worker, step, rows=1, loss=0.0, dtype=np.dtype("<f8"),
                      total_bytes=SIZE * 8, layout=None)  # fmt: skip


def _random_job(rng: random.Random) -> Job:
    workers = rng.randint(2, 5)
    spec = JobSpec(
        model_spec_json="{}",
        optimizer_json='{"name": "sgd", "lr": 1.0}',
        num_workers=workers,
        backup_workers=rng.randint(0, workers - 1),
        total_steps=STEPS,
    )
    layout = FlatLayout.from_arrays({"w": np.zeros(SIZE)})
    budget = rng.choice([SIZE * 8, 2 * SIZE * 8, 1 << 30])
    resources = JobResources(ServerMetrics(), 4096, budget, history_page=100)
    settings = JobSettings.validate(spec)
    return Job(JobSnapshot.new("j", settings.spec, layout, np.zeros(SIZE)), resources)


class _Driver:
    """Applies one random action at a time; streams being received stay open across
    actions, holding their receive buffers."""

    def __init__(self, job: Job, rng: random.Random) -> None:
        self.job, self.rng = job, rng
        self.receiving: list[tuple[int, int, Gradient]] = []  # (worker, step, buffer)
        self.accepted: dict[int, list[int]] = {}  # step -> workers acknowledged

    def act(self) -> None:
        job, rng = self.job, self.rng
        step, worker = job.version, rng.randrange(job.settings.num_workers)
        try:
            if rng.random() < 0.35 and job.admit(_header(worker, step)) is None:
                buffer = job.receive_slot(0.0, Waiter())  # a stream starts
                self.receiving.append((worker, step, buffer))
            elif self.receiving and rng.random() < 0.5:
                self._end_stream(rng.choice(["complete", "complete", "fail"]))
            elif job.admit(_header(worker, step)) is None:
                self._commit(worker, step, Gradient(_gradient(worker, step)))
        except GradfleetError:
            pass  # refused or no slot free: the job must be unchanged, which the checks see

    def _end_stream(self, how: str) -> None:
        worker, step, gradient = self.receiving.pop(self.rng.randrange(len(self.receiving)))
        half = SIZE // 2
        if how == "fail":  # a bad chunk half-way: the first half was received
            gradient.pieces.append((slice(0, half), np.full(half, 12345.0)))
            self.job.release(gradient)
            self.job.count_rejected(Reason.NON_FINITE)
            return
        values = _gradient(worker, step)  # its chunks, kept as they came, last one first
        gradient.pieces += [(slice(half, SIZE), values[half:]), (slice(0, half), values[:half])]
        self._commit(worker, step, gradient)

    def _commit(self, worker: int, step: int, gradient: Gradient) -> None:
        if self.job.commit(_header(worker, step), gradient) is PushOutcome.ACCEPTED:
            self.accepted.setdefault(step, []).append(worker)


@pytest.mark.parametrize("seed", range(300))
def test_every_closed_step_applies_the_exact_mean_of_its_accepted_gradients(seed: int) -> None:
    rng = random.Random(seed)
    job = _random_job(rng)
    driver = _Driver(job, rng)
    expected, version = job.weights.copy(), 0
    for _ in range(200):
        if job.version >= STEPS or job.info().state is not JobState.RUNNING:
            break
        driver.act()
        if job.version != version:
            counted = driver.accepted[version]
            assert job.info(history_since=version).history.ints[0, 2] == len(counted)
            expected -= sum(_gradient(w, version) for w in counted) / len(counted)
            np.testing.assert_array_equal(job.weights, expected, err_msg=f"step {version}")
            version = job.version
        c = job.info().counters
        assert c.received == c.accepted + c.duplicate + c.dropped_late + sum(c.rejected.values())
        assert c.accepted == sum(len(w) for w in driver.accepted.values())  # never revoked
    assert job.version >= 1  # the sequences do get steps closed
