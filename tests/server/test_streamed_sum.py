"""Streamed sync pushes: folded chunk by chunk into one sum, in worker order, undoable."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    FlatLayout,
    decode_chunk_message,
    encode_chunk_message,
    plan_chunk_bytes,
)
from gradfleet.server import serve
from gradfleet.server.errors import OverLimit, ShuttingDown
from gradfleet.server.jobs import Job
from gradfleet.server.metrics import ServerMetrics
from gradfleet.worker.ps_client import ParameterServerClient

SPEC32 = {"type": "MLP", "sizes": [64, 96, 10], "activation": "relu", "dtype": "float32"}
SGD = {"name": "sgd", "lr": 0.5}
CHUNK = 4096  # bytes per pushed chunk: the 28.8 KB gradient travels as a stream of 8


def test_these_gradients_really_travel_as_streams() -> None:
    nbytes = 4 * sum(a * b + b for a, b in itertools.pairwise(SPEC32["sizes"]))
    assert plan_chunk_bytes(nbytes, CHUNK, 4) == CHUNK < nbytes


def scaled_gradient(layout: FlatLayout, worker: int) -> np.ndarray:
    """float32 gradients of very different sizes, so the order of the sum shows in the bits."""
    rng = np.random.default_rng(worker)
    return (rng.standard_normal(layout.total_elements) * 10.0**worker).astype(np.float32)


def summed(grads: list[np.ndarray]) -> np.ndarray:
    total = grads[0].copy()
    for g in grads[1:]:
        np.add(total, g, out=total)
    return total


def sgd_step(weights: np.ndarray, total: np.ndarray, count: int) -> np.ndarray:
    return weights - np.float32(SGD["lr"]) * (total / count)


def wait_for_accepted(ps: ParameterServerClient, job: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while ps.get_job(job, history=False).counters.accepted < count:
        assert time.monotonic() < deadline, "the pushes never arrived"
        time.sleep(0.01)


def test_one_streamed_gradient_is_the_mean_as_it_is() -> None:
    # prepare: one worker, so the step's sum holds just its streamed gradient
    with (
        serve(port=0, chunk_bytes=CHUNK) as server,
        ParameterServerClient(server.address, chunk_bytes=CHUNK) as ps,
    ):
        job = ps.create_job(SPEC32, SGD, num_workers=1, total_steps=2)
        layout = ps.layout(job)
        _, weights = ps.pull_weights(job)
        grad = scaled_gradient(layout, 3)
        # execute
        ps.push_gradient(job, 0, 0, 1, 0.0, grad)
        _, after = ps.pull_weights(job, 1)
    # assert
    np.testing.assert_array_equal(after, sgd_step(weights, grad, 1))


def test_streamed_pushes_arriving_in_reverse_are_summed_in_worker_order(monkeypatch) -> None:
    # prepare: 6 workers push streams in reverse order; each waits for its turn
    monkeypatch.setattr(Job, "ORDER_PATIENCE", 60.0)
    workers = 6
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=workers, total_steps=3)
        _, weights0 = ps.pull_weights(job)
        layout = ps.layout(job)
        grads = [scaled_gradient(layout, w) for w in range(workers)]
        in_order, reversed_order = summed(grads), summed(grads[::-1])
        assert in_order.tobytes() != reversed_order.tobytes()  # the order is visible

        def push(worker: int) -> int:
            with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
                return own.push_gradient(job, worker, 0, 1, 0.5, grads[worker]).outcome

        # execute
        with ThreadPoolExecutor(workers) as pool:
            futures = []
            for worker in reversed(range(workers)):
                futures.append(pool.submit(push, worker))
                wait_for_accepted(ps, job, 0)  # (a round trip between submissions)
                time.sleep(0.05)
            outcomes = [f.result(timeout=60) for f in futures]
        _, weights1 = ps.pull_weights(job, 1)
        info = ps.get_job(job)
    # assert
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED] * workers
    assert info.counters.accepted == workers and info.history[0].contributors == workers
    assert weights1.tobytes() == sgd_step(weights0, in_order, workers).tobytes()


def test_a_missing_lower_worker_switches_the_step_to_arrival_order(monkeypatch) -> None:
    # prepare: 4 workers, 1 backup; worker 0 never pushes; 3, 2, 1 push one after another
    monkeypatch.setattr(Job, "ORDER_PATIENCE", 0.2)
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=4, total_steps=2, backup_workers=1)
        _, weights0 = ps.pull_weights(job)
        layout = ps.layout(job)
        grads = [scaled_gradient(layout, w) for w in range(4)]
        arrival, by_worker = summed([grads[3], grads[2], grads[1]]), summed(grads[1:])
        assert arrival.tobytes() != by_worker.tobytes()
        # execute
        with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
            outcomes = [own.push_gradient(job, w, 0, 1, 0.5, grads[w]).outcome for w in (3, 2, 1)]
        version, weights1 = ps.pull_weights(job, 1, timeout=10)
        info = ps.get_job(job)
    # assert: worker 3 waited for worker 0 until nothing moved, then the step went on
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED] * 3
    assert version == 1 and info.history[0].contributors == 3
    assert weights1.tobytes() == sgd_step(weights0, arrival, 3).tobytes()


def test_pushes_that_make_the_quorum_without_a_missing_worker_do_not_wait_for_it(
    monkeypatch,
) -> None:
    # prepare: 3 workers, 1 backup; worker 0 is missing but 1 and 2 make the quorum
    monkeypatch.setattr(Job, "ORDER_PATIENCE", 600.0)
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=3, total_steps=2, backup_workers=1)
        _, weights0 = ps.pull_weights(job)
        layout = ps.layout(job)
        grads = [scaled_gradient(layout, w) for w in range(3)]

        def push(worker: int) -> int:
            with ParameterServerClient(server.address, chunk_bytes=CHUNK, timeout=30) as own:
                return own.push_gradient(job, worker, 0, 1, 0.5, grads[worker]).outcome

        # execute
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(push, (2, 1)))
        version, weights1 = ps.pull_weights(job, 1, timeout=10)
    # assert (two gradients: either order gives the same bits)
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED] * 2 and version == 1
    assert weights1.tobytes() == sgd_step(weights0, summed(grads[1:]), 2).tobytes()


def test_a_single_message_arriving_during_a_fold_is_held_not_blocked() -> None:
    # prepare: a job of 3 workers; worker 2's streamed push holds the fold
    weights = np.zeros(8 * 1024, dtype=np.float32)
    layout = FlatLayout.from_arrays({"w": weights})
    job = Job("j", _spec(3), layout, weights.copy(), metrics=ServerMetrics(), chunk_bytes=4096)
    job._open.ordered = False
    grads = [np.full(weights.size, 2.0**w, dtype=np.float32) for w in range(3)]
    assert job.begin_fold(_header(2), None, lambda: False) is None
    # execute: worker 0 (not the last one) commits while the fold runs
    outcome, _ = job.commit(_header(0), grads[0], timeout=5)
    total, first = job.fold_target()
    total[:] = grads[2] if first else total + grads[2]
    job.finish_fold(_header(2))
    job.commit(_header(1), grads[1], timeout=5)
    # assert: nothing waited, and the step summed all three
    assert outcome == pb.PUSH_OUTCOME_ACCEPTED and job.version == 1
    np.testing.assert_array_equal(job.weights, -(np.float32(1.0 + 2.0 + 4.0) / 3))


def test_finite_gradients_whose_sum_overflows_stop_the_job_with_weights_unchanged() -> None:
    weights = np.zeros(1024, dtype=np.float32)
    layout = FlatLayout.from_arrays({"w": weights})
    job = Job("j", _spec(2), layout, weights.copy(), metrics=ServerMetrics())
    huge = np.full(weights.size, 3.0e38, dtype=np.float32)
    job.commit(_header(0), huge)
    with np.errstate(over="ignore"):
        job.commit(_header(1), huge)
    assert job.state == pb.JOB_STATE_STOPPED and job.version == 0
    np.testing.assert_array_equal(job.weights, weights)
    assert job.counters.rejected["overflow"] == 1


def _spec(workers: int) -> pb.JobSpec:
    return pb.JobSpec(
        model_spec_json="{}",
        optimizer_json='{"name": "sgd", "lr": 1.0}',
        mode=pb.MODE_SYNC,
        num_workers=workers,
        total_steps=5,
    )


def _header(worker: int) -> pb.PushHeader:
    return pb.PushHeader(job_id="j", worker=worker, step=0, rows=1, loss=0.0)


def _nan_in_second_chunk(job: str, layout: FlatLayout, worker: int, grad: np.ndarray) -> list:
    header = pb.PushHeader(
        job_id=job,
        worker=worker,
        step=0,
        rows=1,
        loss=0.5,
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=layout.nbytes,
        layout=layout.to_proto(),
    ).SerializeToString()
    data = bytearray(grad.tobytes())
    data[CHUNK : CHUNK + 4] = np.float32(np.nan).tobytes()
    return [
        encode_chunk_message(0, bytes(data[:CHUNK]), header),
        encode_chunk_message(CHUNK, bytes(data[CHUNK:])),
    ]


def test_a_push_failing_half_way_voids_the_sum_and_the_others_push_again(
    kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: workers 0 and 1 have pushed and wait for the step in push_and_pull; the
    # sum stays in worker order however long a busy machine stalls one of them
    monkeypatch.setattr(Job, "ORDER_PATIENCE", 60.0)
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=3, total_steps=2)
        _, weights0 = ps.pull_weights(job)
        layout = ps.layout(job)
        grads = [scaled_gradient(layout, w) for w in range(3)]
        results: dict[int, tuple[int, np.ndarray]] = {}

        def exchange(worker: int) -> None:
            with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
                own.layout(job)
                results[worker] = own.push_and_pull(job, worker, 0, 1, 0.5, grads[worker])

        threads = [threading.Thread(target=exchange, args=(w,)) for w in (0, 1)]
        for t in threads:
            t.start()
        wait_for_accepted(ps, job, 2)
        # execute: worker 2's stream is folded until its second chunk turns out to hold NaN
        with pytest.raises(Exception) as bad:
            kit.raw_push(server.address, _nan_in_second_chunk(job, layout, 2, grads[2]))
        voided = ps.get_job(job, history=False).counters
        with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
            own.push_gradient(job, 2, 0, 1, 0.5, grads[2])
        for t in threads:
            t.join(timeout=60)
        info = ps.get_job(job, history=False)
        sample = server.metrics.registry.get_sample_value
        metrics = (
            sample("gradfleet_steps_reset_total"),
            sample("gradfleet_pushes_total", {"outcome": "VOIDED"}),
        )
    # assert: the sum was voided, 0 and 1 pushed again by themselves, nothing was lost
    assert "NaN" in bad.value.details()
    assert voided.rejected["voided"] == 2 and voided.rejected["non_finite"] == 1
    expected = sgd_step(weights0, summed(grads), 3)
    assert sorted(results) == [0, 1]
    for version, weights in results.values():
        assert version == 1 and weights.tobytes() == expected.tobytes()
    assert info.version == 1 and info.counters.accepted == 3
    assert info.counters.received == 6  # 2 + 1 rejected + 2 pushed again + 1
    assert metrics == (1.0, 2.0)


def test_a_pull_stream_reads_one_version_while_the_step_closes_under_it() -> None:
    # prepare: a job whose weights stream in 8 chunks; a pull stream has read one
    weights = np.arange(8 * 1024, dtype=np.float32)
    layout = FlatLayout.from_arrays({"w": weights})
    job = Job("j", _spec(1), layout, weights.copy(), metrics=ServerMetrics(), chunk_bytes=4096)
    stream = job.weight_messages()
    first = next(stream)
    # execute: the step closes, changing the weights in place, then the stream goes on
    job.commit(_header(0), np.ones_like(weights))
    rest = list(stream)
    fresh = list(job.weight_messages())

    # assert: the open stream still carries version 0; a new one carries version 1
    def assemble(messages: list[bytes]) -> tuple[int, np.ndarray]:
        head = pb.WeightsHeader.FromString(bytes(decode_chunk_message(messages[0])[0]))
        data = b"".join(bytes(decode_chunk_message(m)[2]) for m in messages)
        return head.version, np.frombuffer(data, dtype=np.float32)

    old_version, old = assemble([first, *rest])
    new_version, new = assemble(fresh)
    assert len(rest) == 7 and (old_version, new_version) == (0, 1)
    np.testing.assert_array_equal(old, weights)
    np.testing.assert_array_equal(new, weights - 1.0)
    assert job._readers == {} and job._kept == {}  # the kept copy went with the stream


def _job_for_held_gradients(workers: int, receive_slots: int | None = None) -> Job:
    weights = np.zeros(1024, dtype=np.float32)
    layout = FlatLayout.from_arrays({"w": weights})
    budget = layout.nbytes * receive_slots if receive_slots else 512 << 20
    return Job(
        "j",
        _spec(workers),
        layout,
        weights.copy(),
        metrics=ServerMetrics(),
        chunk_bytes=4096,
        receive_budget_bytes=budget,
    )


def _powers_of_two(workers: int) -> list[np.ndarray]:
    return [np.full(1024, 2.0**w, dtype=np.float32) for w in range(workers)]


def test_a_gradient_held_during_a_fold_whose_first_chunk_failed_is_still_summed() -> None:
    # prepare: 3 workers summing in arrival order (as after ORDER_PATIENCE); worker 1 is
    # in the sum, then worker 2 streams and worker 0's single message is held
    job = _job_for_held_gradients(3, receive_slots=2)
    grads = _powers_of_two(3)
    job._open.ordered = False
    job.commit(_header(1), grads[1])
    assert job.begin_fold(_header(2), None, lambda: False) is None
    job.commit(_header(0), grads[0], timeout=5)
    # execute: worker 2's first chunk is refused (nothing folded); it pushes again
    job.abort_fold(touched=False)
    job.commit(_header(2), grads[2], timeout=5)
    # assert: all three gradients are in the mean
    assert job.version == 1
    np.testing.assert_array_equal(job.weights, -(np.float32(1.0 + 2.0 + 4.0) / 3))


def test_a_gradient_held_during_a_failed_first_fold_is_summed_and_the_mean_divided() -> None:
    # prepare: 2 workers in arrival order; worker 1's stream is the first into the sum
    job = _job_for_held_gradients(2)
    job._open.ordered = False
    grads = _powers_of_two(2)
    assert job.begin_fold(_header(1), None, lambda: False) is None
    total, first = job.fold_target()
    total[:10] = 99.0  # part of the stream went in, then it failed
    job.commit(_header(0), grads[0], timeout=5)  # held during the fold
    # execute: the fold fails; worker 1 pushes again as one message
    job.abort_fold(touched=True)
    job.commit(_header(1), grads[1], timeout=5)
    # assert: the mean of both, not worker 1's gradient alone
    assert first and job.version == 1
    np.testing.assert_array_equal(job.weights, -(np.float32(1.0 + 2.0) / 2))


def test_a_gradient_held_before_a_void_goes_in_when_the_step_starts_again() -> None:
    # prepare: 3 workers; worker 1 folded into the sum, worker 0 held during worker 2's fold
    job = _job_for_held_gradients(3)
    grads = _powers_of_two(3)
    job._open.ordered = False
    assert job.begin_fold(_header(1), None, lambda: False) is None
    total, _ = job.fold_target()
    total[:] = grads[1]
    job.finish_fold(_header(1))
    assert job.begin_fold(_header(2), None, lambda: False) is None
    job.commit(_header(0), grads[0], timeout=5)
    # execute: worker 2's fold fails after touching the sum: worker 1 is voided
    job.abort_fold(touched=True)
    # assert: worker 0's held gradient went in at once (the step's sum starts with it)
    assert job._open.needs_repush == {1} and job._open.summed == {0}
    assert job._open.next_worker == 1 and not job._open.held
    job.commit(_header(1), grads[1], timeout=5)
    job.commit(_header(2), grads[2], timeout=5)
    np.testing.assert_array_equal(job.weights, -(np.float32(1.0 + 2.0 + 4.0) / 3))


def test_a_push_waiting_for_a_fold_gives_up_when_its_client_has_left() -> None:
    # prepare: worker 1's stream folds; a single message from worker 1 must wait for it
    job = _job_for_held_gradients(2)
    assert job.begin_fold(_header(1), None, lambda: False) is None
    # execute + assert: no deadline, but the client is gone: it stops waiting at once
    with pytest.raises(ShuttingDown):
        job.commit(_header(1), np.ones(1024, np.float32), give_up=lambda: True)
    assert job.counters.received == 0 and not job._open.contributors


def test_gradients_held_during_a_fold_stay_within_the_receive_budget() -> None:
    # prepare: 5 workers, a budget of 2 gradients; worker 4's stream folds
    job = _job_for_held_gradients(5, receive_slots=2)
    grads = _powers_of_two(5)
    job._open.ordered = False
    assert job.begin_fold(_header(4), None, lambda: False) is None
    job.commit(_header(1), grads[1], timeout=5)  # held: 1 of the 2 slots
    # execute + assert: the next one waits for the fold instead of being held, up to its
    # deadline; it gets in once the fold ends
    with pytest.raises(OverLimit):
        job.commit(_header(2), grads[2], timeout=0.2)
    assert len(job._open.held) == 1 and 2 not in job._open.contributors
    total, first = job.fold_target()
    total[:] = grads[4] if first else total + grads[4]
    job.finish_fold(_header(4))
    for worker in (2, 0, 3):
        job.commit(_header(worker), grads[worker], timeout=5)
    assert job.version == 1
    np.testing.assert_array_equal(job.weights, -(np.float32(31.0) / 5))
