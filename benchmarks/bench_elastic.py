"""How long a change of an elastic job's workers stalls it, and samples/s over time.

An elastic MNIST job (784-256-256-10, float32, 64 rows per worker, sync SGD; global batch
kept, so a step's rows are split over its members) starts with 1 worker and may have 2
(min_workers 1, max_workers 2) on a local Ray instance of 2 CPUs, so the trainer grows it
to 2 as soon as the second worker's actor is up; ``gradfleet scale`` (ScaleJob) then
asks for 1 and later for 2 again. For each change the stall is the interval of the step
where the change took effect minus the median step interval of the steps around it (from
the server's step records); samples/s is printed per time window.

    python benchmarks/bench_elastic.py
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from pathlib import Path

import ray

from gradfleet.client import Client, JobConfig, train
from gradfleet.client.data import load_mnist
from gradfleet.server import serve

MNIST = Path(__file__).resolve().parents[1] / "tests" / "data" / "mnist"


def scale_at(address: str, plan: list[tuple[float, int]], done: threading.Event) -> None:
    """Ask for each size `plan` names once the job's version reaches the given share."""
    with Client(address) as client:
        while not client.list_jobs():
            time.sleep(0.05)
        (handle,) = client.list_jobs()
        for share, workers in plan:
            while not done.is_set():
                status = handle.status()
                if status.version >= share * status.total_steps:
                    handle.scale(workers)
                    break
                time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--window", type=float, default=1.0, help="seconds per samples/s row")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    job = JobConfig(
        model={"sizes": [784, 256, 256, 10], "seed": 0},
        dataset=load_mnist(MNIST),
        optimizer={"name": "sgd", "lr": 0.1},
        batch_size=128,
        steps=args.steps,
        workers=1,
        min_workers=1,
        max_workers=2,
        eval_every=0,
    )
    done = threading.Event()
    with serve(port=0) as server:
        scaler = threading.Thread(
            target=scale_at, args=(server.address, [(0.4, 1), (0.7, 2)], done), daemon=True
        )
        scaler.start()
        result = train(job, backend="ray", server=server.address)
        done.set()
    ray.shutdown()

    times = [entry["wall_time"] for entry in result.history]
    intervals = [b - a for a, b in itertools.pairwise(times)]
    print(f"# bench_elastic: {time.strftime('%F %H:%M')}, {args.steps} steps, 2 CPUs")
    print(f"{'step':>6} {'change':28} {'step interval ms':>17} {'median around ms':>17} "
          f"{'stall ms':>9}")  # fmt: skip
    for event in result.membership:
        v = int(event["version"])  # the first step over the new members
        around = intervals[max(0, v - 60) : v - 5] + intervals[v + 5 : v + 60]
        median = statistics.median(around)
        at = max(intervals[max(0, v - 2) : v + 2])  # the change lands in one of these
        change = f"{event['old']} -> {event['new']} ({event['reason']})"
        print(f"{v:6d} {change:28} {at * 1e3:17.1f} {median * 1e3:17.1f} "
              f"{(at - median) * 1e3:9.1f}")  # fmt: skip
    print(f"\n{'seconds':>8} {'samples/s':>10} {'workers':>8}")
    start, rows, members = 0.0, 0, 1
    changes = {int(e["version"]): len(e["new"]) for e in result.membership}
    for i, entry in enumerate(result.history):
        members = changes.get(i, members)
        rows += int(entry["rows"])
        if entry["wall_time"] - start >= args.window:
            rate = rows / (entry["wall_time"] - start)
            print(f"{entry['wall_time']:8.1f} {rate:10.0f} {members:8d}")
            start, rows = entry["wall_time"], 0


if __name__ == "__main__":
    main()
