"""Server CPU per sync step with nothing else in the way (issue 13): no Ray, no model.

Two client processes only exchange a fixed gradient for the next weights, `--steps` sync
steps of the MNIST model (784-256-256-10, float32, 269k parameters), each after
`--compute-ms` of busy CPU that stands for a worker's forward and backward pass (on two
cores the clients then compete with the server, as Ray workers do). Variants, interleaved
in rounds that each start with the next variant: the minimal grpcio server of
``bench_grpc_floor.py`` (two workers), gradfleet's server from this tree, and from each
``--tree`` (an older checkout, run as ``bench_checkpoints.py`` runs one), each with
clients of its own tree.

Each server runs in a process of its own, whose CPU seconds come from /proc. With
`--in-process` both run in this process instead, one after the other, with the same
allocator settings (as in ``bench_grpc_floor.py``, whose servers share the Ray driver's
process); the table then splits the CPU by thread group (the handler pool, grpcio's
poller thread, gRPC core's event engine, the rest) and counts the context switches.

    python benchmarks/bench_server_cpu.py [--tree /path/to/old/checkout] [--rounds 3] \\
        [--steps 2000] [--compute-ms 0] [--in-process]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_checkpoints
import bench_grpc_floor

from gradfleet.nn.mlp import parameter_count
from gradfleet.proto.runtime import keep_message_buffers_mapped

WORKERS = 2
PARAMS = parameter_count(bench_grpc_floor.SIZES)
SPEC = {"type": "MLP", "sizes": bench_grpc_floor.SIZES, "dtype": "float32", "seed": 0}
MINIMAL = "minimal grpcio server"
HERE = bench_checkpoints.HERE


def busy(seconds: float) -> None:
    """Keep this process's CPU busy for `seconds`, as a worker's forward and backward pass."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def run_client(kind: str, address: str, job: str, worker: int, steps: int, compute: float) -> None:
    """`--client`: one worker's exchanges, each after `compute` seconds of CPU work."""
    grad = np.full(PARAMS, 1e-3, np.float32)
    if kind == "minimal":
        exchange = bench_grpc_floor.minimal_stub(int(address), "Exchange")
        payload = grad.tobytes()
        for _ in range(steps):
            busy(compute)
            exchange(payload)
        return
    try:  # a tree from before the client moved to gradfleet.proto
        from gradfleet.worker.ps_client import ParameterServerClient  # type: ignore
    except ImportError:
        from gradfleet.proto.client import ParameterServerClient

    weights = np.empty_like(grad)
    with ParameterServerClient(address, timeout=600) as ps:
        for step in range(steps):
            busy(compute)
            ps.push_and_pull(job, worker, step, 64, 0.5, grad, out=weights)


def measure(
    cpu_of: Callable[[], dict[str, float]],
    kind: str,
    address: str,
    job: str,
    steps: int,
    compute: float,
    tree: Path,
) -> dict[str, float]:
    """Wall time and what `cpu_of()` counts (the server's CPU seconds, ...) per step while
    two clients of `tree` exchange `steps` steps, each after `compute` seconds of CPU."""
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client",
                kind,
                address,
                job,
                str(w),
                str(steps),
                str(compute),
            ],
            env=bench_checkpoints.tree_env(tree),
        )
        for w in range(WORKERS)
    ]
    before, started = cpu_of(), time.perf_counter()
    for client in clients:
        if client.wait() != 0:
            raise RuntimeError(f"a client of the {kind} server failed")
    wall = time.perf_counter() - started
    after = cpu_of()
    return {"wall": wall / steps} | {k: (after[k] - before.get(k, 0.0)) / steps for k in after}


def process_cpu(pid: int) -> Callable[[], dict[str, float]]:
    return lambda: {"cpu": bench_checkpoints.process_cpu_seconds(pid)}


GROUPS = ("handlers", "grpc poller", "event engine", "other")


