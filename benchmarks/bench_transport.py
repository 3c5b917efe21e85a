"""Transport benchmark of the parameter server (issue 3, "Speed and memory").

For float32 models of 269k (784-256-256-10), 1M and 10M parameters it times, on
loopback, one round trip = push one gradient + pull the weights:

* gradfleet: a real `gradfleet server` subprocess, `ParameterServerClient`
  (sync job, one worker, so every push closes a step: the time includes the server's
  optimiser step). The round trip is `push_and_pull`, a worker's exchange of one step:
  one call when gradient and weights each fit one message, else a push stream then a
  pull stream. Push alone and pull alone are timed as well;
* raw TCP: the same bytes to an echo subprocess (the ceiling);
* Ray: `ray.put` of the array to an actor that returns an array of the same size
  (object store, same node), when Ray is installed and `--no-ray` is not given.

The variants run interleaved, a block of consecutive calls each in turn for `--rounds`
rounds, so drifting machine load hits all alike and each variant runs warm, as a
worker's exchanges do. It reports the best and the median call, and ratios to raw TCP
of both. Then the server-side CPU of one sync step with 8 workers at 10M parameters,
and the server's peak RSS while 8 workers push a 10M-parameter gradient at once.

    python benchmarks/bench_transport.py [--rounds 10] [--no-ray] [--sizes 269k,1M,10M]
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
from gradfleet.server import ServerConfig

MODELS = {
    "269k": [784, 256, 256, 10],
    "1M": [784, 1024, 192, 10],
    "10M": [1000, 4000, 1500, 10],
}
OPTIMIZER = {"name": "sgd", "lr": 1e-6}


# calls per variant in a row: enough to run warm, few enough to interleave finely
BLOCK = {"269k": 20, "1M": 10, "10M": 2}


def interleaved(
    variants: dict[str, Callable[[], None]], rounds: int, block: int
) -> dict[str, np.ndarray]:
    """Seconds of each call of each variant: `block` calls of one variant, then the
    next, for `rounds` rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):
        for name, fn in variants.items():
            for _ in range(block):
                start = time.perf_counter()
                fn()
                if round_:
                    times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


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


@contextlib.contextmanager
def gradfleet_calls(address: str, sizes: list[int]) -> Iterator[dict[str, Callable[[], None]]]:
    """Round trip, push alone and pull alone of a one-worker sync job on the server."""
    from gradfleet.proto.client import ParameterServerClient

    spec = {"type": "MLP", "sizes": sizes, "activation": "relu", "dtype": "float32", "seed": 0}
    with ParameterServerClient(address, timeout=600) as ps:
        job = ps.create_job(spec, OPTIMIZER, num_workers=1, total_steps=10**9)
        version, weights = ps.pull_weights(job)
        grad = np.zeros_like(weights)
        state = {"version": version}

        def round_trip() -> None:  # a worker's exchange of one step
            ps.push_and_pull(job, 0, state["version"], 1, 0.0, grad, out=weights)
            state["version"] += 1

        def push() -> None:
            ps.push_gradient(job, 0, state["version"], 1, 0.0, grad)
            state["version"] += 1

        def pull() -> None:
            ps.pull_weights(job, state["version"], out=weights)

        yield {"gradfleet": round_trip, "push": push, "pull": pull}
        ps.delete_job(job)


