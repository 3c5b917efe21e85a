"""Server CPU of one sync exchange at 269k float32 parameters, in process (issue 3).

No network: the handlers are called directly, so what remains is the Python and NumPy
work a step costs the server. Variants, interleaved in rounds:

* gradfleet: ``TensorCalls.PushAndPullUnary`` of a real server's job (one worker,
  SGD), i.e. decode, checks, the optimiser step and the encoded weights of the reply;
  the message is encoded beforehand, as a client would;
* minimal: ``bench_grpc_floor.MinimalServer.exchange`` (finiteness check, SGD, reply);

then the NumPy building blocks behind two choices in the code: a float32 multiply and
finiteness check on data that starts 0, 2 or 4 bytes past alignment (why the wire pads
chunk data to 16 bytes), and ``p -= lr * g`` done in one pass or in blocks of 2^17 to
2^20 elements at 269k, 1M and 10M parameters (``Optimizer._BLOCK``).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_server_step.py
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_grpc_floor

from gradfleet.nn.mlp import parameter_count
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.runtime import keep_message_buffers_mapped
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import as_bytes_view, encode_chunk_message
from gradfleet.server import serve

SIZES = bench_grpc_floor.SIZES


class Context:
    """The parts of a grpc.ServicerContext an exchange that succeeds touches."""

    def time_remaining(self) -> float:
        return 600.0

    def is_active(self) -> bool:
        return True

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True


def per_call_cpu(variants: dict[str, Callable[[], float]], calls: int, rounds: int) -> dict:
    """Median over rounds of the mean CPU seconds per call of each variant; a variant
    runs one call and returns the CPU seconds of the part it times."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for _ in range(calls // 10):  # warm-up
                fn()
            samples[name].append(sum(fn() for _ in range(calls)) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def timed(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def exchange_handlers(calls: int, rounds: int) -> dict[str, float]:
    params = parameter_count(SIZES)
    grad = np.zeros(params, np.float32)
    spec = {"type": "MLP", "sizes": SIZES, "activation": "relu", "dtype": "float32", "seed": 0}
    with serve(port=0) as server, ParameterServerClient(server.address, timeout=60) as client:
        job = client.create_job(spec, {"name": "sgd", "lr": 1e-6}, num_workers=1, total_steps=10**9)
        service, version = server.service, 0
        layout = client.layout(job).to_proto()

        def gradfleet() -> float:
            nonlocal version
            header = pb.PushHeader(job_id=job, worker=0, step=version, rows=1, loss=0.0,
                                   dtype=pb.DTYPE_FLOAT32, total_bytes=grad.nbytes,
                                   layout=layout).SerializeToString()  # fmt: skip
            message = encode_chunk_message(0, as_bytes_view(grad), header)
            version += 1
            return timed(lambda: service.tensors.PushAndPullUnary(message, Context()))  # type: ignore[arg-type]

        minimal = bench_grpc_floor.MinimalServer(np.zeros(params, np.float32), 1, 1e-6)

        def minimal_exchange() -> float:
            request = grad.tobytes()
            return timed(lambda: minimal.exchange(request, Context()))  # type: ignore[arg-type]

        return per_call_cpu(
            {"gradfleet PushAndPullUnary": gradfleet, "minimal exchange": minimal_exchange},
            calls,
            rounds,
        )


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def alignment(repeats: int) -> list[tuple[int, float, float]]:
    """(bytes past alignment, multiply seconds, isfinite seconds) for 269k float32 values."""
    n = parameter_count(SIZES)
    values = np.random.default_rng(0).random(n, dtype=np.float32).tobytes()
    out = np.empty(n, np.float32)
    rows = []
    for shift in (0, 2, 4):
        g = np.frombuffer(bytes(shift) + values, np.float32, count=n, offset=shift)
        multiply = functools.partial(np.multiply, g, 1e-6, out=out)
        check = functools.partial(np.isfinite, g)
        rows.append((shift, best_seconds(multiply, repeats), best_seconds(check, repeats)))
    return rows


def subtract_scaled(p: np.ndarray, g: np.ndarray, scratch: np.ndarray) -> None:
    """p -= 1e-6 * g through `scratch`, in blocks of scratch.size elements."""
    block = scratch.size
    for lo in range(0, p.size, block):
        part = np.multiply(g[lo : lo + block], 1e-6, out=scratch[: min(block, p.size - lo)])
        np.subtract(p[lo : lo + block], part, out=p[lo : lo + block])


def subtract_blocks(repeats: int) -> list[tuple[int, dict[str, float]]]:
    """Seconds of p -= lr * g at each size: one pass (model-sized scratch) or blocked."""
    rows = []
    for n in (parameter_count(SIZES), 1_000_000, 10_000_000):
        rng = np.random.default_rng(0)
        p, g = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
        result = {}
        for name, block in [("one pass", n)] + [(f"2^{k}", 1 << k) for k in (17, 18, 19, 20)]:
            scratch = np.empty(min(block, n), np.float32)
            result[name] = best_seconds(functools.partial(subtract_scaled, p, g, scratch), repeats)
        rows.append((n, result))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50, help="best of, for NumPy timings")
    args = parser.parse_args()
    keep_message_buffers_mapped()  # as the server and the client do

    cpu = exchange_handlers(args.calls, args.rounds)
    print(f"server CPU per exchange, 269k float32, in process (median of {args.rounds} rounds)")
    for name, seconds in cpu.items():
        print(f"  {name:28s} {seconds * 1e6:7.1f} us")
    ratio = cpu["gradfleet PushAndPullUnary"] / cpu["minimal exchange"]
    print(f"  gradfleet / minimal          {ratio:7.2f}")

    print("\nfloat32 at 269k values, best of", args.repeats)
    print(f"  {'bytes off':>9} {'multiply us':>12} {'isfinite us':>12}")
    for shift, mul, fin in alignment(args.repeats):
        print(f"  {shift:9d} {mul * 1e6:12.1f} {fin * 1e6:12.1f}")

    print("\np -= lr * g (float32), ms, best of", max(5, args.repeats // 5))
    rows = subtract_blocks(max(5, args.repeats // 5))
    names = list(rows[0][1])
    print(f"  {'params':>11} " + " ".join(f"{n:>9}" for n in names))
    for n, result in rows:
        print(f"  {n:11,d} " + " ".join(f"{result[k] * 1e3:9.3f}" for k in names))


if __name__ == "__main__":
    main()
