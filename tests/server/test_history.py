"""Step history: compact columns, paged answers, and checkpoints old and new."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.server import checkpoint, serve
from gradfleet.server.history import FLOAT_FIELDS, INT_FIELDS, StepHistory
from gradfleet.server.translate import step_records


def filled(steps: int, first: int = 0) -> StepHistory:
    history = StepHistory()
    for step in range(first, first + steps):
        history.append(step, loss=step / 10, rows=step % 7, samples_per_sec=2.0 * step,
                       wall_time=1000.0 + step, contributors=1 + step % 3)  # fmt: skip
    return history


def as_dicts(records: Iterable[pb.StepRecord]) -> list[dict]:
    return [{f: getattr(r, f) for f in INT_FIELDS + FLOAT_FIELDS} for r in records]


def test_records_are_sliced_by_step_and_limited() -> None:
    # prepare: enough appends to grow the columns several times
    history = filled(1000, first=5)
    # execute
    page = step_records(history.page(700, 50))
    tail = step_records(history.page(990, 50))
    # assert
    assert len(history) == 1000
    assert [r.step for r in page] == list(range(700, 750))
    assert page[0].loss == 70.0 and page[0].rows == 0 and page[0].contributors == 2
    assert page[0].samples_per_sec == 1400.0 and page[0].wall_time == 1700.0
    assert [r.step for r in tail] == list(range(990, 1005))
    assert step_records(history.page(0, 3))[0].step == 5
    assert step_records(history.page(2000, 10)) == []


def test_arrays_and_old_records_round_trip() -> None:
    # prepare
    history = filled(30)
    records = as_dicts(step_records(history.page(0, 100)))
    # execute
    from_arrays = StepHistory(*history.arrays())
    from_records = StepHistory.from_records(records)
    # assert
    assert step_records(from_arrays.page(0, 100)) == step_records(history.page(0, 100))
    assert step_records(from_records.page(0, 100)) == step_records(history.page(0, 100))
    assert len(StepHistory.from_records([])) == 0


@pytest.mark.parametrize(
    ("ints", "floats", "match"),
    [
        (np.zeros((2, 2), np.int64), np.zeros((2, 3)), "two"),
        (np.zeros((2, 3), np.int64), np.zeros((3, 3)), "two"),
        (np.zeros((2, 3)), np.zeros((2, 3)), "two"),
        (np.array([[3, 0, 1], [3, 0, 1]]), np.zeros((2, 3)), "increase"),
    ],
)
def test_malformed_arrays_are_refused(ints: np.ndarray, floats: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StepHistory(ints, floats)


def run_steps(client: ParameterServerClient, job: str, steps: int) -> None:
    _, weights = client.pull_weights(job)
    grad = np.full_like(weights, 0.01)
    for step in range(steps):
        client.push_and_pull(job, 0, step, 4, 1.0 + step, grad, out=weights)


def test_get_job_and_watch_answer_page_by_page(kit) -> None:
    # prepare: pages of 4 records, a job of 10 steps
    with serve(port=0, history_page=4) as server, ParameterServerClient(server.address) as client:
        job = client.create_job(kit.SPEC64, kit.SGD, num_workers=1, total_steps=10)
        run_steps(client, job, 10)
        # execute
        infos = [client.get_job(job, history_since=since) for since in (0, 4, 8)]
        events = [(e.step.step if e.HasField("step") else e.state) for e in client.watch(job)]
    # assert
    assert [[r.step for r in i.history] for i in infos] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [i.history_more for i in infos] == [True, True, False]
    assert infos[1].history[0].loss == 5.0 and infos[1].history[0].rows == 4
    assert events == [*range(10), pb.JOB_STATE_COMPLETED]  # the state after its steps


@pytest.mark.parametrize("fmt", [2, 3])
def test_checkpoints_keep_the_history_and_older_formats_still_load(
    kit, tmp_path: Path, fmt: int
) -> None:
    # prepare: a checkpoint of today's format, then the same checkpoint rewritten as `fmt`
    # (3: the .npz checked by SHA-256; 2: that, and the history as JSON records)
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as client,
    ):
        job = client.create_job(kit.SPEC64, kit.SGD, num_workers=1, total_steps=6)
        run_steps(client, job, 6)
        expected = client.get_job(job).history
    (meta_path,) = sorted((tmp_path / job).glob("ckpt-*.json"))[-1:]
    new_format = checkpoint.load_latest(tmp_path / job)
    meta = json.loads(meta_path.read_bytes())
    meta["format"] = fmt
    del meta["npz_xxh3_128"], meta["checksum"]
    meta["npz_sha256"] = hashlib.sha256(meta_path.with_suffix(".npz").read_bytes()).hexdigest()
    if fmt == 2:
        meta["history"] = as_dicts(expected)  # as format 2 stored it
    meta["checksum"] = checkpoint._meta_checksum(meta)
    meta_path.write_bytes(json.dumps(meta).encode())
    # execute
    old_format = checkpoint.load_latest(tmp_path / job)
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as client,
    ):
        resumed = client.get_job(job).history
    # assert
    assert new_format is not None and old_format is not None
    assert len(expected) == 6
    assert step_records(StepHistory(*new_format.history).page(0, 100)) == list(expected)
    assert step_records(StepHistory(*old_format.history).page(0, 100)) == list(expected)
    assert list(resumed) == list(expected)
