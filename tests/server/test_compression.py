"""Compressed gradients and weights against a real server: the reference's numbers, bit
for bit, and malformed payloads refused without changing anything."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from gradfleet.nn.optim import make_optimizer
from gradfleet.nn.reduce import GradientSum
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.codecs import Codec, Residual
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import serve

pytestmark = pytest.mark.integration
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CODECS = ["none", "bf16", "fp16", "sign", "topk:0.05", "topk:1"]
# 34186 elements: every codec's payload (sign's is 4282 bytes) is over 4096 bytes
SPEC = {"type": "MLP", "sizes": [256, 128, 10], "activation": "relu", "dtype": "float64"}
SMALL_CHUNKS = 4096


@dataclass
class CodecReference:
    """What the workers' clients and the server compute: a residual per worker, payloads
    decoded into the ordered sum (`add_parts`), then the same optimiser."""

    layout: FlatLayout
    weights: np.ndarray
    optimizer_config: dict
    codec: Codec
    workers: int
    residuals: list[Residual] = field(init=False)

    def __post_init__(self) -> None:
        self.weights = self.weights.copy()
        self.optimizer = make_optimizer(self.optimizer_config)
        size, dtype = self.layout.total_elements, self.layout.dtype
        self.residuals = [Residual(self.codec, size, dtype) for _ in range(self.workers)]

    def decoded(self, worker: int, step: int, grad: np.ndarray) -> np.ndarray:
        payload = self.residuals[worker].encode(grad, step)
        return self.codec.decode(payload, self.layout.total_elements, self.layout.dtype)

    def sync_step(self, step: int, grads: list[np.ndarray]) -> np.ndarray:
        size, dtype = self.layout.total_elements, self.layout.dtype
        total = GradientSum(size, dtype)
        for worker, grad in enumerate(grads):
            payload = self.residuals[worker].encode(grad, step)
            total.add_parts(self.codec.parts(payload, size, dtype), self.codec.dense)
        mean = total.mean()
        assert mean is not None
        self.optimizer.step(self.layout.views(self.weights), self.layout.views(mean))
        return self.weights

    def async_step(self, worker: int, step: int, grad: np.ndarray) -> np.ndarray:
        mean = self.decoded(worker, step, grad)
        self.optimizer.step(self.layout.views(self.weights), self.layout.views(mean))
        return self.weights


def pulled_codec(codec: Codec, weights: np.ndarray) -> np.ndarray:
    """The weights as a pull through `codec` delivers them."""
    return codec.decode(codec.encode(weights), weights.size, weights.dtype)


@contextmanager
def server_and_clients(
    count: int, chunk_bytes: int | None
) -> Iterator[tuple[str, list[ParameterServerClient]]]:
    """A server and `count` clients, all with `chunk_bytes` (None: the defaults)."""
    options = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    with ExitStack() as stack:
        server = stack.enter_context(serve(host="127.0.0.1", port=0, **options))
        clients = [
            stack.enter_context(ParameterServerClient(server.address, timeout=30, **options))
            for _ in range(count)
        ]
        yield server.address, clients


def gradient(layout: FlatLayout, worker: int, step: int) -> np.ndarray:
    """Worker 1's values are large: fp16 saturates many of them, and orders of magnitude
    apart the sum's order shows in its bits."""
    rng = np.random.default_rng(1000 * step + worker)
    return rng.standard_normal(layout.total_elements) * 10.0 ** (5 * worker)


def new_job(
    client: ParameterServerClient, kit, **options: object
) -> tuple[str, FlatLayout, np.ndarray]:
    """Create a 2-worker job; returns (job id, layout, initial weights in full precision)."""
    job = client.create_job(options.pop("spec", SPEC), kit.SGD, num_workers=2, **options)
    version, weights = client.pull_weights(job, 0, full_precision=True)
    assert version == 0
    return job, client.layout(job), weights


# every codec, sync and async, equals the reference


