"""A checkpoint holds the weights of its own version, although the job goes on updating
them while it is written (the update then goes to a copy, never under the writer)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from gradfleet.proto.wire import FlatLayout
from gradfleet.server import checkpoint
from gradfleet.server.checkpoint_writer import CheckpointWriter
from gradfleet.server.domain import JobSnapshot, PushHeader, PushOutcome
from gradfleet.server.job import Job, JobResources
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.publishing import WeightsPublisher
from gradfleet.server.receive import Gradient
from gradfleet.server.settings import JobSettings, JobSpec

SIZE = 1 << 16
STEPS = 30


def _header(worker: int, step: int) -> PushHeader:
    return PushHeader("j", worker, step, rows=1, loss=0.0, dtype=np.dtype("<f8"),
                      total_bytes=SIZE * 8, layout=None)  # fmt: skip


def test_every_checkpoint_holds_its_versions_weights_while_steps_go_on(tmp_path: Path) -> None:
    written: dict[int, np.ndarray] = {}

    def on_written(snap: JobSnapshot, on_disk: tuple[int, ...]) -> None:
        written[snap.version] = checkpoint.load_version(tmp_path / "j", snap.version).weights

    writer = CheckpointWriter(tmp_path, on_written)
    spec = JobSpec(
        model_spec_json="{}",
        optimizer_json='{"name": "sgd", "lr": 0.5}',
        num_workers=2,
        total_steps=STEPS + 1,
    )
    layout = FlatLayout.from_arrays({"w": np.zeros(SIZE)})
    resources = JobResources(ServerMetrics(), 1 << 20, 1 << 30, 100, writer, checkpoint_every=1)
    snap = JobSnapshot.new("j", JobSettings.validate(spec).spec, layout, np.zeros(SIZE))
    job = Job(snap, resources)
    expected = {}
    rng = np.random.default_rng(0)
    try:
        for step in range(STEPS):
            for worker in range(2):
                grad = Gradient(rng.standard_normal(SIZE))
                assert job.commit(_header(worker, step), grad) is PushOutcome.ACCEPTED
            expected[job.version] = job.weights.copy()
    finally:
        writer.close()

    assert sorted(written) == list(range(1, STEPS + 1))
    for version, weights in expected.items():
        np.testing.assert_array_equal(written[version], weights, err_msg=f"version {version}")


def test_lent_weights_stay_as_they_were_and_the_update_gets_a_copy_until_released() -> None:
    layout = FlatLayout.from_arrays({"w": np.zeros(8)})
    publisher = WeightsPublisher(
        layout, np.arange(8.0), 1 << 20, threading.Lock(), lambda: (0, None, 0)
    )
    lent = publisher.lend()

    updated = publisher.before_update(0)
    updated += 1  # the update, in place

    assert updated is publisher.weights and updated is not lent.weights
    np.testing.assert_array_equal(lent.weights, np.arange(8.0))
    lent.release()
    assert publisher.before_update(1) is updated  # no reader left: updated where it lies
