"""A job spread over S real servers: the same numbers as one server, bad input refused."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import InvalidArgument
from gradfleet.proto.partition import partition
from gradfleet.proto.shard_watch import ShardWatch
from gradfleet.proto.sharded import ShardedClient, ShardsDisagree
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import serve

pytestmark = pytest.mark.integration
SPEC = {"type": "MLP", "sizes": [20, 16, 5], "activation": "relu", "dtype": "float64", "seed": 0}
ADAM = {"name": "adam", "lr": 0.01}
WORKERS, STEPS = 2, 6


def model_layout() -> tuple[FlatLayout, np.ndarray]:
    model = MLP.from_spec(SPEC)
    return FlatLayout.from_arrays(model.unflatten(model.flat)), model.flat.copy()


def gradient(size: int, worker: int, step: int) -> np.ndarray:
    rng = np.random.default_rng(100 * step + worker)
    return rng.standard_normal(size) * 10.0**worker


@contextlib.contextmanager
def servers(count: int, **options: object) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve(port=0, **options)).address for _ in range(count)]


def client_of(addresses: list[str]) -> ParameterServerClient | ShardedClient:
    clients = [ParameterServerClient(a, timeout=30) for a in addresses]
    return clients[0] if len(clients) == 1 else ShardedClient(clients)


def train(addresses: list[str]) -> list[np.ndarray]:
    """The weights after every step of a 2-worker sync job on these servers."""
    layout, _ = model_layout()
    with client_of(addresses) as ps:
        options = {"num_workers": WORKERS, "total_steps": STEPS, "job_id": "j"}
        if isinstance(ps, ShardedClient):
            ps.create_job(SPEC, ADAM, layout=layout, **options)
        else:
            ps.create_job(SPEC, ADAM, **options)
        seen: list[np.ndarray] = []

        def worker(w: int) -> None:
            with client_of(addresses) as own:
                version, weights = own.pull_weights("j", 0)
                while version < STEPS:
                    grad = gradient(layout.total_elements, w, version)
                    version, weights = own.push_and_pull("j", w, version, 1, 0.5, grad)
                    if w == 0:
                        seen.append(weights.copy())

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    return seen


def test_the_partition_is_balanced_contiguous_and_cut_between_tensors_where_it_can() -> None:
    model = MLP([784, 1024, 1024, 10])
    layout = FlatLayout.from_arrays(model.unflatten(model.flat))

    cut = partition(layout, 4, 1 << 20)
    sizes = np.diff(cut.bounds)
    tiny = partition(FlatLayout.from_arrays({"a": np.zeros(10), "b": np.zeros(990)}), 2, 4096)

    assert cut.bounds[0] == 0 and cut.bounds[-1] == layout.total_elements
    assert sizes.max() / sizes.min() < 1.1
    assert sum(cut.layout(layout, s).total_elements for s in range(4)) == layout.total_elements
    assert tiny.bounds[1] != 10  # 10 | 990 is no balance: the cut goes inside "b"


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_weights_after_every_step_equal_one_server_bit_for_bit(shards: int) -> None:
    with servers(1) as one, servers(shards) as many:
        expected = train(one)
        got = train(many)

    assert len(got) == len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.tobytes() == b.tobytes(), f"step {step + 1}"


def test_a_push_for_another_shards_range_changes_nothing_anywhere() -> None:
    layout, _ = model_layout()
    with (
        servers(2) as addresses,
        ShardedClient([ParameterServerClient(a, timeout=10) for a in addresses]) as ps,
    ):
        ps.create_job(SPEC, ADAM, layout=layout, num_workers=1, total_steps=3, job_id="j")
        shard0 = ParameterServerClient(addresses[0], timeout=10)
        shard1 = ParameterServerClient(addresses[1], timeout=10)
        before = [c.pull_weights("j")[1].tobytes() for c in (shard0, shard1)]
        info0 = shard0.get_job("j", history=False)
        # shard 0's header and bytes, sent to shard 1
        header = pb.PushHeader(
            job_id="j", worker=0, step=0, rows=1, loss=0.5, dtype=pb.DTYPE_FLOAT64,
            total_bytes=FlatLayout.from_proto(info0.layout).nbytes, layout=info0.layout,
            shard=info0.spec.shard,
        )  # fmt: skip
        data = np.zeros(FlatLayout.from_proto(info0.layout).total_elements)
        message = encode_chunk_message(0, data.tobytes(), header.SerializeToString())
        with grpc.insecure_channel(addresses[1]) as channel:
            push = channel.unary_unary("/gradfleet.v1.ParameterService/PushGradientUnary")
            with pytest.raises(grpc.RpcError) as err:
                push(message, timeout=10)
        # and a whole-job gradient to one shard through a plain client
        with pytest.raises(InvalidArgument):
            shard1.push_gradient("j", 0, 0, 1, 0.5, np.zeros(layout.total_elements))
        after = [c.pull_weights("j")[1].tobytes() for c in (shard0, shard1)]
        versions = [c.get_job("j", history=False).version for c in (shard0, shard1)]
        shard0.close()
        shard1.close()

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another range" in (err.value.details() or "")
    assert after == before and versions == [0, 0]


def test_servers_holding_another_partition_are_refused_in_one_sentence() -> None:
    layout, _ = model_layout()
    with servers(3) as addresses:
        with ShardedClient([ParameterServerClient(a, timeout=10) for a in addresses]) as three:
            three.create_job(SPEC, ADAM, layout=layout, num_workers=1, total_steps=3, job_id="j")
        two = ShardedClient([ParameterServerClient(a, timeout=10) for a in addresses[:2]])
        with two, pytest.raises(ShardsDisagree, match="shard 0 of 3"):
            two.pull_weights("j")


def test_a_shard_left_one_step_ahead_after_an_agreement_is_brought_back(tmp_path: Path) -> None:
    # a push that reached one shard after the others went back leaves it a step ahead
    layout, _ = model_layout()
    size = layout.total_elements
    dirs = [tmp_path / f"shard-{s}" for s in range(2)]
    with contextlib.ExitStack() as stack:
        addresses = [stack.enter_context(serve(port=0, checkpoint_dir=d)).address for d in dirs]
        ps = stack.enter_context(ShardedClient([ParameterServerClient(a) for a in addresses]))
        ps.create_job(
            SPEC, ADAM, layout=layout, num_workers=1, total_steps=5, job_id="j",
            checkpoint_every=1,
        )  # fmt: skip
        watch = ShardWatch(ps, "j", settle=0.0)
        watch.check()
        for step in range(2):
            ps.push_and_pull("j", 0, step, 1, 0.5, gradient(size, 0, step))
        ps.checkpoint("j")
        ps.clients[0].restore_job("j", 2)  # shard 0 rebuilt from its checkpoint of 2
        watch.check()  # every shard is at 2 already: nothing goes back
        start, stop = partition(layout, 2, ps.clients[0].chunk_bytes).range(1)
        ps.clients[1].push_gradient("j", 0, 2, 1, 0.5, gradient(size, 0, 2)[start:stop])
        apart = [info.version for info in ps.shard_infos("j")]
        watch.check()
        agreed = [info.version for info in ps.shard_infos("j")]
        _, weights = ps.push_and_pull("j", 0, 2, 1, 0.5, gradient(size, 0, 2))
    with servers(2) as undisturbed, client_of(undisturbed) as ps:
        ps.create_job(SPEC, ADAM, layout=layout, num_workers=1, total_steps=5, job_id="j")
        for step in range(3):
            _, expected = ps.push_and_pull("j", 0, step, 1, 0.5, gradient(size, 0, step))

    assert apart == [2, 3] and agreed == [2, 2]
    assert weights.tobytes() == expected.tobytes()
