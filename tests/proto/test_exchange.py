"""A step as one PushAndPull stream (`begin_exchange`), driven by hand on real servers:
the weights of `push_and_pull`, bit for bit, whatever the codec or the number of servers.

Servers and clients use 4 KiB chunks, so each layer of a small model spans several
messages both ways. The layer ranges go out last layer first, as a backward pass
writes them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import InvalidArgument, Reason
from gradfleet.proto.exchange import StreamedExchange
from gradfleet.proto.sharded import ShardedClient, ShardedExchange
from gradfleet.proto.wire import FlatLayout
from gradfleet.server import serve

pytestmark = pytest.mark.integration
SPEC = {"type": "MLP", "sizes": [24, 96, 64, 10], "dtype": "float64", "seed": 0}
ADAM = {"name": "adam", "lr": 0.01}
CHUNK = 4096
WORKERS, STEPS, ROWS, LOSS = 2, 5, 8, 0.5
MODEL = MLP.from_spec(SPEC)
LAYOUT = FlatLayout.from_arrays(MODEL.unflatten(MODEL.flat))
# [start, stop) of each layer's weight and bias in the flat buffer, first layer first
LAYERS = [
    (weight.offset, bias.offset + bias.size)
    for weight, bias in zip(LAYOUT.entries[::2], LAYOUT.entries[1::2], strict=True)
]
CODECS: dict[str, dict[str, Any]] = {
    "none": {},
    "bf16": {"compression": "bf16", "pull_compression": "bf16"},
    "sign": {"compression": "sign"},
}
Client = ParameterServerClient | ShardedClient
# (client, job, worker, step, gradient) -> (version, the weights received)
StepFn = Callable[[Client, str, int, int, np.ndarray], tuple[int, np.ndarray]]


def gradient(worker: int, step: int) -> np.ndarray:
    rng = np.random.default_rng(100 * step + worker)
    return rng.standard_normal(LAYOUT.total_elements) * 10.0**-worker


@contextlib.contextmanager
def servers(count: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve(port=0, chunk_bytes=CHUNK)).address for _ in range(count)]


def connect(addresses: list[str]) -> Client:
    clients = [ParameterServerClient(a, timeout=30, chunk_bytes=CHUNK) for a in addresses]
    return clients[0] if len(clients) == 1 else ShardedClient(clients)


def create_job(addresses: list[str], job_id: str, **settings: Any) -> None:
    options = {"num_workers": WORKERS, "total_steps": STEPS, "job_id": job_id, **settings}
    with connect(addresses) as ps:
        if isinstance(ps, ShardedClient):
            ps.create_job(SPEC, ADAM, layout=LAYOUT, **options)
        else:
            ps.create_job(SPEC, ADAM, **options)


def plain_step(
    ps: Client, job_id: str, worker: int, step: int, grad: np.ndarray
) -> tuple[int, np.ndarray]:
    return ps.push_and_pull(job_id, worker, step, ROWS, LOSS, grad)


def send_layers(exchange: StreamedExchange | ShardedExchange) -> None:
    """Send every layer's range, last layer first as backward finishes them; end the push."""
    for start, stop in reversed(LAYERS):
        exchange.send(start, stop, ROWS, LOSS)
    exchange.close()


def streamed_step(
    ps: Client, job_id: str, worker: int, step: int, grad: np.ndarray
) -> tuple[int, np.ndarray]:
    """One step as an exchange; each layer, once `wait` returns for it, must already hold
    the final weights (the buffer starts as NaN, so an early return would show)."""
    out = np.full(LAYOUT.total_elements, np.nan)
    exchange = ps.begin_exchange(job_id, worker, step, grad, out=out)
    send_layers(exchange)
    version = exchange.wait_version()
    seen = []
    for start, stop in LAYERS:
        exchange.wait(start, stop)
        seen.append(out[start:stop].copy())
    finished, weights = exchange.finish()
    assert finished == version and weights is out
    for (start, stop), early in zip(LAYERS, seen, strict=True):
        assert early.tobytes() == weights[start:stop].tobytes()
    return version, weights


def train(addresses: list[str], job_id: str, step: StepFn) -> list[list[tuple[int, bytes]]]:
    """Run WORKERS threads through the job; each one's (version, weights) after every step."""
    received: list[list[tuple[int, bytes]]] = [[] for _ in range(WORKERS)]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with connect(addresses) as ps:
                version, _ = ps.pull_weights(job_id, 0)
                while version < STEPS:
                    version, weights = step(ps, job_id, w, version, gradient(w, version))
                    received[w].append((version, weights.tobytes()))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return received


