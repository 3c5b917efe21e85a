"""Transport benchmark of the parameter server (issue 3, "Speed and memory").

For float32 models of 269k (784-256-256-10), 1M and 10M parameters it times, on
loopback, one round trip = push one gradient + pull the weights:

* gradfleet: a real `gradfleet server` subprocess, `ParameterServerClient`
  (sync job, one worker, so every push closes a step: the time includes the server's
  optimiser step). The round trip is `push_and_pull`, a worker's exchange of one step:
  one call when gradient and weights each fit one message, else a push stream then a
  pull stream. Push alone and pull alone are timed separately as well;
* raw TCP: the same bytes to an echo subprocess (the ceiling);
* Ray: `ray.put` of the array to an actor that returns an array of the same size
  (object store, same node), when Ray is installed and `--no-ray` is not given.

Then the server-side CPU of one sync step with 8 workers at 10M parameters, and the
server's peak RSS while 8 workers push a 10M-parameter gradient at once.

    python benchmarks/bench_transport.py [--repeats 5] [--no-ray] [--sizes 269k,1M,10M]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from gradfleet.nn.mlp import parameter_count

MODELS = {
    "269k": [784, 256, 256, 10],
    "1M": [784, 1024, 192, 10],
    "10M": [1000, 4000, 1500, 10],
}
OPTIMIZER = {"name": "sgd", "lr": 1e-6}


def best_of(repeats: int, fn: Callable[[], None]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ---- raw TCP ----------------------------------------------------------------------
ECHO = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = None
while True:
    head = conn.recv(8, socket.MSG_WAITALL)
    if len(head) < 8:
        break
    n = int.from_bytes(head, "little")
    if buf is None or len(buf) != n:
        buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        got += conn.recv_into(view[got:], n - got)
    conn.sendall(buf)
"""