@pytest.mark.parametrize("chunk_bytes", [None, SMALL_CHUNKS], ids=["one message", "chunks"])
@pytest.mark.parametrize("name", CODECS)
def test_sync_steps_equal_the_reference_bitwise(name: str, chunk_bytes: int | None, kit) -> None:
    steps = 4
    with server_and_clients(2, chunk_bytes) as (_, (first, second)):
        job, layout, weights0 = new_job(first, kit, total_steps=steps, compression=name)
        codec = Codec.parse(name)
        ref = CodecReference(layout, weights0, kit.SGD, codec, workers=2)
        nbytes = codec.payload_bytes(layout.total_elements, layout.dtype)
        seen, retries = [], []

        for step in range(steps):
            g0, g1 = gradient(layout, 0, step), gradient(layout, 1, step)
            first.push_gradient(job, 0, step, 8, 1.0, g0)
            retries.append(first.push_gradient(job, 0, step, 8, 1.0, g0).outcome)
            version, weights = second.push_and_pull(job, 1, step, 8, 1.0, g1)
            seen.append((version, weights.copy(), ref.sync_step(step, [g0, g1]).copy()))

        info = first.get_job(job, history=False)

    assert nbytes > SMALL_CHUNKS  # with small chunks, every push streams several
    assert [s[0] for s in seen] == list(range(1, steps + 1))
    for _, weights, expected in seen:
        assert weights.tobytes() == expected.tobytes()
    assert retries == [pb.PUSH_OUTCOME_DUPLICATE] * steps  # answered, the residual kept
    assert info.counters.accepted == 2 * steps and not dict(info.counters.rejected)
    assert Codec.parse(info.spec.compression) == codec


@pytest.mark.parametrize("chunk_bytes", [None, SMALL_CHUNKS], ids=["one message", "chunks"])
@pytest.mark.parametrize("name", ["sign", "topk:0.05"])
def test_async_updates_equal_the_reference_bitwise(name: str, chunk_bytes: int | None, kit) -> None:
    # (worker, version its gradient was computed on), each applied on arrival
    pushes = [(0, 0), (1, 0), (0, 1), (1, 2), (0, 3), (1, 3)]
    with server_and_clients(1, chunk_bytes) as (_, (client,)):
        job, layout, weights0 = new_job(
            client, kit, total_steps=10, compression=name, mode="async", staleness_bound=2
        )
        ref = CodecReference(layout, weights0, kit.SGD, Codec.parse(name), workers=2)
        seen = []

        for worker, step in pushes:
            grad = gradient(layout, worker, step)
            ack = client.push_gradient(job, worker, step, 8, 1.0, grad)
            _, weights = client.pull_weights(job, ack.version)
            seen.append((ack.version, weights, ref.async_step(worker, step, grad).copy()))

    assert [s[0] for s in seen] == list(range(1, len(pushes) + 1))
    for _, weights, expected in seen:
        assert weights.tobytes() == expected.tobytes()


# pulled weights through a pull codec


@pytest.mark.parametrize("chunk_bytes", [None, SMALL_CHUNKS], ids=["one message", "chunks"])
@pytest.mark.parametrize("pull", ["bf16", "fp16"])
def test_a_pull_codec_sends_rounded_weights_and_exact_pulls_the_masters(
    pull: str, chunk_bytes: int | None, kit
) -> None:
    codec = Codec.parse(pull)
    with server_and_clients(1, chunk_bytes) as (_, (client,)):
        job, layout, weights0 = new_job(client, kit, total_steps=5, pull_compression=pull)
        ref = CodecReference(layout, weights0, kit.SGD, Codec.parse("none"), workers=2)
        _, plain0 = client.pull_weights(job, 0)
        for step in range(2):  # worker 1's gradients take weights past fp16's range
            g0, g1 = gradient(layout, 0, step), gradient(layout, 1, step) * 10
            client.push_gradient(job, 0, step, 8, 1.0, g0)
            _, exchanged = client.push_and_pull(job, 1, step, 8, 1.0, g1)
            master = ref.sync_step(step, [g0, g1])

        version, plain = client.pull_weights(job, 2)
        into = np.zeros_like(master)
        _, into_out = client.pull_weights(job, 2, out=into)
        _, exact = client.pull_weights(job, 2, exact=True)
        _, full = client.pull_weights(job, 2, full_precision=True)

    assert version == 2
    assert plain0.tobytes() == pulled_codec(codec, weights0).tobytes()
    assert plain.tobytes() == pulled_codec(codec, master).tobytes()
    assert exchanged.tobytes() == plain.tobytes()
    assert into_out is into and into.tobytes() == plain.tobytes()
    assert exact.tobytes() == master.tobytes() and full.tobytes() == master.tobytes()
    assert plain.tobytes() != master.tobytes()  # the codec did round
    assert np.isfinite(plain).all()
    if pull == "fp16":
        assert np.abs(master).max() > 65504 and np.abs(plain).max() == 65504