def final_weights(addresses: list[str], job_id: str) -> bytes:
    with connect(addresses) as ps:
        return ps.pull_weights(job_id, 0, full_precision=True)[1].tobytes()


@pytest.mark.parametrize(
    ("codec", "shards"),
    [("none", 1), ("bf16", 1), ("sign", 1), ("none", 2), ("bf16", 2)],
    ids=["none", "bf16", "sign", "none-2-servers", "bf16-2-servers"],
)
def test_an_exchange_per_step_gives_the_weights_of_push_and_pull(codec: str, shards: int) -> None:
    with servers(shards) as addresses:
        create_job(addresses, "plain", **CODECS[codec])
        create_job(addresses, "streamed", **CODECS[codec])

        expected = train(addresses, "plain", plain_step)
        got = train(addresses, "streamed", streamed_step)
        weights = final_weights(addresses, "plain"), final_weights(addresses, "streamed")

    assert [version for version, _ in got[0]] == list(range(1, STEPS + 1))
    for w in range(WORKERS):
        for step, (a, b) in enumerate(zip(got[w], expected[w], strict=True)):
            assert a == b, f"worker {w}, step {step + 1}"
    assert weights[0] == weights[1]


def test_ranges_in_any_order_and_size_give_the_same_push() -> None:
    # the first layer first, and the last layer in two pieces
    def scrambled_step(
        ps: Client, job_id: str, worker: int, step: int, grad: np.ndarray
    ) -> tuple[int, np.ndarray]:
        exchange = ps.begin_exchange(job_id, worker, step, grad)
        start, stop = LAYERS[-1]
        middle = (start + stop) // 2
        for lo, hi in [*LAYERS[:-1], (middle, stop), (start, middle)]:
            exchange.send(lo, hi, ROWS, LOSS)
        exchange.close()
        return exchange.finish()

    with servers(1) as addresses:
        create_job(addresses, "plain", **CODECS["bf16"])
        create_job(addresses, "streamed", **CODECS["bf16"])

        expected = train(addresses, "plain", plain_step)
        got = train(addresses, "streamed", scrambled_step)

    assert got == expected


def reference(addresses: list[str], codec: str) -> list[bytes]:
    """The weights after every step of an undisturbed job run with push_and_pull."""
    create_job(addresses, "reference", **CODECS[codec])
    return [weights for _, weights in train(addresses, "reference", plain_step)[0]]


def counters(address: str, job_id: str) -> dict:
    with ParameterServerClient(address, timeout=30) as ps:
        c = ps.get_job(job_id, history=False).counters
        return {"accepted": c.accepted, "duplicate": c.duplicate, "rejected": dict(c.rejected)}


def wait_for_accepted(address: str, job_id: str, accepted: int) -> None:
    deadline = time.monotonic() + 30
    while counters(address, job_id)["accepted"] < accepted:
        assert time.monotonic() < deadline, "the push was never accepted"
        time.sleep(0.01)


Finish = Callable[[], tuple[int, np.ndarray]]


def one_thread_steps(
    address: str, job_id: str, retry: Callable[[list[Client], int], Finish]
) -> list[bytes]:
    """Both workers' exchanges driven from this thread (a stream pushes in gRPC's own
    thread). At step 2 worker 0 goes first, through `retry(clients, step)`, which returns
    how to finish its step once worker 1 has pushed. Returns worker 0's weights after
    every step, checking that worker 1 got the same."""
    seen = []
    clients = [connect([address]) for _ in range(WORKERS)]
    try:
        for step in range(STEPS):
            finish = retry(clients, step) if step == 2 else None
            exchanges = [
                c.begin_exchange(job_id, w, step, gradient(w, step))
                for w, c in enumerate(clients)
                if w > 0 or finish is None
            ]
            for exchange in exchanges:
                send_layers(exchange)
            if finish is None:
                finish = exchanges.pop(0).finish
            version, weights = finish()
            assert exchanges[0].finish()[1].tobytes() == weights.tobytes()
            assert version == step + 1
            seen.append(weights.tobytes())
    finally:
        for c in clients:
            c.close()
    return seen


@pytest.mark.parametrize("codec", list(CODECS))
def test_an_exchange_cancelled_after_its_push_then_begun_again_counts_once(codec: str) -> None:
    def cancel_and_begin_again(clients: list[Client], step: int) -> Finish:
        first = clients[0].begin_exchange("j", 0, step, gradient(0, step))
        send_layers(first)
        wait_for_accepted(address, "j", WORKERS * step + 1)  # the step is open: no worker 1
        first.cancel()
        again = clients[0].begin_exchange("j", 0, step, gradient(0, step))
        send_layers(again)
        return again.finish

    with servers(1) as (address,):
        expected = reference([address], codec)
        create_job([address], "j", **CODECS[codec])

        got = one_thread_steps(address, "j", cancel_and_begin_again)
        found = counters(address, "j")

    assert got == expected  # the residual was not corrected twice either
    assert found == {"accepted": WORKERS * STEPS, "duplicate": 1, "rejected": {}}