def thread_groups() -> dict[str, float]:
    """This process's CPU seconds per thread group (the servers' handler pools, grpcio's
    poller `_serve`, gRPC core's event engine, the rest), in all ("cpu"), and its threads'
    context switches ("switches")."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    totals = dict.fromkeys((*GROUPS, "cpu", "switches"), 0.0)
    for tid in os.listdir("/proc/self/task"):
        try:
            cpu = bench_checkpoints.process_cpu_seconds(f"self/task/{tid}")
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(tid), "")
        if name.startswith(("gradfleet-ps", "ThreadPoolExecutor")):
            group = "handlers"
        elif "_serve" in name:
            group = "grpc poller"
        elif not name and "event_engine" in Path(f"/proc/self/task/{tid}/comm").read_text():
            group = "event engine"
        else:
            group = "other"
        totals[group] += cpu
        totals["cpu"] += cpu
        totals["switches"] += sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
    return totals


def minimal_round(steps: int, compute: float) -> dict[str, float]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-minimal"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        return measure(
            process_cpu(server.pid), "minimal", port, "", steps, compute, bench_checkpoints.HERE
        )
    finally:
        server.terminate()
        server.wait(timeout=60)


def gradfleet_round(tree: Path, steps: int, compute: float) -> dict[str, float]:
    from gradfleet.proto.client import ParameterServerClient

    server, address = bench_checkpoints.start_server(tree)
    try:
        with ParameterServerClient(address, timeout=600) as ps:
            job = ps.create_job(
                SPEC, {"name": "sgd", "lr": 1e-6}, num_workers=WORKERS, total_steps=steps + 1
            )
        return measure(process_cpu(server.pid), "gradfleet", address, job, steps, compute, tree)
    finally:
        server.terminate()
        server.wait(timeout=60)


def minimal_here(steps: int, compute: float) -> dict[str, float]:
    minimal = bench_grpc_floor.MinimalServer(np.zeros(PARAMS, np.float32), WORKERS, 1e-6)
    server, port = minimal.start()
    try:
        return measure(thread_groups, "minimal", str(port), "", steps, compute, HERE)
    finally:
        server.stop(0)


def gradfleet_here(steps: int, compute: float) -> dict[str, float]:
    from gradfleet.proto.client import ParameterServerClient
    from gradfleet.server import serve

    with serve(host="127.0.0.1", port=0) as running:
        with ParameterServerClient(running.address, timeout=600) as ps:
            job = ps.create_job(
                SPEC, {"name": "sgd", "lr": 1e-6}, num_workers=WORKERS, total_steps=steps + 1
            )
        return measure(thread_groups, "gradfleet", running.address, job, steps, compute, HERE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="another source tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000, help="sync steps per run")
    parser.add_argument("--serve-minimal", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compute-ms", type=float, default=0.0, help="CPU work per client per step"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the servers in this process and split their CPU by thread group",
    )
    parser.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        bench_grpc_floor.serve_minimal_subprocess(WORKERS)
        return
    if args.client:
        kind, address, job, worker, steps, compute = args.client
        run_client(kind, address, job, int(worker), int(steps), float(compute))
        return

    if args.in_process and args.tree:
        parser.error("--tree runs servers in processes of their own; drop --in-process")
    compute = args.compute_ms / 1e3
    variants: list[tuple[str, Callable[[], dict]]] = []
    if args.in_process:
        keep_message_buffers_mapped()  # for both servers alike, as in bench_grpc_floor.py
        variants.append((MINIMAL, lambda: minimal_here(args.steps, compute)))
        variants.append(("gradfleet, this tree", lambda: gradfleet_here(args.steps, compute)))
    else:
        variants.append((MINIMAL, lambda: minimal_round(args.steps, compute)))
        for i, tree in enumerate([HERE, *(args.tree or [])]):
            name = "gradfleet, this tree" if i == 0 else f"gradfleet, {tree}"
            variants.append((name, functools.partial(gradfleet_round, tree, args.steps, compute)))
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, run in bench_checkpoints.rotated(variants, round_):
            runs[name].append(run())
    print_table(runs, args)


def print_table(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    where = "in this process" if args.in_process else "in processes of their own"
    print(
        f"{WORKERS} clients, {args.compute_ms:g} ms of compute per step, 269k float32, "
        f"{args.rounds} x {args.steps} steps, servers {where}; median ms per step"
    )
    split = [*GROUPS, "switches"] if args.in_process else []
    header = f"  {'server':34s} {'CPU':>6} {'wall':>6} {'gap':>6}" + "".join(
        f" {c:>12}" for c in split
    )
    print(header)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    floor = median(MINIMAL, "cpu")
    for name in runs:
        cpu = median(name, "cpu")
        gap = "" if name == MINIMAL else f"{(cpu - floor) * 1e3:6.2f}"
        cells = "".join(
            f" {median(name, c):12.1f}" if c == "switches" else f" {median(name, c) * 1e3:12.2f}"
            for c in split
        )
        print(f"  {name:34s} {cpu * 1e3:6.2f} {median(name, 'wall') * 1e3:6.2f} {gap:>6}{cells}")


if __name__ == "__main__":
    main()