# malformed compressed pushes


def header(job: str, layout: FlatLayout, codec: str, total_bytes: int, **changes) -> bytes:
    fields: dict = {
        "job_id": job,
        "worker": 1,
        "step": 0,
        "rows": 4,
        "loss": 1.0,
        "dtype": pb.DTYPE_FLOAT64,
        "total_bytes": total_bytes,
        "layout": layout.to_proto(),
        "codec": codec,
    }
    return pb.PushHeader(**(fields | changes)).SerializeToString()


Corrupt = Callable[[np.ndarray], np.ndarray]


@dataclass
class Bad:
    """A malformed push of worker 1: its job's compression, the header's codec and byte
    count, and the payload (made from the good one), refused with `reason`."""

    job_codec: str
    reason: str
    header_codec: str | None = None  # None: the job's
    total_bytes: int | None = None  # None: the sent payload's size
    corrupt: Corrupt | None = None  # the good payload (uint8, writable) -> the bad one
    payload_codec: str | None = None  # encode with another codec than the job's


def set_halves(bits: int) -> Corrupt:
    def corrupt(payload: np.ndarray) -> np.ndarray:
        payload.view("<u2")[10] = bits
        return payload

    return corrupt


def set_indices(changes: dict[int, int]) -> Corrupt:
    def corrupt(payload: np.ndarray) -> np.ndarray:
        k = payload.size // 16  # float64 values: 8 bytes of index, 8 of value each
        indices = payload[: 8 * k].view("<i8")
        for place, index in changes.items():
            indices[place] = index
        return payload

    return corrupt


def set_scale(value: float) -> Corrupt:
    def corrupt(payload: np.ndarray) -> np.ndarray:
        payload[:8].view("<f8")[0] = value
        return payload

    return corrupt


def set_topk_value(value: float) -> Corrupt:
    def corrupt(payload: np.ndarray) -> np.ndarray:
        k = payload.size // 16
        payload[8 * k :].view("<f8")[1] = value
        return payload

    return corrupt


SMALL_SPEC = {"type": "MLP", "sizes": [6, 8, 3], "activation": "relu", "dtype": "float64"}
SIZE = 6 * 8 + 8 + 8 * 3 + 3  # 83 elements; topk:0.05 sends 5
BAD_PUSHES = {
    "codec other than the job's": Bad("bf16", "bad_header", header_codec="fp16"),
    "no codec on a compressed job": Bad(
        "bf16", "bad_header", header_codec="", payload_codec="none"
    ),
    "codec on an uncompressed job": Bad("none", "bad_header", header_codec="bf16"),
    "unknown codec": Bad("bf16", "bad_header", header_codec="zstd", payload_codec="bf16"),
    "total_bytes past the payload": Bad("bf16", "bad_bytes", total_bytes=2 * SIZE + 2),
    "total_bytes of the raw values": Bad("sign", "bad_bytes", total_bytes=8 * SIZE),
    "payload short of total_bytes": Bad(
        "fp16", "bad_bytes", total_bytes=2 * SIZE, corrupt=lambda p: p[:-2]
    ),
    "topk index past the end": Bad("topk:0.05", "bad_bytes", corrupt=set_indices({4: SIZE})),
    "topk negative index": Bad("topk:0.05", "bad_bytes", corrupt=set_indices({0: -1})),
    "topk repeated index": Bad("topk:0.05", "bad_bytes", corrupt=set_indices({2: 7, 3: 7})),
    "topk wrapping indices": Bad(
        "topk:0.05", "bad_bytes", corrupt=set_indices({3: 2**63 - 1, 4: -(2**63)})
    ),
    "topk NaN value": Bad("topk:0.05", "non_finite", corrupt=set_topk_value(np.nan)),
    "sign scale NaN": Bad("sign", "non_finite", corrupt=set_scale(np.nan)),
    "sign scale negative": Bad("sign", "non_finite", corrupt=set_scale(-1.0)),
    "bf16 NaN": Bad("bf16", "non_finite", corrupt=set_halves(0x7FC0)),
    "bf16 Inf": Bad("bf16", "non_finite", corrupt=set_halves(0xFF80)),
    "fp16 NaN": Bad("fp16", "non_finite", corrupt=set_halves(0x7E00)),
}


