"""How close gradfleet comes to the fastest parameter server grpcio allows (issues 3, 4).

The transport targets compare gradfleet with raw TCP and with PyTorch DDP. This script
measures what a *minimal* grpcio parameter server reaches on the same machine, in the
same run, so that the gap to the targets splits into "ours" and "grpcio's":

* round trip, 269k float32 parameters (784-256-256-10), one worker, interleaved in
  blocks of calls as in bench_transport.py: raw TCP echo (the ceiling); a bare grpcio
  echo of the same bytes; the minimal server (one unary call: finiteness check, SGD
  step, weights back); gradfleet's ``push_and_pull`` against a real ``gradfleet
  server``. Then the CPU time a bare grpcio echo of those bytes costs the client and
  the server process per call;
* a sync step with 2 Ray workers on MNIST, 64 rows each (issue 4's set-up), rounds
  interleaved: the minimal server with no compute (the exchange alone), the minimal
  server with the real forward/backward pass, and gradfleet's ``GradientWorker`` actors
  against gradfleet's server. Both servers run in this process, as ``train()`` runs it,
  so this process's CPU time per step is the server's (Ray's driver threads add about
  4 microseconds per millisecond while it waits).

The minimal server is a correct sync parameter server and nothing more: no job, no
layout or header, no chunking, no limits, no checkpoints, no metrics, no idempotence.

    python benchmarks/bench_grpc_floor.py [--calls 500] [--steps 600] [--rounds 3] [--no-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_transport

from gradfleet.nn.mlp import parameter_count

SIZES = [784, 256, 256, 10]
LR = 0.1
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class MinimalServer:
    """Sync SGD over one unary method: a gradient in, the next version's weights out."""

    def __init__(self, weights: np.ndarray, workers: int, lr: float) -> None:
        self.weights, self.workers, self.lr = weights, workers, lr
        self.sum = np.zeros_like(weights)
        self.scratch = np.empty_like(weights)
        self.count, self.version = 0, 0
        self.reply = weights.tobytes()
        self.cond = threading.Condition()

    def exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        grad = np.frombuffer(request, dtype=self.weights.dtype)
        if grad.size != self.weights.size or not np.isfinite(grad).all():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad gradient")
        with self.cond:
            version = self.version
            self.sum += grad
            self.count += 1
            if self.count == self.workers:
                np.multiply(self.sum, self.lr / self.workers, out=self.scratch)
                self.weights -= self.scratch
                self.sum[:] = 0
                self.count, self.version = 0, version + 1
                self.reply = self.weights.tobytes()
                self.cond.notify_all()
            else:
                self.cond.wait_for(lambda: self.version > version)
            return self.reply

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def start(self) -> tuple[grpc.Server, int]:
        handler = grpc.method_handlers_generic_handler(
            "floor.Minimal",
            {
                "Exchange": grpc.unary_unary_rpc_method_handler(self.exchange),
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            },
        )
        server = grpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, port


def minimal_stub(port: int, method: str) -> Callable[[bytes], bytes]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    return channel.unary_unary(f"/floor.Minimal/{method}")  # type: ignore[no-any-return]


def serve_minimal_subprocess(workers: int = 1) -> None:
    """`--serve-minimal`: a minimal server for `workers` in its own process; prints its port."""
    minimal = MinimalServer(np.zeros(parameter_count(SIZES), np.float32), workers, 1e-6)
    server, port = minimal.start()
    print(port, flush=True)
    server.wait_for_termination()


