"""Overlapped steps (one PushAndPull stream per step) through a server restarted on its
port: the streams in flight fail, the workers redo their step, and a sync job still ends
with the weights of an undisturbed run, bit for bit.

The server is a `gradfleet server` subprocess with 4 KiB chunks, so a small model's
exchange spans many messages and the workers overlap (a model whose exchange fits one
message keeps the unary call); the workers are `GradientWorker`s in threads.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import load_dataset
from gradfleet.proto.client import ParameterServerClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESUMED = re.compile(r"resumed job (\S+) at version (\d+)")
RESTARTS = 2


def wait_for_version(ps: ParameterServerClient, job_id: str, version: int) -> int:
    deadline = time.monotonic() + 120
    while (seen := ps.get_job(job_id, history=False).version) < version:
        assert time.monotonic() < deadline, f"the job stayed at version {seen}"
        time.sleep(0.01)
    return int(seen)


def test_overlapped_workers_outlive_server_restarts_and_train_the_undisturbed_weights(
    tmp_path: Path, chaos: Any
) -> None:
    # prepare
    job = JobConfig(
        model=nn.MLP([64, 96, 64, 10], seed=3, dtype="float64"),
        dataset=load_dataset("digits"),
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        batch_size=24,
        steps=60,
        workers=2,
        seed=11,
        checkpoint_every=4,
        overlap=True,
    )
    server = chaos.server_process(
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--chunk-bytes", "4096"
    ).start()
    with ParameterServerClient(server.address, patience=60) as ps:
        job_id = chaos.create_training_job(ps, job, "overlap")
        overlapping = not ps.exchanges_in_one_message(job_id)
        workers = chaos.ThreadWorkers(job, server.address, job_id).start()

        # execute: stop the server mid-run (SIGTERM: in-flight calls end, a checkpoint is
        # written), then start it again on the same port and checkpoint directory
        stopped_at = []
        for restart in range(RESTARTS):
            stopped_at.append(wait_for_version(ps, job_id, 10 + 15 * restart + 1))
            server.signal(signal.SIGTERM)
            assert server.wait() == 0
            server.start()
        workers.join()
        info = ps.get_job(job_id)
        version, weights = ps.pull_weights(job_id, 0)
    undisturbed = train(job, backend="local")

    # assert
    resumed = [int(v) for j, v in RESUMED.findall(server.log()) if j == job_id]
    print(f"stopped at versions {stopped_at}, resumed at {resumed}; counters {info.counters}")
    assert overlapping
    assert len(resumed) == RESTARTS and all(v < job.total_steps for v in stopped_at)
    assert version == job.total_steps == len(info.history)
    assert all(record.contributors == job.workers for record in info.history)
    assert weights.tobytes() == undisturbed.model.flat.tobytes()
    assert info.counters.accepted == job.workers * job.total_steps
    assert chaos.reconciles(info.counters)
    np.testing.assert_allclose([r.loss for r in info.history], undisturbed.losses, rtol=1e-12)
