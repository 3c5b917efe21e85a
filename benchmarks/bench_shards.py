"""A job spread over S parameter servers: loopback round trips and a simulated cluster.

* ``--loopback``: one client's push + pull of a 10M-parameter float32 model (40 MB each
  way) through S = 1, 2, 4 `gradfleet server` processes on this machine, against raw TCP
  moving the same bytes; rounds of interleaved blocks, best and median x TCP.
* ``--netsim``: W = 4 workers and S = 1, 2, 4 server nodes, each a network namespace
  whose link is shaped to ``--rate`` each way (benchmarks/netsim.py). Workers are plain
  processes running the client's ``push_and_pull`` loop with a fixed gradient (no
  compute: this measures the exchange), sync mode; steps/s over the steps after a
  warm-up, for a 1M- and a 10M-parameter model. One CPU-seconds column says what the
  processes of a step cost this 2-core machine.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_shards.py --loopback
    sudo .venv/bin/python benchmarks/bench_shards.py --netsim --rate 1gbit   (root: namespaces)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_transport
import netsim

from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.sharded import ShardedClient
from gradfleet.proto.wire import FlatLayout

MODELS = {"1M": [1000, 1000], "10M": [1000, 4000, 1500, 10]}
SGD = {"name": "sgd", "lr": 1e-9}
PORT = 50051


def spec_and_layout(name: str) -> tuple[dict, FlatLayout]:
    spec = {"type": "MLP", "sizes": MODELS[name], "dtype": "float32", "seed": 0}
    model = MLP.from_spec(spec)
    return spec, FlatLayout.from_arrays(model.unflatten(model.flat))


def create(addresses: list[str], name: str, workers: int, steps: int, job_id: str) -> None:
    """The job on these servers (a sharded one over several)."""
    spec, layout = spec_and_layout(name)
    clients = [ParameterServerClient(a, timeout=600) for a in addresses]
    settings = {"num_workers": workers, "total_steps": steps, "job_id": job_id}
    if len(clients) == 1:
        with clients[0] as ps:
            ps.create_job(spec, SGD, **settings)
    else:
        with ShardedClient(clients) as ps:
            ps.create_job(spec, SGD, layout=layout, **settings)


def connect(addresses: list[str]) -> ParameterServerClient | ShardedClient:
    clients = [ParameterServerClient(a, timeout=600) for a in addresses]
    return clients[0] if len(clients) == 1 else ShardedClient(clients)


# ---- loopback ----------------------------------------------------------------------


@contextlib.contextmanager
def round_trip(shards: int) -> Iterator[Callable[[], None]]:
    """One push + pull of the 10M model through `shards` server processes."""
    procs = [bench_transport.start_server() for _ in range(shards)]
    try:
        addresses = [address for _, address in procs]
        create(addresses, "10M", 1, 10**9, "bench")
        with connect(addresses) as ps:
            version, weights = ps.pull_weights("bench")
            grad = np.zeros_like(weights)

            def once() -> None:
                nonlocal version
                version, _ = ps.push_and_pull("bench", 0, version, 1, 0.0, grad, out=weights)

            yield once
    finally:
        for proc, _ in procs:
            bench_transport.stop_server(proc)


def loopback(rounds: int) -> None:
    nbytes = 4 * sum(a * b + b for a, b in zip(MODELS["10M"], MODELS["10M"][1:], strict=False))
    with contextlib.ExitStack() as stack:
        variants = {"raw TCP": stack.enter_context(bench_transport.tcp_echo(nbytes))}
        for shards in (1, 2, 4):
            variants[f"S = {shards}"] = stack.enter_context(round_trip(shards))
        times = bench_transport.interleaved(variants, rounds, 2)
    tcp_best, tcp_median = float(np.min(times["raw TCP"])), float(np.median(times["raw TCP"]))
    print(f"10M float32 ({nbytes / 1e6:.0f} MB each way), push + pull, {rounds} rounds")
    print(f"  {'variant':8} {'best ms':>8} {'x TCP':>6} {'median ms':>10} {'x TCP':>6}")
    for name, t in times.items():
        best, median = float(np.min(t)), float(np.median(t))
        print(
            f"  {name:8} {best * 1e3:8.1f} {tcp_best / best:6.2f} "
            f"{median * 1e3:10.1f} {tcp_median / median:6.2f}"
        )


# ---- simulated cluster -------------------------------------------------------------

_WORKER = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from bench_shards import connect
addresses = sys.argv[2].split(",")
worker, steps, warmup = (int(a) for a in sys.argv[3:6])
with connect(addresses) as ps:
    version, weights = ps.pull_weights("bench")
    grad = np.zeros_like(weights)
    for step in range(steps):
        if step == warmup:
            started, cpu = time.perf_counter(), time.process_time()
        version, _ = ps.push_and_pull("bench", worker, version, 1, 0.0, grad, out=weights)
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "cpu": time.process_time() - cpu}), flush=True)
"""
_SERVER = "import sys; from gradfleet.server import main; sys.exit(main(sys.argv[1:]))"
_CREATE = """
import sys
sys.path.insert(0, sys.argv[1])
from bench_shards import create
create(sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), "bench")
"""


