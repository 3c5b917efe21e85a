"""Bad streams racing good ones never change the result nor revoke an acknowledgement.

Five workers push streamed gradients with `push_and_pull` while a saboteur keeps sending,
for random workers of the current step, streams whose second chunk holds NaN. Every bad
stream is refused before any of it reaches a sum; each worker pushes each step once; the
final weights equal the worker-order computation bit for bit.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import grpc
import numpy as np
import pytest

from gradfleet.nn.optim import make_optimizer
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import serve

pytestmark = pytest.mark.integration

SPEC = {"type": "MLP", "sizes": [64, 96, 10], "activation": "relu", "dtype": "float32"}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
WORKERS, CHUNK = 5, 4096  # 28.8 KB gradients travel as streams of 4 KB chunks


def gradient(size: int, worker: int, step: int) -> np.ndarray:
    """Sizes 1, 10 and 100 across workers, so any change of summing order shows."""
    rng = np.random.default_rng(1000 * step + worker)
    return (rng.standard_normal(size) * 10.0 ** (worker % 3)).astype(np.float32)


def bad_stream(job: str, layout: FlatLayout, worker: int, step: int) -> list[bytes]:
    data = bytearray(gradient(layout.total_elements, worker, step).tobytes())
    data[CHUNK : CHUNK + 4] = np.float32(np.nan).tobytes()
    header = pb.PushHeader(
        job_id=job,
        worker=worker,
        step=step,
        rows=1,
        loss=0.5,
        dtype=pb.DTYPE_FLOAT32,
        total_bytes=layout.nbytes,
        layout=layout.to_proto(),
    ).SerializeToString()
    return [
        encode_chunk_message(0, bytes(data[:CHUNK]), header),
        encode_chunk_message(CHUNK, bytes(data[CHUNK:])),
    ]


def test_bad_streams_racing_good_ones_leave_the_weights_exact(chaos: Any) -> None:
    steps = 5 * chaos.ROUNDS
    with serve(port=0) as server, ParameterServerClient(server.address) as ps:
        job = ps.create_job(SPEC, SGD, num_workers=WORKERS, total_steps=steps)
        _, initial = ps.pull_weights(job)
        layout = ps.layout(job)
        size = layout.total_elements
        errors: list[BaseException] = []
        rejected = [0]
        done = threading.Event()

        def worker(w: int) -> None:
            rng = random.Random(w)
            try:
                with ParameterServerClient(server.address, chunk_bytes=CHUNK) as own:
                    own.layout(job)
                    version = 0
                    while version < steps:
                        threading.Event().wait(rng.random() * 0.01)
                        grad = gradient(size, w, version)
                        version, _ = own.push_and_pull(job, w, version, 1, 0.5, grad)
            except BaseException as exc:
                errors.append(exc)

        def saboteur() -> None:
            rng = random.Random(99)
            with grpc.insecure_channel(server.address) as channel:
                push = channel.stream_unary(
                    "/gradfleet.v1.ParameterService/PushGradient",
                    request_serializer=None,
                    response_deserializer=pb.PushAck.FromString,
                )
                while not done.is_set():
                    step = ps.get_job(job, history=False).version
                    if step >= steps:
                        return
                    try:
                        push(
                            iter(bad_stream(job, layout, rng.randrange(WORKERS), step)), timeout=10
                        )
                    except grpc.RpcError as exc:
                        rejected[0] += exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                    done.wait(rng.random() * 0.01)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
        bad = threading.Thread(target=saboteur)
        for t in [*threads, bad]:
            t.start()
        for t in threads:
            t.join(timeout=300)
        done.set()
        bad.join(timeout=60)
        info = ps.get_job(job, history=False)
        _, final = ps.pull_weights(job, steps)

    reference, optimizer = initial.copy(), make_optimizer(SGD)
    for step in range(steps):
        total = gradient(size, 0, step)
        for w in range(1, WORKERS):
            np.add(total, gradient(size, w, step), out=total)
        optimizer.step(layout.views(reference), layout.views(total / WORKERS))
    counters = info.counters
    print(f"{rejected[0]} bad streams, counters {counters}")
    assert errors == []
    assert rejected[0] > 0  # the race really happened
    assert info.version == steps and counters.accepted == WORKERS * steps
    assert dict(counters.rejected) == {"non_finite": rejected[0]}  # nothing revoked
    assert counters.duplicate == 0  # no worker had to push a step again
    assert counters.received == (
        counters.accepted
        + counters.duplicate
        + counters.dropped_late
        + sum(counters.rejected.values())
    )
    assert final.tobytes() == reference.tobytes()