def send(address: str, messages: list[bytes]) -> None:
    """Hand-made push messages: one by PushGradientUnary, more by PushGradient."""
    with grpc.insecure_channel(address) as channel:
        if len(messages) == 1:
            method = "/gradfleet.v1.ParameterService/PushGradientUnary"
            channel.unary_unary(method)(messages[0], timeout=10)
        else:
            method = "/gradfleet.v1.ParameterService/PushGradient"
            channel.stream_unary(method)(iter(messages), timeout=10)


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", BAD_PUSHES.values(), ids=BAD_PUSHES.keys())
def test_a_malformed_compressed_push_is_refused_and_changes_nothing(
    server, client: ParameterServerClient, state_of, kit, case: Bad, streamed: bool
) -> None:
    # prepare: worker 0's push is acknowledged, so the step's sum is in progress
    job, layout, weights0 = new_job(
        client, kit, spec=SMALL_SPEC, total_steps=5, compression=case.job_codec
    )
    ref = CodecReference(layout, weights0, kit.SGD, Codec.parse(case.job_codec), workers=2)
    g0, g1 = gradient(layout, 0, 0), gradient(layout, 1, 0)
    client.push_gradient(job, 0, 0, 4, 1.0, g0)
    before = state_of(job)
    sent_codec = Codec.parse(case.payload_codec or case.header_codec or case.job_codec)
    payload = sent_codec.encode(g1).copy()
    total = payload.size if case.total_bytes is None else case.total_bytes
    if case.corrupt is not None:
        payload = case.corrupt(payload)
    named = case.job_codec if case.header_codec is None else case.header_codec
    first = header(job, layout, "" if named == "none" else named, total)
    data = payload.tobytes()
    half = len(data) // 2
    pieces = [(0, data[:half]), (half, data[half:])] if streamed else [(0, data)]
    messages = [
        encode_chunk_message(offset, piece, first if i == 0 else b"")
        for i, (offset, piece) in enumerate(pieces)
    ]

    # execute
    with pytest.raises(grpc.RpcError) as err:
        send(server.address, messages)

    # assert
    assert err.value.code() == INVALID, err.value.details()
    version, weights, counters = state_of(job)
    assert (version, weights) == before[:2]
    assert (counters.accepted, counters.duplicate, counters.dropped_late) == (1, 0, 0)
    assert dict(counters.rejected) == {case.reason: 1}
    client.push_gradient(job, 1, 0, 4, 1.0, g1)  # nothing of it stayed in the sum
    _, after = client.pull_weights(job, 1)
    assert after.tobytes() == ref.sync_step(0, [g0, g1]).tobytes()
    assert (err.value.details() or "").endswith(".")  # one sentence, as every refusal


# codecs a job cannot have


def create_raw(address: str, **spec_fields: str) -> grpc.RpcError:
    spec = pb.JobSpec(
        model_spec_json=json.dumps(SMALL_SPEC),
        optimizer_json=json.dumps({"name": "sgd", "lr": 0.1}),
        total_steps=1,
        num_workers=1,
        **spec_fields,
    )
    with grpc.insecure_channel(address) as channel:
        create = channel.unary_unary(
            "/gradfleet.v1.ParameterService/CreateJob",
            request_serializer=pb.CreateJobRequest.SerializeToString,
            response_deserializer=pb.CreateJobResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            create(pb.CreateJobRequest(spec=spec), timeout=10)
    return err.value


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"compression": "zstd"}, "zstd"),
        ({"compression": "topk:0"}, "topk"),
        ({"compression": "topk:1.5"}, "topk"),
        ({"pull_compression": "sign"}, "pull_compression"),
        ({"pull_compression": "topk:0.5"}, "pull_compression"),
        ({"pull_compression": "zstd"}, "zstd"),
    ],
)
def test_a_job_with_a_codec_it_cannot_have_is_invalid_argument(
    server, client: ParameterServerClient, fields: dict, fragment: str
) -> None:
    error = create_raw(server.address, **fields)

    assert error.code() == INVALID
    assert fragment in (error.details() or "")
    assert client.list_jobs() == []


def test_the_client_refuses_an_unknown_codec_and_the_server_a_sign_pull(
    client: ParameterServerClient, kit
) -> None:
    with pytest.raises(ValueError, match="unknown compression 'zstd'"):
        client.create_job(SMALL_SPEC, kit.SGD, total_steps=1, compression="zstd")
    with pytest.raises(GradfleetError) as err:
        client.create_job(SMALL_SPEC, kit.SGD, total_steps=1, pull_compression="sign")

    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "pull_compression" in err.value.message
    assert client.list_jobs() == []