def cluster_run(model: str, shards: int, workers: int, rate: str, steps: int, warmup: int) -> dict:
    """Steps/s of `workers` workers against `shards` server nodes on `rate` links."""
    here = str(Path(__file__).parent)
    with netsim.cluster(shards + workers, rate) as net:
        servers = []
        for s in range(shards):
            command = [sys.executable, "-c", _SERVER, "--host", net.address(s), "--port", str(PORT)]
            command += ["--max-message-bytes", str(64 << 20), "-q"]
            servers.append(net.popen(s, command, stderr=subprocess.DEVNULL))
        try:
            addresses = [f"{net.address(s)}:{PORT}" for s in range(shards)]
            for client_node in range(shards, shards + 1):  # created from a worker node
                _wait_for(net, client_node, addresses)
                net.popen(client_node, [sys.executable, "-c", _CREATE, here, ",".join(addresses),
                          model, str(workers), str(steps)]).wait(timeout=300)  # fmt: skip
            procs = [
                net.popen(shards + w, [sys.executable, "-c", _WORKER, here, ",".join(addresses),
                          str(w), str(steps), str(warmup)], stdout=subprocess.PIPE, text=True)
                for w in range(workers)
            ]  # fmt: skip
            results = [json.loads(p.communicate(timeout=3600)[0]) for p in procs]
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=60)
    seconds = max(r["seconds"] for r in results)
    return {
        "steps/s": (steps - warmup) / seconds,
        "worker cpu/step": sum(r["cpu"] for r in results) / (steps - warmup),
    }


def _wait_for(net: netsim.Network, node: int, addresses: list[str]) -> None:
    probe = (
        "import sys, grpc\nfor a in sys.argv[1].split(','):\n"
        "    grpc.channel_ready_future(grpc.insecure_channel(a)).result(timeout=60)"
    )
    net.popen(node, [sys.executable, "-c", probe, ",".join(addresses)]).wait(timeout=90)


def simulated(rate: str, rounds: int) -> None:
    workers = 4
    steps = {"1M": (30, 5), "10M": (8, 2)}
    print(f"simulated cluster: {workers} workers, S server nodes, {rate} per node link, "
          f"sync, no compute; median of {rounds} rounds")  # fmt: skip
    print(f"  {'model':5} {'S':>2} {'steps/s':>8} {'x S=1':>6} {'worker CPU s/step':>18}")
    for model in ("1M", "10M"):
        results: dict[int, list[dict]] = {1: [], 2: [], 4: []}
        for _ in range(rounds):
            for shards in results:
                results[shards].append(cluster_run(model, shards, workers, rate, *steps[model]))
        base = statistics.median(r["steps/s"] for r in results[1])
        for shards, runs in results.items():
            rate_ = statistics.median(r["steps/s"] for r in runs)
            cpu = statistics.median(r["worker cpu/step"] for r in runs)
            print(f"  {model:5} {shards:2d} {rate_:8.2f} {rate_ / base:6.2f} {cpu:18.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loopback", action="store_true")
    parser.add_argument("--netsim", action="store_true")
    parser.add_argument("--rate", default="1gbit", help="per-node link rate (tc syntax)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.loopback:
        loopback(max(args.rounds, 5))
    if args.netsim:
        simulated(args.rate, args.rounds)


if __name__ == "__main__":
    main()
