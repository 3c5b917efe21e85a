"""Server CPU per sync step with nothing else in the way (issue 13): no compute, no Ray.

Each variant runs its server in a process of its own and two client processes that only
exchange a fixed gradient for the next weights, `--steps` sync steps of the MNIST model
(784-256-256-10, float32, 269k parameters); the server process's CPU seconds come from
/proc. Variants, interleaved in rounds that each start with the next variant: the
minimal grpcio server of ``bench_grpc_floor.py`` (two workers), gradfleet's server from
this tree, and from each ``--tree`` (an older checkout, run as ``bench_checkpoints.py``
runs one), each with clients of its own tree.

    python benchmarks/bench_server_cpu.py [--tree /path/to/old/checkout] [--rounds 3] \\
        [--steps 2000]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_checkpoints
import bench_grpc_floor

from gradfleet.nn.mlp import parameter_count

WORKERS = 2
PARAMS = parameter_count(bench_grpc_floor.SIZES)
SPEC = {"type": "MLP", "sizes": bench_grpc_floor.SIZES, "dtype": "float32", "seed": 0}
MINIMAL = "minimal grpcio server"


def run_client(kind: str, address: str, job: str, worker: int, steps: int) -> None:
    """`--client`: one worker's exchanges, back to back."""
    grad = np.full(PARAMS, 1e-3, np.float32)
    if kind == "minimal":
        exchange = bench_grpc_floor.minimal_stub(int(address), "Exchange")
        payload = grad.tobytes()
        for _ in range(steps):
            exchange(payload)
        return
    try:  # a tree from before the client moved to gradfleet.proto
        from gradfleet.worker.ps_client import ParameterServerClient  # type: ignore
    except ImportError:
        from gradfleet.proto.client import ParameterServerClient

    weights = np.empty_like(grad)
    with ParameterServerClient(address, timeout=600) as ps:
        for step in range(steps):
            ps.push_and_pull(job, worker, step, 64, 0.5, grad, out=weights)


def measure(
    server: subprocess.Popen, kind: str, address: str, job: str, steps: int, tree: Path
) -> dict:
    """Server CPU and wall time per step while two clients of `tree` exchange `steps`
    steps."""
    clients = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", kind, address, job, str(w), str(steps)],
            env=bench_checkpoints.tree_env(tree),
        )
        for w in range(WORKERS)
    ]
    cpu, started = bench_checkpoints.process_cpu_seconds(server.pid), time.perf_counter()
    for client in clients:
        if client.wait() != 0:
            raise RuntimeError(f"a client of the {kind} server failed")
    wall = time.perf_counter() - started
    cpu = bench_checkpoints.process_cpu_seconds(server.pid) - cpu
    return {"cpu": cpu / steps, "wall": wall / steps}


def minimal_round(steps: int) -> dict:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-minimal"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        return measure(server, "minimal", port, "", steps, bench_checkpoints.HERE)
    finally:
        server.terminate()
        server.wait(timeout=60)


def gradfleet_round(tree: Path, steps: int) -> dict:
    from gradfleet.proto.client import ParameterServerClient

    server, address = bench_checkpoints.start_server(tree)
    try:
        with ParameterServerClient(address, timeout=600) as ps:
            job = ps.create_job(
                SPEC, {"name": "sgd", "lr": 1e-6}, num_workers=WORKERS, total_steps=steps + 1
            )
        return measure(server, "gradfleet", address, job, steps, tree)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="another source tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000, help="sync steps per run")
    parser.add_argument("--serve-minimal", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        bench_grpc_floor.serve_minimal_subprocess(WORKERS)
        return
    if args.client:
        kind, address, job, worker, steps = args.client
        run_client(kind, address, job, int(worker), int(steps))
        return

    trees = [bench_checkpoints.HERE, *(args.tree or [])]
    names = {
        tree: "gradfleet, this tree" if i == 0 else f"gradfleet, {tree}"
        for i, tree in enumerate(trees)
    }
    variants: list[tuple[str, Callable[[], dict]]] = [(MINIMAL, lambda: minimal_round(args.steps))]
    for tree in trees:
        variants.append((names[tree], functools.partial(gradfleet_round, tree, args.steps)))
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_ in range(args.rounds):
        for name, run in bench_checkpoints.rotated(variants, round_):
            runs[name].append(run())

    print(f"{WORKERS} clients, no compute, 269k float32, {args.rounds} x {args.steps} steps")
    print(f"  {'server':50s} {'CPU ms/step':>12} {'wall ms/step':>13} {'gap ms':>8}")
    floor = statistics.median(r["cpu"] for r in runs[MINIMAL])
    for name, results in runs.items():
        cpu = statistics.median(r["cpu"] for r in results)
        wall = statistics.median(r["wall"] for r in results)
        gap = "" if name == MINIMAL else f"{(cpu - floor) * 1e3:8.2f}"
        print(f"  {name:50s} {cpu * 1e3:12.2f} {wall * 1e3:13.2f} {gap:>8}")


if __name__ == "__main__":
    main()