def round_trips(calls: int) -> dict[str, np.ndarray]:
    """Seconds per round trip of each transport, interleaved in blocks of calls (a call
    by call rotation would time every server after it sat idle for three others)."""
    from gradfleet.proto.client import ParameterServerClient

    params = parameter_count(SIZES)
    nbytes = params * 4
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        tcp = stack.enter_context(bench_transport.tcp_echo(nbytes))
        stack.callback(_stop_all, procs)
        minimal = subprocess.Popen(
            [sys.executable, __file__, "--serve-minimal"], stdout=subprocess.PIPE, text=True
        )
        procs.append(minimal)
        gradfleet, address = bench_transport.start_server()
        procs.append(gradfleet)
        assert minimal.stdout is not None
        port = int(minimal.stdout.readline())
        echo, exchange = minimal_stub(port, "Echo"), minimal_stub(port, "Exchange")
        grad = np.zeros(params, np.float32)
        weights = np.empty_like(grad)

        def minimal_sgd() -> None:
            np.copyto(weights, np.frombuffer(exchange(grad.tobytes()), np.float32))

        spec = {"type": "MLP", "sizes": SIZES, "activation": "relu", "dtype": "float32", "seed": 0}
        with ParameterServerClient(address, timeout=600) as ps:
            job = ps.create_job(spec, {"name": "sgd", "lr": 1e-6}, num_workers=1, total_steps=10**9)
            version = ps.pull_weights(job, out=weights)[0]

            def ours() -> None:
                nonlocal version
                version = ps.push_and_pull(job, 0, version, 1, 0.0, grad, out=weights)[0]

            variants = {
                "raw TCP echo": tcp,
                "bare grpcio echo": lambda: echo(grad.tobytes()),
                "minimal grpcio server": minimal_sgd,
                "gradfleet push_and_pull": ours,
            }
            block = bench_transport.BLOCK["269k"]
            return bench_transport.interleaved(variants, max(1, calls // block), block)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def echo_cpu(calls: int) -> dict[str, float]:
    """CPU seconds per bare grpcio echo of the 269k model's bytes: this (client) process
    and the server's, over ``calls`` calls with nothing else running here."""
    nbytes = parameter_count(SIZES) * 4
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-minimal"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        echo = minimal_stub(int(server.stdout.readline()), "Echo")
        payload = bytes(nbytes)
        for _ in range(20):
            echo(payload)
        wall, client, served = time.perf_counter(), time.process_time(), process_cpu(server.pid)
        for _ in range(calls):
            echo(payload)
        return {
            "wall": (time.perf_counter() - wall) / calls,
            "client": (time.process_time() - client) / calls,
            "server": (process_cpu(server.pid) - served) / calls,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_round_trips(times: dict[str, np.ndarray]) -> None:
    tcp = times["raw TCP echo"]
    print(f"\n269k float32 parameters, one round trip (1.08 MB each way), {len(tcp)} calls each")
    columns = ("min ms", "p10 ms", "median", "xTCP min", "xTCP med")
    header = f"{'transport':<26}" + "".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, t in times.items():
        print(
            f"{name:<26}{t.min() * 1e3:9.2f}{np.percentile(t, 10) * 1e3:9.2f}"
            f"{np.median(t) * 1e3:9.2f}{tcp.min() / t.min():9.2f}"
            f"{np.median(tcp) / np.median(t):9.2f}"
        )


class BareWorker:
    """A Ray worker of the minimal server: gradfleet's model, batches and compute."""

    def __init__(self, port: int, x: Any, y: Any, worker: int, rows: int, compute: bool) -> None:
        from threadpoolctl import threadpool_limits

        from gradfleet.nn import MLP
        from gradfleet.worker.batches import BatchPlan

        self._blas = threadpool_limits(1)
        self.model = MLP(SIZES, seed=0, dtype="float32")
        self.grad = np.zeros_like(self.model.flat)
        self.x, self.y, self.compute = x, y, compute
        self.plan = BatchPlan(0, worker, len(x), rows)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        self.exchange = self.channel.unary_unary("/floor.Minimal/Exchange")

    def run(self, steps: int) -> dict[str, float]:
        timings = {"compute": 0.0, "exchange": 0.0, "steps": steps}
        for step in range(steps):
            started = time.perf_counter()
            if self.compute:
                rows = self.plan.indices(step)
                self.model.loss_and_grads(
                    self.x[rows], self.y[rows], "cross_entropy", out=self.grad
                )
            computed = time.perf_counter()
            reply = self.exchange(self.grad.tobytes())
            np.copyto(self.model.flat, np.frombuffer(reply, np.float32))
            timings["compute"] += computed - started
            timings["exchange"] += time.perf_counter() - computed
        self.channel.close()
        return timings


def ray_steps(steps: int, rounds: int, rows: int) -> dict[str, list[dict[str, float]]]:
    """Per variant and round: samples/s and ms per step (compute, exchange) of 2 workers.

    With PyTorch installed, each round also runs issue 4's DDP and Ray-PS baselines
    (``torch_baselines``) for about as many steps, so the ratios come from one run.
    """
    from bench_e2e import Run, find_mnist

    from gradfleet.client.data import load_mnist

    data = load_mnist(find_mnist())
    try:
        import torch_baselines
    except ImportError:
        torch_baselines = None
    epochs = max(1, round(steps / (len(data.x) // 2 // rows)))
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(rounds):
        for name, result in grpc_variants(data, steps, rows).items():
            results.setdefault(name, []).append(result)
        if torch_baselines is not None:
            for name, run in (
                ("PyTorch DDP (gloo, 2 processes)", torch_baselines.ddp),
                ("Ray PS pattern, PyTorch workers", torch_baselines.ray_parameter_server),
            ):
                samples_per_s = run(data, rows, epochs, LR, Run).samples_per_s
                results.setdefault(name, []).append({"samples/s": samples_per_s})
    return results


def grpc_variants(data: Any, steps: int, rows: int) -> dict[str, dict[str, float]]:
    """One round of the three gRPC variants on one local Ray instance."""
    import ray

    from gradfleet.nn import MLP
    from gradfleet.proto.client import ParameterServerClient
    from gradfleet.server import serve
    from gradfleet.worker.actor import GradientWorker, WorkerSpec
    from gradfleet.worker.batches import shard_rows
    from gradfleet.worker.ray_runner import init_ray

    init_ray(num_cpus=2, include_dashboard=False)
    try:
        shards = []
        for worker in range(2):
            start, stop = shard_rows(len(data.x), worker, 2)
            shards.append((ray.put(data.x[start:stop]), ray.put(data.y[start:stop])))
        spec = MLP(SIZES, seed=0, dtype="float32").spec()
        bare_actor = ray.remote(BareWorker).options(num_cpus=1, scheduling_strategy="SPREAD")
        ours_actor = ray.remote(GradientWorker).options(num_cpus=1, scheduling_strategy="SPREAD")

        def timed(actors: list[Any], run: Callable[[Any], Any]) -> dict[str, float]:
            ray.get([actor.__ray_ready__.remote() for actor in actors])
            started, cpu_started = time.perf_counter(), time.process_time()
            timings = ray.get([run(actor) for actor in actors])
            wall = time.perf_counter() - started
            server_cpu = time.process_time() - cpu_started  # the server runs in this process
            for actor in actors:
                ray.kill(actor)
            count = sum(t["steps"] for t in timings)
            return {
                "samples/s": steps * 2 * rows / wall,
                "step ms": wall / steps * 1e3,
                "compute ms": sum(t["compute"] for t in timings) / count * 1e3,
                "exchange ms": sum(t["exchange"] for t in timings) / count * 1e3,
                "server CPU ms": server_cpu / steps * 1e3,
            }

        def minimal(compute: bool) -> dict[str, float]:
            server = MinimalServer(MLP(SIZES, seed=0, dtype="float32").flat.copy(), 2, LR)
            handle, port = server.start()
            try:
                actors = [
                    bare_actor.remote(port, x, y, w, rows, compute)
                    for w, (x, y) in enumerate(shards)
                ]
                return timed(actors, lambda actor: actor.run.remote(steps))
            finally:
                handle.stop(0)

        def gradfleet() -> dict[str, float]:
            with serve(host="127.0.0.1", port=0) as running:
                with ParameterServerClient(running.address) as client:
                    job = client.create_job(
                        spec, {"name": "sgd", "lr": LR}, num_workers=2, total_steps=steps
                    )
                actors = [
                    ours_actor.remote(
                        WorkerSpec(
                            running.address, job, w, 2, spec, "cross_entropy", rows, 0, steps
                        )
                    )
                    for w in range(2)
                ]
                shard = dict(zip(actors, shards, strict=True))
                return timed(actors, lambda actor: actor.run.remote(*shard[actor]))

        return {
            "minimal server, no compute": minimal(False),
            "minimal server + compute": minimal(True),
            "gradfleet (server + workers)": gradfleet(),
        }
    finally:
        ray.shutdown()


def print_ray_steps(results: dict[str, list[dict[str, float]]], rows: int) -> None:
    rounds = len(next(iter(results.values())))
    print(f"\n2 Ray workers, {rows} rows each per step, MNIST, median of {rounds} rounds")
    columns = ["samples/s", "step ms", "compute ms", "exchange ms", "server CPU ms"]
    header = f"{'variant':<30}" + "".join(f"{c:>14}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        cells = "".join(
            f"{statistics.median(r[c] for r in runs):14.2f}" if c in runs[0] else f"{'':>14}"
            for c in columns
        )
        print(f"{name:<30}{cells}")
    speed = {
        name: statistics.median(r["samples/s"] for r in runs) for name, runs in results.items()
    }
    for baseline in ("PyTorch DDP (gloo, 2 processes)", "Ray PS pattern, PyTorch workers"):
        if baseline in speed:
            ours = speed["gradfleet (server + workers)"] / speed[baseline]
            floor = speed["minimal server + compute"] / speed[baseline]
            print(f"x {baseline}: gradfleet {ours:.2f}, minimal server + compute {floor:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="round trips per transport")
    parser.add_argument("--steps", type=int, default=600, help="sync steps per Ray run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of Ray runs")
    parser.add_argument("--rows", type=int, default=64, help="rows per worker per step")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--serve-minimal", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        serve_minimal_subprocess()
        return
    print_round_trips(round_trips(args.calls))
    cpu = echo_cpu(args.calls)
    print(
        f"bare grpcio echo, CPU per call: client {cpu['client'] * 1e3:.2f} ms, server "
        f"{cpu['server'] * 1e3:.2f} ms (wall {cpu['wall'] * 1e3:.2f} ms per call)"
    )
    if not args.no_ray:
        print_ray_steps(ray_steps(args.steps, args.rounds, args.rows), args.rows)


if __name__ == "__main__":
    main()
