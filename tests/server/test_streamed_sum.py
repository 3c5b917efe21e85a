"""Streamed sync pushes: received whole into bounded buffers, then summed in worker order.

Nothing of a push reaches the sum before all of it has arrived and been checked, so a
push that fails half-way changes nothing and no acknowledged gradient is ever revoked.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import Reason, ResourceExhausted
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    FlatLayout,
    decode_chunk_message,
    encode_chunk_message,
    plan_chunk_bytes,
)
from gradfleet.server import serve

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


def test_streamed_pushes_arriving_in_reverse_are_summed_in_worker_order() -> None:
    # prepare: 6 workers push streams in reverse order; early ones are held for their turn
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


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(3))))
def test_every_arrival_order_of_three_streams_gives_the_worker_order_sum(
    arrival: tuple[int, ...],
) -> None:
    # prepare: the first two members' gradients may enter the sum in either order; the
    # third must come after both, whatever the order they arrive in
    with serve(port=0) as server, ParameterServerClient(server.address, chunk_bytes=CHUNK) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=3, total_steps=2)
        _, weights0 = ps.pull_weights(job)
        grads = [scaled_gradient(ps.layout(job), w) for w in range(3)]
        assert summed(grads).tobytes() != summed([grads[0], grads[2], grads[1]]).tobytes()
        # execute
        for worker in arrival:
            ps.push_gradient(job, worker, 0, 1, 0.5, grads[worker])
        _, weights1 = ps.pull_weights(job, 1, timeout=10)
    # assert
    assert weights1.tobytes() == sgd_step(weights0, summed(grads), 3).tobytes()


def test_a_missing_worker_with_backups_leaves_the_others_in_worker_order() -> None:
    # prepare: 4 workers, 1 backup; worker 0 never pushes; 3, 2, 1 push one after another
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
    # assert: the step closed on the quorum, summed in worker order whatever the arrival
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED] * 3
    assert version == 1 and info.history[0].contributors == 3
    assert weights1.tobytes() == sgd_step(weights0, by_worker, 3).tobytes()


def test_pushes_that_make_the_quorum_without_a_missing_worker_do_not_wait_for_it() -> None:
    # prepare: 3 workers, 1 backup; worker 0 is missing but 1 and 2 make the quorum
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


def test_finite_gradients_whose_sum_overflows_stop_the_job_with_weights_unchanged() -> None:
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=2, total_steps=2)
        _, weights0 = ps.pull_weights(job)
        huge = np.full(ps.layout(job).total_elements, 3.0e38, dtype=np.float32)
        for worker in (0, 1):
            ps.push_gradient(job, worker, 0, 1, 0.5, huge)
        info = ps.get_job(job, history=False)
        _, weights = ps.pull_weights(job)
    assert info.state == pb.JOB_STATE_STOPPED and info.version == 0
    assert weights.tobytes() == weights0.tobytes()
    assert info.counters.rejected["overflow"] == 1


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


def test_a_push_failing_half_way_changes_nothing_and_revokes_no_ack(kit) -> None:
    # prepare: workers 0 and 1 have pushed (acknowledged) and wait for the step
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC32, SGD, num_workers=3, total_steps=2)
        _, weights0 = ps.pull_weights(job)
        layout = ps.layout(job)
        grads = [scaled_gradient(layout, w) for w in range(3)]
        results: dict[int, tuple[int, np.ndarray]] = {}

        def exchange(worker: int) -> None:
            with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
                results[worker] = own.push_and_pull(job, worker, 0, 1, 0.5, grads[worker])

        threads = [threading.Thread(target=exchange, args=(w,)) for w in (0, 1)]
        for t in threads:
            t.start()
        wait_for_accepted(ps, job, 2)
        # execute: worker 2's stream turns out to hold NaN in its second chunk
        with pytest.raises(Exception) as bad:
            kit.raw_push(server.address, _nan_in_second_chunk(job, layout, 2, grads[2]))
        after_bad = ps.get_job(job, history=False)
        with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
            own.push_gradient(job, 2, 0, 1, 0.5, grads[2])
        for t in threads:
            t.join(timeout=60)
        info = ps.get_job(job, history=False)
    # assert: the acknowledged pushes stood; each worker pushed once; the weights are exact
    assert "NaN" in bad.value.details()
    assert after_bad.version == 0 and after_bad.counters.accepted == 2
    assert dict(after_bad.counters.rejected) == {"non_finite": 1}
    expected = sgd_step(weights0, summed(grads), 3)
    assert sorted(results) == [0, 1]
    for version, weights in results.values():
        assert version == 1 and weights.tobytes() == expected.tobytes()
    assert info.version == 1 and info.counters.accepted == 3
    assert info.counters.received == 4  # 2 + 1 refused + 1


def test_a_pull_stream_reads_one_version_while_the_step_closes_under_it() -> None:
    # prepare: 12 MB of weights stream in 1 MiB chunks, more than the flow-control window,
    # so the server is still reading them when the step closes; one chunk has been read
    spec = {"type": "MLP", "sizes": [3000, 1000], "dtype": "float32", "seed": 0}
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(spec, SGD, num_workers=1, total_steps=2)
        _, weights0 = ps.pull_weights(job)
        assert weights0.nbytes > 4 * (2 << 20)  # weights stream; the window is 2 MiB
        with grpc.insecure_channel(server.address) as channel:
            pull = channel.unary_stream(
                "/gradfleet.v1.ParameterService/PullWeights",
                request_serializer=pb.PullWeightsRequest.SerializeToString,
                response_deserializer=None,
            )
            stream = pull(pb.PullWeightsRequest(job_id=job), timeout=30)
            first = next(stream)
            # execute: the step closes, changing the weights in place, then the stream goes on
            ps.push_gradient(job, 0, 0, 1, 0.5, np.ones_like(weights0))
            rest = list(stream)
        version, weights1 = ps.pull_weights(job)

    # assert: the open stream carried version 0 throughout; a new pull gets version 1
    head = pb.WeightsHeader.FromString(bytes(decode_chunk_message(first)[0]))
    data = b"".join(bytes(decode_chunk_message(m)[2]) for m in [first, *rest])
    assert head.version == 0 and len(rest) >= 4
    assert data == weights0.tobytes()
    assert version == 1
    assert weights1.tobytes() == (weights0 - np.float32(SGD["lr"])).tobytes()


def test_streams_beyond_the_receive_budget_wait_for_a_buffer_and_all_count() -> None:
    # prepare: room for 2 gradients; 5 workers stream theirs at once, in any order
    with serve(port=0, receive_budget_bytes=2 * 28_840) as server:
        with ParameterServerClient(server.address) as ps:
            job = ps.create_job(SPEC32, SGD, num_workers=5, total_steps=2)
            _, weights0 = ps.pull_weights(job)
            layout = ps.layout(job)
            assert layout.nbytes == 28_840
        grads = [np.full(layout.total_elements, 2.0**w, dtype=np.float32) for w in range(5)]

        def push(worker: int) -> int:
            with ParameterServerClient(server.address, chunk_bytes=CHUNK, timeout=30) as own:
                return own.push_gradient(job, worker, 0, 1, 0.5, grads[worker]).outcome

        # execute
        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(push, (4, 1, 3, 0, 2)))
        with ParameterServerClient(server.address) as ps:
            version, weights1 = ps.pull_weights(job, 1, timeout=10)
    # assert: nobody was refused; the mean of all five (exact in any order)
    assert outcomes == [pb.PUSH_OUTCOME_ACCEPTED] * 5 and version == 1
    assert weights1.tobytes() == sgd_step(weights0, np.full_like(grads[0], 31.0), 5).tobytes()


def _stalled_stream(address: str, job: str, layout: FlatLayout, worker: int):  # type: ignore[no-untyped-def]
    """A push stream that sends two chunks and then nothing: it holds a buffer."""
    gate = threading.Event()
    header = pb.PushHeader(
        job_id=job, worker=worker, step=0, rows=1, loss=0.5, dtype=pb.DTYPE_FLOAT32,
        total_bytes=layout.nbytes,
    ).SerializeToString()  # fmt: skip

    def messages():  # type: ignore[no-untyped-def]
        yield encode_chunk_message(0, bytes(CHUNK), header)
        yield encode_chunk_message(CHUNK, bytes(CHUNK))
        gate.wait(30)

    channel = grpc.insecure_channel(address)
    push = channel.stream_unary(
        "/gradfleet.v1.ParameterService/PushGradient",
        request_serializer=None,
        response_deserializer=pb.PushAck.FromString,
    )
    return push.future(messages(), timeout=30), gate, channel


def test_a_push_waiting_for_a_buffer_gets_resource_exhausted_at_its_deadline() -> None:
    # prepare: room for one gradient, held by a stalled stream of worker 0
    with serve(port=0, receive_budget_bytes=28_840) as server:
        with ParameterServerClient(server.address) as ps:
            job = ps.create_job(SPEC32, SGD, num_workers=2, total_steps=2)
            layout = ps.layout(job)
        stalled, gate, channel = _stalled_stream(server.address, job, layout, 0)
        wait_for_server(lambda: server.metrics.registry.get_sample_value(
            "gradfleet_active_streams") == 1.0)  # fmt: skip
        # execute
        with ParameterServerClient(server.address, chunk_bytes=CHUNK, patience=0) as own:
            with pytest.raises(ResourceExhausted) as err:
                own.push_gradient(job, 1, 0, 1, 0.5, scaled_gradient(layout, 1), timeout=1.0)
            gate.set()
            with pytest.raises(grpc.RpcError):
                stalled.result()
            channel.close()
            counters = own.get_job(job, history=False).counters
    # assert: refused with its reason and counted; the stalled stream was refused too
    assert err.value.reason is Reason.RECEIVE_BUSY
    assert counters.accepted == 0 and counters.rejected["receive_busy"] == 1


def wait_for_server(condition) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.01)


def test_a_push_waiting_for_a_buffer_gives_up_when_its_client_leaves() -> None:
    # prepare: room for one gradient, held by a stalled stream; a second push waits
    with serve(port=0, receive_budget_bytes=28_840) as server:
        with ParameterServerClient(server.address) as ps:
            job = ps.create_job(SPEC32, SGD, num_workers=2, total_steps=2)
            layout = ps.layout(job)

        def active() -> float | None:
            return server.metrics.registry.get_sample_value("gradfleet_active_streams")

        holding, gate, first_channel = _stalled_stream(server.address, job, layout, 0)
        wait_for_server(lambda: active() == 1.0)
        waiting, _, second_channel = _stalled_stream(server.address, job, layout, 1)
        wait_for_server(lambda: active() == 2.0)
        # execute: the waiting push's client goes away (no deadline would end its wait)
        waiting.cancel()
        second_channel.close()
        wait_for_server(lambda: active() == 1.0)
        gate.set()
        with pytest.raises(grpc.RpcError):  # its stream ends with a hole: refused
            holding.result()
        first_channel.close()
        with ParameterServerClient(server.address) as ps:
            counters = ps.get_job(job, history=False).counters
    # assert: the server stopped waiting for it at once, and nothing was accepted
    assert counters.accepted == 0
