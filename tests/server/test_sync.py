"""Sync mode against a real server: averaging, idempotence, backup workers, waiting pulls."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.server import serve


def test_one_step_equals_numpy_average_bitwise(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(num_workers=3)
    grads = [kit.gradient(layout, w, 0) for w in range(3)]
    rows, losses = [10, 20, 30], [1.0, 2.0, 4.0]
    # execute
    acks = [client.push_gradient(job, w, 0, rows[w], losses[w], grads[w]) for w in range(3)]
    version, weights = client.pull_weights(job, min_version=1)
    # assert
    assert [a.outcome for a in acks] == [pb.PUSH_OUTCOME_ACCEPTED] * 3
    assert version == 1
    assert weights.tobytes() == ref.sync_step(grads).tobytes()
    record = client.get_job(job).history[0]
    assert (record.step, record.rows, record.contributors) == (0, 60, 3)
    assert record.loss == pytest.approx((10 * 1.0 + 20 * 2.0 + 30 * 4.0) / 60)


def test_out_of_order_arrival_still_sums_in_worker_order(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(num_workers=4)
    grads = [kit.gradient(layout, w, 0) * 10.0**w for w in range(4)]  # order matters in float64
    # execute
    for w in (3, 1, 0, 2):
        client.push_gradient(job, w, 0, 1, 0.5, grads[w])
    _, weights = client.pull_weights(job, min_version=1)
    # assert
    assert weights.tobytes() == ref.sync_step(grads).tobytes()


def test_float32_job_matches_float64_accumulation(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    spec32 = {**kit.SPEC64, "dtype": "float32"}
    job, layout, weights0, ref = make_job(num_workers=2, spec=spec32)
    grads = [kit.gradient(layout, w, 0) for w in range(2)]
    # execute
    for w in (1, 0):
        client.push_gradient(job, w, 0, 4, 1.0, grads[w])
    _, weights = client.pull_weights(job, min_version=1)
    # assert
    assert weights0.dtype == np.float32 and weights.dtype == np.float32
    assert weights.tobytes() == ref.sync_step(grads).tobytes()


def test_duplicate_push_is_acknowledged_and_ignored(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(num_workers=2)
    g0, g1 = kit.gradient(layout, 0, 0), kit.gradient(layout, 1, 0)
    client.push_gradient(job, 0, 0, 1, 1.0, g0)
    # execute
    retry = client.push_gradient(job, 0, 0, 1, 1.0, g0)
    client.push_gradient(job, 1, 0, 1, 1.0, g1)
    late_retry = client.push_gradient(job, 1, 0, 1, 1.0, g1)
    _, weights = client.pull_weights(job, min_version=1)
    # assert
    assert retry.outcome == pb.PUSH_OUTCOME_DUPLICATE
    assert late_retry.outcome == pb.PUSH_OUTCOME_DUPLICATE
    assert weights.tobytes() == ref.sync_step([g0, g1]).tobytes()
    counters = client.get_job(job).counters
    assert (counters.received, counters.accepted, counters.duplicate) == (4, 2, 2)


def test_backup_workers_close_on_first_arrivals_and_drop_the_late(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: 4 workers, 1 backup -> the first 3 gradients close the step
    job, layout, _, ref = make_job(num_workers=4, backup_workers=1)
    grads = [kit.gradient(layout, w, 0) for w in range(4)]
    # execute
    acks = [client.push_gradient(job, w, 0, 1, 1.0, grads[w]) for w in (2, 0, 3, 1)]
    version, weights = client.pull_weights(job, min_version=1)
    # assert
    assert [a.outcome for a in acks] == [pb.PUSH_OUTCOME_ACCEPTED] * 3 + [
        pb.PUSH_OUTCOME_DROPPED_LATE
    ]
    assert version == 1
    assert weights.tobytes() == ref.sync_step([grads[0], grads[2], grads[3]]).tobytes()
    counters = client.get_job(job).counters
    assert (counters.accepted, counters.dropped_late) == (3, 1)


def test_pull_with_min_version_blocks_until_the_step_closes(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(num_workers=2)
    client.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
    result: dict[str, object] = {}
    waiting = threading.Event()

    def pull() -> None:
        waiting.set()
        result["pulled"] = client.pull_weights(job, min_version=1, timeout=30.0)

    puller = threading.Thread(target=pull)
    puller.start()
    waiting.wait()
    # execute
    assert client.get_job(job).version == 0 and "pulled" not in result
    client.push_gradient(job, 1, 0, 1, 1.0, kit.gradient(layout, 1, 0))
    puller.join(timeout=30.0)
    # assert
    version, weights = result["pulled"]  # type: ignore[misc]
    assert version == 1
    expected = ref.sync_step([kit.gradient(layout, 0, 0), kit.gradient(layout, 1, 0)])
    assert weights.tobytes() == expected.tobytes()


def test_pull_times_out_with_deadline_exceeded(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, *_ = make_job(num_workers=1)
    # execute
    with pytest.raises(GradfleetError) as err:
        client.pull_weights(job, min_version=1, timeout=0.3)
    # assert
    assert err.value.code.name == "DEADLINE_EXCEEDED"


def test_push_for_a_future_step_fails_precondition(
    client: ParameterServerClient, make_job, state_of, kit
) -> None:
    # prepare
    job, layout, *_ = make_job(num_workers=2)
    before = state_of(job)
    # execute
    with pytest.raises(GradfleetError) as err:
        client.push_gradient(job, 0, 5, 1, 1.0, kit.gradient(layout, 0, 5))
    # assert
    assert err.value.code.name == "FAILED_PRECONDITION"
    after = state_of(job)
    assert after[:2] == before[:2]
    assert after[2].rejected["future_step"] == 1


def test_sixteen_threads_fifty_steps_no_lost_or_double_counted_gradient(
    server, make_job, kit
) -> None:
    # prepare
    workers, steps = 16, 50
    job, layout, _, ref = make_job(num_workers=workers, total_steps=steps)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with ParameterServerClient(server.address) as own:
                for step in range(steps):
                    version, _ = own.pull_weights(job, min_version=step)
                    assert version == step
                    grad = kit.gradient(layout, worker, step)
                    own.push_gradient(job, worker, step, 2, float(worker), grad)
                    if worker % 4 == 0:  # some workers retry: must be ignored
                        own.push_gradient(job, worker, step, 2, float(worker), grad)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    # execute
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # assert
    assert not errors, errors
    with ParameterServerClient(server.address) as c:
        version, weights = c.pull_weights(job, min_version=steps)
        info = c.get_job(job)
    for step in range(steps):
        expected = ref.sync_step([kit.gradient(layout, w, step) for w in range(workers)])
    assert version == steps and info.state == pb.JOB_STATE_COMPLETED
    assert weights.tobytes() == expected.tobytes()
    assert info.counters.accepted == workers * steps
    assert info.counters.duplicate == 4 * steps
    c = info.counters
    assert c.received == c.accepted + c.duplicate + c.dropped_late + sum(c.rejected.values())
    assert len(info.history) == steps
    assert all(r.contributors == workers for r in info.history)


def test_create_with_same_id_reattaches_and_conflicting_config_is_rejected(
    client: ParameterServerClient, kit
) -> None:
    # prepare
    first = client.create_job(kit.SPEC64, kit.SGD, num_workers=2, total_steps=5, job_id="run-1")
    # execute
    again = client.create_job(
        kit.SPEC64, kit.SGD, num_workers=2, total_steps=5, job_id="run-1", job_config={"x": 1}
    )
    with pytest.raises(GradfleetError) as err:
        client.create_job(kit.SPEC64, kit.SGD, num_workers=3, total_steps=5, job_id="run-1")
    # assert
    assert first == again == "run-1"
    assert err.value.code.name == "ALREADY_EXISTS"
    assert [j.job_id for j in client.list_jobs()] == ["run-1"]


def test_initial_weights_and_job_config_round_trip(client: ParameterServerClient, kit) -> None:
    # prepare
    weights = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones(4)}
    # execute
    job = client.create_job(
        kit.SPEC64, kit.SGD, total_steps=3, initial_weights=weights, job_config={"epochs": 2}
    )
    version, flat = client.pull_weights(job)
    info = client.get_job(job)
    # assert
    assert version == 0
    views = client.layout(job).views(flat)
    assert np.array_equal(views["a"], weights["a"]) and np.array_equal(views["b"], weights["b"])
    assert '"epochs": 2' in info.spec.job_config_json


def test_job_completes_at_total_steps_and_watch_reports_progress(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, *_ = make_job(num_workers=1, total_steps=3)
    for step in range(3):
        client.push_gradient(job, 0, step, 8, 1.0 + step, kit.gradient(layout, 0, step))
    # execute
    events = list(client.watch(job))
    late = client.push_gradient(job, 0, 2, 8, 1.0, kit.gradient(layout, 0, 2))
    # assert
    steps = [e.step.step for e in events if e.HasField("step")]
    assert steps == [0, 1, 2]
    assert events[-1].state == pb.JOB_STATE_COMPLETED and events[-1].version == 3
    assert late.outcome == pb.PUSH_OUTCOME_DUPLICATE
    assert client.get_job(job).state == pb.JOB_STATE_COMPLETED


def test_stop_and_delete(client: ParameterServerClient, make_job, kit) -> None:
    # prepare
    job, layout, *_ = make_job(num_workers=1)
    # execute
    stopped = client.stop_job(job)
    with pytest.raises(GradfleetError) as push_err:
        client.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
    client.delete_job(job)
    with pytest.raises(GradfleetError) as get_err:
        client.get_job(job)
    # assert
    assert stopped.state == pb.JOB_STATE_STOPPED
    assert push_err.value.code.name == "FAILED_PRECONDITION"
    assert get_err.value.code.name == "NOT_FOUND"
    assert client.list_jobs() == []


def test_pull_into_preallocated_array(client: ParameterServerClient, make_job, kit) -> None:
    # prepare
    job, layout, weights0, _ = make_job(num_workers=1)
    out = np.zeros(layout.total_elements, dtype=layout.dtype)
    # execute
    version, result = client.pull_weights(job, 0, out=out)
    # assert
    assert result is out and version == 0
    assert out.tobytes() == weights0.tobytes()


def test_small_chunks_reassemble(server, make_job, kit) -> None:
    # prepare: 4 KiB chunks on the client force many chunks per push
    job, layout, _, ref = make_job(num_workers=1, spec={**kit.SPEC64, "sizes": [64, 64, 8]})
    grad = kit.gradient(layout, 0, 0)
    # execute
    with ParameterServerClient(server.address, chunk_bytes=4096) as small:
        first = small.push_gradient(job, 0, 0, 1, 1.0, grad)
        retry = small.push_gradient(job, 0, 0, 1, 1.0, grad)  # answered before the data
        _, weights = small.pull_weights(job, 1)
    # assert
    assert layout.nbytes > 8 * 4096
    assert first.outcome == pb.PUSH_OUTCOME_ACCEPTED
    assert retry.outcome == pb.PUSH_OUTCOME_DUPLICATE
    assert weights.tobytes() == ref.sync_step([grad]).tobytes()


def test_receive_budget_of_one_gradient_sums_in_arrival_order(kit) -> None:
    # prepare: the budget fits one gradient, so nothing can be held for reordering
    with serve(port=0, receive_budget_bytes=1) as small, ParameterServerClient(small.address) as c:
        job = c.create_job(kit.SPEC64, kit.SGD, num_workers=3, total_steps=5)
        _, weights0 = c.pull_weights(job)
        layout = c.layout(job)
        ref = kit.Reference(layout, weights0, kit.SGD)
        grads = [kit.gradient(layout, w, 0) * 10.0**w for w in range(3)]
        # execute
        for w in (2, 0, 1):
            c.push_gradient(job, w, 0, 1, 1.0, grads[w])
        _, weights = c.pull_weights(job, 1)
    # assert
    assert weights.tobytes() == ref.sync_step([grads[2], grads[0], grads[1]]).tobytes()


def test_pushes_beyond_the_receive_budget_wait_instead_of_failing(kit) -> None:
    # prepare: one receive slot, eight workers pushing at once for three steps
    workers, steps = 8, 3
    with serve(port=0, receive_budget_bytes=1) as small:
        with ParameterServerClient(small.address) as c:
            job = c.create_job(kit.SPEC64, kit.SGD, num_workers=workers, total_steps=steps)
            layout = c.layout(job)
        errors: list[BaseException] = []

        def work(worker: int) -> None:
            try:
                with ParameterServerClient(small.address) as own:
                    for step in range(steps):
                        own.pull_weights(job, step)
                        grad = kit.gradient(layout, worker, step)
                        own.push_gradient(job, worker, step, 1, 1.0, grad)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        # execute
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        with ParameterServerClient(small.address) as c:
            info = c.get_job(job)
    # assert
    assert not errors, errors
    assert info.version == steps and info.counters.accepted == workers * steps