def start_ray() -> bool:
    """Start a local Ray (once); False when Ray is not installed."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return True


@contextlib.contextmanager
def ray_round_trip(nbytes: int) -> Iterator[Callable[[], None] | None]:
    """`ray.put` to an actor that returns an array of the same size; None without Ray."""
    if not start_ray():
        yield None
        return
    import ray

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

    try:
        yield round_trip
    finally:
        ray.kill(actor)


def round_trips(address: str, name: str, rounds: int, with_ray: bool) -> dict[str, np.ndarray]:
    """Per-call seconds of every transport for one model, interleaved."""
    nbytes = parameter_count(MODELS[name]) * 4
    with contextlib.ExitStack() as stack:
        variants = {"raw TCP": stack.enter_context(tcp_echo(nbytes))}
        variants |= stack.enter_context(gradfleet_calls(address, MODELS[name]))
        ray_call = stack.enter_context(ray_round_trip(nbytes)) if with_ray else None
        if ray_call is not None:
            variants["Ray"] = ray_call
        return interleaved(variants, rounds, BLOCK[name])


# ---- server-side aggregation and memory -------------------------------------------
def bench_aggregation(
    workers: int = 8, params: int = 10_000_000, steps: int = 7
) -> list[tuple[float, float]]:
    """(CPU, wall) seconds to accumulate `workers` gradients and close one sync step, for
    each of `steps` steps after the first (which also allocates the sum buffer)."""
    from gradfleet.proto.wire import FlatLayout
    from gradfleet.server.domain import JobSnapshot, PushHeader
    from gradfleet.server.job import Job, JobResources
    from gradfleet.server.metrics import ServerMetrics
    from gradfleet.server.receive import Gradient
    from gradfleet.server.settings import JobSettings, JobSpec

    weights = np.zeros(params, dtype=np.float32)
    layout = FlatLayout.from_arrays({"w": weights})
    spec = JobSpec("{}", '{"name": "sgd", "lr": 0.1}', num_workers=workers, total_steps=steps + 1)
    snapshot = JobSnapshot.new("bench", JobSettings.validate(spec).spec, layout, weights)
    job = Job(snapshot, JobResources(ServerMetrics(), 1 << 20, 512 << 20, history_page=10_000))
    grads = [np.full(params, w + 1, dtype=np.float32) for w in range(workers)]
    results = []
    for step in range(steps + 1):
        cpu = time.process_time()
        wall = time.perf_counter()
        for w in range(workers):
            header = PushHeader("bench", w, step, 1, 0.0, layout.dtype, layout.nbytes, None)
            job.commit(header, Gradient(grads[w]))
        results.append((time.process_time() - cpu, time.perf_counter() - wall))
    return results[1:]


def bench_memory(address: str, pid: int, workers: int = 8) -> dict[str, float]:
    from gradfleet.proto.client import ParameterServerClient

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
    parser.add_argument("--rounds", type=int, default=10, help="rounds of interleaved blocks")
    parser.add_argument("--sizes", default="269k,1M,10M")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    if not args.no_ray and start_ray():
        time.sleep(5)  # Ray's own processes settle before anything is timed
    proc, address = start_server()
    try:
        results = {
            name: round_trips(address, name, args.rounds, not args.no_ray)
            for name in args.sizes.split(",")
        }
    finally:
        stop_server(proc)

    print(
        f"loopback, one round trip = push + pull; {args.rounds} rounds of interleaved blocks "
        f"({', '.join(f'{n}: {BLOCK[n]} calls' for n in results)}); GB/s counts both ways"
    )
    header = (
        f"{'model':>6} {'MB':>6} {'variant':>9} | {'best ms':>8} {'GB/s':>5} {'x TCP':>6} | "
        f"{'median ms':>9} {'GB/s':>5} {'x TCP':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, times in results.items():
        nbytes = parameter_count(MODELS[name]) * 4
        tcp_best, tcp_median = times["raw TCP"].min(), np.median(times["raw TCP"])
        for variant, t in times.items():
            best, median = t.min(), float(np.median(t))
            one_way = variant in ("push", "pull")  # moves the bytes once
            moved = nbytes * (1 if one_way else 2)
            ratio = "" if one_way else f"{tcp_best / best:6.2f}"
            ratio_median = "" if one_way else f"{tcp_median / median:6.2f}"
            print(
                f"{name:>6} {nbytes / 1e6:6.2f} {variant:>9} | {best * 1e3:8.2f} "
                f"{moved / best / 1e9:5.2f} {ratio:>6} | {median * 1e3:9.2f} "
                f"{moved / median / 1e9:5.2f} {ratio_median:>6}"
            )

    steps = bench_aggregation()
    cpu = sorted(c for c, _ in steps)
    print(
        f"\nserver aggregation, sync step, 8 workers x 10M float32 params (7 float32 adds "
        f"into the sum + the mean + an SGD step): best {cpu[0] * 1e3:.1f} ms CPU, median "
        f"{cpu[len(cpu) // 2] * 1e3:.1f} ms over {len(cpu)} steps "
        f"(wall: best {min(w for _, w in steps) * 1e3:.1f} ms)"
    )
    gradient_bytes = parameter_count(MODELS["10M"]) * 4
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
        held = min(8, max(1, (budget or ServerConfig().receive_budget_bytes) // gradient_bytes))
        print(
            f"server peak RSS, 10M-param job, 8 workers pushing at once, {label}: "
            f"{mem['peak']:.0f} MB (idle server {mem['baseline']:.0f} MB, after create "
            f"{mem['after_create']:.0f} MB, plus {held} x {gradient_bytes / 1e6:.0f} MB held "
            f"whole = {mem['after_create'] + held * gradient_bytes / 1e6:.0f} MB; the rest is "
            "messages in flight)"
        )
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