@pytest.mark.parametrize("codec", list(CODECS))
def test_an_exchange_cancelled_before_its_push_ended_is_begun_again_whole(codec: str) -> None:
    def cancel_halfway_and_begin_again(clients: list[Client], step: int) -> Finish:
        first = clients[0].begin_exchange("j", 0, step, gradient(0, step))
        first.send(*LAYERS[-1], ROWS, LOSS)  # the last layer only
        first.cancel()
        again = clients[0].begin_exchange("j", 0, step, gradient(0, step))
        send_layers(again)
        return again.finish

    with servers(1) as (address,):
        expected = reference([address], codec)
        create_job([address], "j", **CODECS[codec])

        got = one_thread_steps(address, "j", cancel_halfway_and_begin_again)
        found = counters(address, "j")

    assert got == expected
    assert found["accepted"] == WORKERS * STEPS and found["duplicate"] == 0


@pytest.mark.parametrize("codec", list(CODECS))
def test_push_and_pull_of_a_step_an_exchange_finished_is_a_duplicate(codec: str) -> None:
    def exchange_then_push_and_pull(clients: list[Client], step: int) -> Finish:
        exchange = clients[0].begin_exchange("j", 0, step, gradient(0, step))
        send_layers(exchange)

        def finish() -> tuple[int, np.ndarray]:
            version, weights = exchange.finish()
            again = clients[0].push_and_pull("j", 0, step, ROWS, LOSS, gradient(0, step))
            assert again[0] == version and again[1].tobytes() == weights.tobytes()
            return again

        return finish

    with servers(1) as (address,):
        expected = reference([address], codec)
        create_job([address], "j", **CODECS[codec])

        got = one_thread_steps(address, "j", exchange_then_push_and_pull)
        found = counters(address, "j")

    assert got == expected
    assert found == {"accepted": WORKERS * STEPS, "duplicate": 1, "rejected": {}}


@pytest.mark.parametrize("codec", list(CODECS))
def test_a_non_finite_gradient_is_refused_and_changes_nothing(codec: str) -> None:
    grad = gradient(0, 0)
    grad[LAYERS[0][0] + 3] = np.nan  # in the first layer: the last range sent
    with servers(1) as (address,), connect([address]) as ps:
        create_job([address], "j", **CODECS[codec])
        before = ps.pull_weights("j", 0, full_precision=True)
        exchange = ps.begin_exchange("j", 0, 0, grad)
        send_layers(exchange)

        with pytest.raises(InvalidArgument) as refused:
            exchange.finish()
        after = ps.pull_weights("j", 0, full_precision=True)
        found = counters(address, "j")

    assert refused.value.reason is Reason.NON_FINITE
    assert after[0] == before[0] == 0 and after[1].tobytes() == before[1].tobytes()
    assert found == {"accepted": 0, "duplicate": 0, "rejected": {Reason.NON_FINITE.value: 1}}


def test_a_gradient_of_another_dtype_or_not_contiguous_is_refused_before_sending() -> None:
    grad = gradient(0, 0)
    with servers(1) as (address,), connect([address]) as ps:
        create_job([address], "j")

        with pytest.raises(ValueError, match="flat float64 array"):
            ps.begin_exchange("j", 0, 0, grad.astype(np.float32))
        with pytest.raises(ValueError, match="flat float64 array"):
            ps.begin_exchange("j", 0, 0, np.repeat(grad, 2)[::2])
        info = ps.get_job("j", history=False)

    assert info.version == 0 and info.counters.received == 0


@pytest.mark.parametrize("codec", list(CODECS))
def test_push_and_pull_after_a_half_sent_exchange_sends_the_whole_gradient(codec: str) -> None:
    def half_sent_then_push_and_pull(clients: list[Client], step: int) -> Finish:
        first = clients[0].begin_exchange("j", 0, step, gradient(0, step))
        first.send(*LAYERS[-1], ROWS, LOSS)  # the last layer only
        first.cancel()
        return lambda: clients[0].push_and_pull("j", 0, step, ROWS, LOSS, gradient(0, step))

    with servers(1) as (address,):
        expected = reference([address], codec)
        create_job([address], "j", **CODECS[codec])
        got = one_thread_steps(address, "j", half_sent_then_push_and_pull)

    assert got == expected
