"""Nothing lost, nothing counted twice: retries and duplicates driven on purpose.

Every push the server decodes for a job is counted once in `received` and once in
exactly one of accepted / duplicate / dropped_late / rejected[reason].
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

from gradfleet.nn.optim import make_optimizer
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.server import serve

SPEC = {"type": "MLP", "sizes": [6, 8, 3], "activation": "relu", "dtype": "float64", "seed": 0}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def gradient(size: int, worker: int, step: int) -> np.ndarray:
    return np.random.default_rng(1000 * step + worker).standard_normal(size)


def reference_weights(weights: np.ndarray, views: Any, workers: int, steps: int) -> np.ndarray:
    """Local arithmetic: sum in worker order (float64 here), mean, the same optimiser."""
    weights = weights.copy()
    optimizer = make_optimizer(SGD)
    for step in range(steps):
        total = np.zeros_like(weights)
        for worker in range(workers):
            np.add(total, gradient(weights.size, worker, step), out=total)
        optimizer.step(views(weights), views(total / workers))
    return weights


@pytest.mark.integration
def test_retries_duplicates_and_rejections_reconcile_exactly(chaos: Any) -> None:
    workers, steps = 3, 12
    rng = random.Random(7)
    sent: Counter[str] = Counter()
    lock = threading.Lock()
    with serve(host="127.0.0.1", port=0) as server, ParameterServerClient(server.address) as ps:
        job_id = ps.create_job(SPEC, SGD, num_workers=workers, total_steps=steps)
        _, initial = ps.pull_weights(job_id, 0)
        layout = ps.layout(job_id)

        def push(worker: int, step: int, grad: np.ndarray | None = None) -> None:
            grad = gradient(initial.size, worker, step) if grad is None else grad
            try:
                ack = ps.push_gradient(job_id, worker, step, 4, 0.5, grad)
                outcome = pb.PushOutcome.Name(ack.outcome)
            except GradfleetError as exc:
                outcome = exc.code.name
            with lock:
                sent[outcome] += 1

        for step in range(steps):
            # every worker pushes 1-3 times (retries), some of them concurrently, in a
            # shuffled order; the step closes on the last first-arrival
            pushes = [(w, step) for w in range(workers) for _ in range(rng.randint(1, 3))]
            rng.shuffle(pushes)
            threads = [threading.Thread(target=push, args=p) for p in pushes]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ps.pull_weights(job_id, min_version=step + 1)
            # retries that arrive after the step closed: duplicates, never re-applied
            push(rng.randrange(workers), step)
            if step:
                push(rng.randrange(workers), step - 1)
            if step + 1 < steps:  # bad pushes in between: rejected, change nothing
                push(workers + 1, step + 1)  # worker id out of range
                push(0, step + 1, np.full(initial.size, np.nan))  # NaN gradient
                push(0, step + 2)  # a step ahead of the job's version
        info = ps.get_job(job_id, history=True)
        _, final = ps.pull_weights(job_id, 0)

    c = info.counters
    expected = reference_weights(initial, layout.views, workers, steps)
    assert info.version == steps
    assert all(record.contributors == workers for record in info.history)
    assert chaos.reconciles(c)
    assert c.received == sum(sent.values())
    assert c.accepted == sent["PUSH_OUTCOME_ACCEPTED"] == workers * steps
    assert c.duplicate == sent["PUSH_OUTCOME_DUPLICATE"]
    assert c.dropped_late == sent["PUSH_OUTCOME_DROPPED_LATE"]
    assert sum(c.rejected.values()) == sent["INVALID_ARGUMENT"] + sent["FAILED_PRECONDITION"]
    assert dict(c.rejected) == {
        "bad_worker": steps - 1,
        "non_finite": steps - 1,
        "future_step": steps - 1,
    }
    np.testing.assert_array_equal(final, expected)