@contextlib.contextmanager
def tcp_echo(nbytes: int) -> Iterator[Callable[[], None]]:
    """One round trip of `nbytes` each way to an echo subprocess over loopback TCP."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out = np.ones(nbytes // 4, dtype=np.float32)
            back = bytearray(nbytes)

            def round_trip() -> None:
                sock.sendall(nbytes.to_bytes(8, "little"))
                sock.sendall(memoryview(out).cast("B"))
                view, got = memoryview(back), 0
                while got < nbytes:
                    got += sock.recv_into(view[got:], nbytes - got)

            yield round_trip
    finally:
        proc.wait(timeout=10)


def bench_tcp(nbytes: int, repeats: int) -> float:
    with tcp_echo(nbytes) as round_trip:
        return best_of(repeats, round_trip)


# ---- gradfleet server -------------------------------------------------------------
ADDRESS = re.compile(r"parameter server on (\S+:\d+)")


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    code = "import sys; from gradfleet.server import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--max-message-bytes", str(64 << 20), *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        match = ADDRESS.search(line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
            return proc, match.group(1)
    raise RuntimeError("the server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_gradfleet(address: str, sizes: list[int], repeats: int) -> dict[str, float]:
    from gradfleet.worker.ps_client import ParameterServerClient

    spec = {"type": "MLP", "sizes": sizes, "activation": "relu", "dtype": "float32", "seed": 0}
    with ParameterServerClient(address, timeout=600) as ps:
        job = ps.create_job(spec, OPTIMIZER, num_workers=1, total_steps=10**9)
        version, weights = ps.pull_weights(job)
        grad = np.zeros_like(weights)
        state = {"version": version}

        def push() -> None:
            ps.push_gradient(job, 0, state["version"], 1, 0.0, grad)
            state["version"] += 1

        def pull() -> None:
            ps.pull_weights(job, state["version"], out=weights)

        def round_trip() -> None:  # a worker's exchange of one step
            ps.push_and_pull(job, 0, state["version"], 1, 0.0, grad, out=weights)
            state["version"] += 1

        result = {
            "round_trip": best_of(repeats, round_trip),
            "push": best_of(repeats, push),
            "pull": best_of(repeats, pull),
        }
        ps.delete_job(job)
    return result


# ---- Ray --------------------------------------------------------------------------
def bench_ray(nbytes: int, repeats: int) -> float | None:
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Echo:
        def __init__(self) -> None:
            self.buf: np.ndarray | None = None

        def swap(self, array: np.ndarray) -> np.ndarray:
            if self.buf is None or self.buf.shape != array.shape:
                self.buf = np.array(array)  # the actor's own copy, like a server's buffer
            else:
                self.buf[...] = array
            return self.buf

    actor = Echo.remote()
    data = np.ones(nbytes // 4, dtype=np.float32)
    out = np.empty_like(data)

    def round_trip() -> None:
        out[...] = ray.get(actor.swap.remote(ray.put(data)))

    seconds = best_of(repeats, round_trip)
    ray.kill(actor)
    return seconds


# ---- server-side aggregation and memory -------------------------------------------
def bench_aggregation(
    workers: int = 8, params: int = 10_000_000, steps: int = 7
) -> list[tuple[float, float]]:
    """(CPU, wall) seconds to accumulate `workers` gradients and close one sync step, for
    each of `steps` steps after the first (which also allocates the sum buffer)."""
    from gradfleet.proto.v1 import parameter_server_pb2 as pb
    from gradfleet.proto.wire import FlatLayout
    from gradfleet.server.jobs import Job
    from gradfleet.server.metrics import ServerMetrics

    weights = np.zeros(params, dtype=np.float32)
    layout = FlatLayout.from_arrays({"w": weights})
    spec = pb.JobSpec(
        model_spec_json="{}",
        optimizer_json='{"name": "sgd", "lr": 0.1}',
        mode=pb.MODE_SYNC,
        num_workers=workers,
        total_steps=steps + 1,
    )
    job = Job("bench", spec, layout, weights, metrics=ServerMetrics())
    grads = [np.full(params, w + 1, dtype=np.float32) for w in range(workers)]
    results = []
    for step in range(steps + 1):
        cpu = time.process_time()
        wall = time.perf_counter()
        for w in range(workers):
            header = pb.PushHeader(job_id="bench", worker=w, step=step, rows=1, loss=0.0)
            job.commit(header, grads[w])
        results.append((time.process_time() - cpu, time.perf_counter() - wall))
    return results[1:]


def bench_memory(address: str, pid: int, workers: int = 8) -> dict[str, float]:
    from gradfleet.worker.ps_client import ParameterServerClient

    sizes = MODELS["10M"]
    spec = {"type": "MLP", "sizes": sizes, "activation": "relu", "dtype": "float32", "seed": 0}
    baseline = peak_rss_mb(pid)
    with ParameterServerClient(address, timeout=600) as ps:
        job = ps.create_job(spec, OPTIMIZER, num_workers=workers, total_steps=10)
        _, weights = ps.pull_weights(job)
        after_create = peak_rss_mb(pid)
        grad = np.zeros_like(weights)
        barrier = threading.Barrier(workers)

        def push(w: int) -> None:
            with ParameterServerClient(address, timeout=600) as own:
                barrier.wait()
                own.push_gradient(job, w, 0, 1, 0.0, grad)

        threads = [threading.Thread(target=push, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ps.pull_weights(job, 1, out=weights)
        peak = peak_rss_mb(pid)
        ps.delete_job(job)
    return {"baseline": baseline, "after_create": after_create, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="269k,1M,10M")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    names = args.sizes.split(",")

    proc, address = start_server()
    rows = []
    try:
        for name in names:
            sizes = MODELS[name]
            params = parameter_count(sizes)
            nbytes = params * 4
            tcp = bench_tcp(nbytes, args.repeats)
            grpc_times = bench_gradfleet(address, sizes, args.repeats)
            ray_time = None if args.no_ray else bench_ray(nbytes, args.repeats)
            rows.append((name, params, nbytes, tcp, grpc_times, ray_time))
    finally:
        stop_server(proc)

    def gbps(nbytes: int, seconds: float) -> float:
        return 2 * nbytes / seconds / 1e9

    print(f"loopback, one round trip = push + pull, best of {args.repeats}; GB/s counts both ways")
    header = (
        f"{'model':>6} {'params':>11} {'MB':>7} | {'raw TCP':>16} | {'gradfleet':>16} "
        f"{'x TCP':>6} {'push ms':>8} {'pull ms':>8} | {'Ray':>16} {'x TCP':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, params, nbytes, tcp, g, ray_time in rows:
        ray_cell = (
            f"{ray_time * 1e3:7.2f} ms {gbps(nbytes, ray_time):4.2f}GB/s {tcp / ray_time:6.2f}"
            if ray_time
            else f"{'n/a':>16} {'':>6}"
        )
        print(
            f"{name:>6} {params:>11,} {nbytes / 1e6:7.2f} | "
            f"{tcp * 1e3:7.2f} ms {gbps(nbytes, tcp):4.2f}GB/s | "
            f"{g['round_trip'] * 1e3:7.2f} ms {gbps(nbytes, g['round_trip']):4.2f}GB/s "
            f"{tcp / g['round_trip']:6.2f} {g['push'] * 1e3:8.2f} {g['pull'] * 1e3:8.2f} | "
            f"{ray_cell}"
        )

    steps = bench_aggregation()
    cpu = sorted(c for c, _ in steps)
    print(
        f"\nserver aggregation, sync step, 8 workers x 10M float32 params (7 float32 adds "
        f"into the sum + the mean + an SGD step): best {cpu[0] * 1e3:.1f} ms CPU, median "
        f"{cpu[len(cpu) // 2] * 1e3:.1f} ms over {len(cpu)} steps "
        f"(wall: best {min(w for _, w in steps) * 1e3:.1f} ms)"
    )
    weights_mb = parameter_count(MODELS["10M"]) * 4 / 1e6
    for budget in (None, 50_000_000):
        extra = () if budget is None else ("--receive-budget-bytes", str(budget))
        proc, address = start_server(*extra)
        try:
            mem = bench_memory(address, proc.pid)
        finally:
            stop_server(proc)
        label = (
            "default receive budget" if budget is None else f"receive budget {budget / 1e6:.0f} MB"
        )
        print(
            f"server peak RSS, 10M-param job, 8 workers pushing at once, {label}: "
            f"{mem['peak']:.0f} MB (idle server {mem['baseline']:.0f} MB, after create "
            f"{mem['after_create']:.0f} MB; budget = weights {weights_mb:.0f} + sum "
            f"{weights_mb:.0f} + 8 chunks of 1 MiB + 100 = {2 * weights_mb + 8.4 + 100:.0f} MB)"
        )
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
