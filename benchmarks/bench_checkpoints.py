"""What checkpoints cost the data path (issue 13): they are written off the job's lock.

Three measurements, each run against one or more source trees (``--tree``, default this
repository; give an older checkout to compare before and after), variants interleaved in
rounds that each start with the next tree:

* **exchange latency**, 10M float32 parameters (1000-4000-1500-10), sync, 2 clients
  (``--clients``) in threads each doing ``push_and_pull`` against a ``gradfleet server``
  subprocess, with a checkpoint every step or none: p50 and p99 of one exchange;
* **the writer alone**: ``write_checkpoint`` of a 10M float32 snapshot, and of the small
  job's model (1,058 float64), to a temporary directory (``.npz``, digest, fsyncs,
  pruning), in a process of each tree: median CPU and wall time per checkpoint, and the
  machine's busy CPU per checkpoint (the kernel's work for the fsyncs included);
* **a small job's wall time**: ``gradfleet train`` of breast_cancer (float64, 2 Ray
  workers, 2,800 sync steps) with ``checkpoint_every = 7`` or without checkpoints, as the
  command reports it (Ray's start and stop included) and from its first step to its last.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_checkpoints.py \\
        [--tree /path/to/old/checkout] [--rounds 3] [--steps 40] [--clients 2] [--writes 10] \\
        [--no-job]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gradfleet.proto.client import ParameterServerClient

HERE = Path(__file__).resolve().parents[1]
SIZES = [1000, 4000, 1500, 10]
SGD = {"name": "sgd", "lr": 1e-6}
ADDRESS = re.compile(r"parameter server on (\S+:\d+)")
JOB = """
name = "ckpt-bench"
dataset = "breast_cancer"
batch_size = 16
epochs = 100
workers = 2
dtype = "float64"
checkpoint_every = {every}
[model]
sizes = [30, 32, 2]
[optimizer]
name = "sgd"
lr = 0.01
"""


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs gradfleet from the source tree `tree`."""
    parts = ("nn", "server", "worker", "client", "proto")
    roots = os.pathsep.join(str(tree / part) for part in parts)
    return {**os.environ, "PYTHONPATH": roots, "PYTHONUNBUFFERED": "1"}


def start_server(tree: Path, *args: str) -> tuple[subprocess.Popen, str]:
    code = "import sys; from gradfleet.server import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--max-message-bytes", str(64 << 20), *args],
        stderr=subprocess.PIPE,
        text=True,
        env=tree_env(tree),
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if match := ADDRESS.search(line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, match.group(1)
    raise RuntimeError(f"the server of {tree} did not start")


def process_cpu_seconds(pid: int | str) -> float:
    """User plus system CPU seconds of a running process, or of one thread with
    `pid` "self/task/<tid>" (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exchange_latencies(
    tree: Path, every: int, steps: int, clients: int = 2
) -> tuple[np.ndarray, float]:
    """Seconds of each exchange of `clients` clients over `steps` sync steps,
    checkpointing every `every` steps (0: never), and the server's CPU seconds per step."""
    with tempfile.TemporaryDirectory() as ckpt:
        proc, address = start_server(tree, "--checkpoint-dir", ckpt)
        try:
            spec = {"type": "MLP", "sizes": SIZES, "dtype": "float32", "seed": 0}
            with ParameterServerClient(address, timeout=600) as ps:
                job = ps.create_job(
                    spec, SGD, num_workers=clients, total_steps=steps + 1, checkpoint_every=every
                )
                _, weights = ps.pull_weights(job)
            times: list[list[float]] = [[] for _ in range(clients)]

            def worker(w: int) -> None:
                grad = np.full_like(weights, 1e-3 * (w + 1))
                out = weights.copy()
                with ParameterServerClient(address, timeout=600) as own:
                    for step in range(steps):
                        start = time.perf_counter()
                        own.push_and_pull(job, w, step, 1, 0.5, grad, out=out)
                        times[w].append(time.perf_counter() - start)

            threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with ParameterServerClient(address, timeout=600) as ps:
                ps.stop_job(job)  # and wait for its checkpoints to be on disk
            cpu = process_cpu_seconds(proc.pid) / steps
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    # the first steps warm the allocator
    return np.array([t for own in times for t in own[2:]]), cpu


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (Linux: ``/proc/stat``), the kernel's
    work for a process's fsyncs included."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# (label, elements, dtype) of the snapshots `--writer` writes
WRITER_SIZES = {"10M": (10_000_000, np.float32), "small": (30 * 32 + 32 + 32 * 2 + 2, np.float64)}


def write_checkpoints(writes: int, size: str) -> None:
    """`--writer`: time `writes` checkpoints of a snapshot of `size` (`WRITER_SIZES`) with
    the `write_checkpoint` this process imports, and print the seconds as JSON."""
    from gradfleet.proto.wire import FlatLayout
    from gradfleet.server import checkpoint
    from gradfleet.server.domain import JobSnapshot
    from gradfleet.server.settings import JobSettings, JobSpec

    elements, dtype = WRITER_SIZES[size]
    weights = np.random.default_rng(0).random(elements).astype(dtype)
    spec = JobSpec(
        model_spec_json="{}",
        optimizer_json='{"name": "sgd", "lr": 0.5}',
        num_workers=2,
        total_steps=1 << 30,
    )
    layout = FlatLayout.from_arrays({"w": weights})
    snap = JobSnapshot.new("j", JobSettings.validate(spec).spec, layout, weights)
    cpu, wall, busy = [], [], []
    with tempfile.TemporaryDirectory() as root:
        for version in range(1, writes + 3):
            start, start_cpu = time.perf_counter(), time.process_time()
            start_busy = machine_busy_seconds()
            checkpoint.write_checkpoint(Path(root), dataclasses.replace(snap, version=version))
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start)
            busy.append(machine_busy_seconds() - start_busy)
    # two writes warm the page cache; the machine's CPU is counted in ticks, so it is
    # reported as a mean
    print(json.dumps({"cpu": cpu[2:], "wall": wall[2:], "busy": [float(np.mean(busy[2:]))]}))


def writer_seconds(tree: Path, writes: int, size: str) -> dict[str, list[float]]:
    """CPU and wall seconds of each of `writes` calls of `write_checkpoint` in `tree`."""
    done = subprocess.run(
        [sys.executable, __file__, "--writer", str(writes), "--writer-size", size],
        capture_output=True,
        text=True,
        env=tree_env(tree),
        check=True,
    )
    return json.loads(done.stdout)


def rotated(items: list, round_: int) -> list:
    """`items`, starting with the next one each round: the first run of a round costs
    more, and that should not always be the same variant's."""
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def job_seconds(tree: Path, every: int) -> tuple[float, float]:
    """Seconds of the breast_cancer job: what `gradfleet train` reports (Ray's start and
    stop included) and the span from its first step to its last (its history)."""
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "job.toml"
        config.write_text(JOB.format(every=every))
        code = "import sys; from gradfleet.client.cli import main; sys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", code, "-q", "train", str(config), "--backend", "ray"]
        command += ["--checkpoint-dir", str(Path(work) / "ckpt")]
        command += ["--out", str(Path(work) / "run"), "--no-progress"]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=tree_env(tree),
            check=True,
        )
        steps = json.loads(next((Path(work) / "run").rglob("history.json")).read_text())["steps"]
    match = re.search(r" in ([\d.]+)s", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)), steps[-1]["wall_time"] - steps[0]["wall_time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="another source tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="sync steps per latency run")
    parser.add_argument("--clients", type=int, default=2, help="pushing clients (threads)")
    parser.add_argument("--writes", type=int, default=10, help="checkpoints per writer run")
    parser.add_argument("--no-job", action="store_true", help="skip the small job's timing")
    parser.add_argument("--writer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--writer-size", default="10M", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer is not None:
        write_checkpoints(args.writer, args.writer_size)
        return
    trees = [HERE, *(args.tree or [])]
    names = {tree: "this tree" if tree == HERE else str(tree) for tree in trees}

    for size, count in (("10M", args.writes), ("small", 50 * args.writes)):
        writer = {tree: {"cpu": [], "wall": [], "busy": []} for tree in trees}
        for round_ in range(args.rounds):
            for tree in rotated(trees, round_):
                for key, runs in writer_seconds(tree, count, size).items():
                    writer[tree][key] += runs
        print(f"write_checkpoint alone, {size}, {args.rounds} x {count} checkpoints")
        print(f"  {'tree':30s} {'CPU ms':>8} {'wall ms':>8} {'machine CPU ms':>15}   (median)")
        for tree, runs in writer.items():
            print(
                f"  {names[tree]:30s} {np.median(runs['cpu']) * 1e3:8.2f} "
                f"{np.median(runs['wall']) * 1e3:8.2f} {np.median(runs['busy']) * 1e3:15.2f}"
            )
        print()

    latency: dict[tuple[Path, int], list[np.ndarray]] = {}
    cpu: dict[tuple[Path, int], list[float]] = {}
    for round_ in range(args.rounds):
        for tree in rotated(trees, round_):
            for every in (0, 1):
                times, seconds_per_step = exchange_latencies(tree, every, args.steps, args.clients)
                latency.setdefault((tree, every), []).append(times)
                cpu.setdefault((tree, every), []).append(seconds_per_step)
    print(
        f"exchange latency, 10M float32, {args.clients} clients, {args.rounds} x {args.steps} steps"
    )
    print(f"  {'tree':30s} {'checkpoints':>12} {'p50 ms':>8} {'p99 ms':>8} {'server CPU/step':>16}")
    p99 = {}
    for (tree, every), runs in latency.items():
        all_times = np.concatenate(runs)
        p99[tree, every] = float(np.percentile(all_times, 99))
        print(
            f"  {names[tree]:30s} {'every step' if every else 'none':>12} "
            f"{np.percentile(all_times, 50) * 1e3:8.1f} {p99[tree, every] * 1e3:8.1f} "
            f"{np.median(cpu[tree, every]) * 1e3:13.1f} ms"
        )
    for tree in trees:
        written = np.median(cpu[tree, 1]) - np.median(cpu[tree, 0])
        print(
            f"  {names[tree]}: p99 with / without checkpoints {p99[tree, 1] / p99[tree, 0]:.2f}; "
            f"a checkpoint costs the server {written * 1e3:.1f} ms of CPU"
        )

    if args.no_job:
        return
    seconds: dict[tuple[Path, int], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for tree in rotated(trees, round_):
            for every in (0, 7):
                seconds.setdefault((tree, every), []).append(job_seconds(tree, every))
    for column, what in enumerate(("as `gradfleet train` reports them", "first step to last")):
        print(f"\nbreast_cancer, float64, 2 Ray workers, 2,800 sync steps: seconds {what}")
        print(f"  {'tree':30s} {'checkpoints':>12} {'runs':>36} {'median':>8}")
        medians = {
            key: float(np.median([run[column] for run in runs])) for key, runs in seconds.items()
        }
        for (tree, every), runs in seconds.items():
            listed = " ".join(f"{run[column]:.2f}" for run in runs)
            print(
                f"  {names[tree]:30s} {every or 'none'!s:>12} {listed:>36} "
                f"{medians[tree, every]:8.2f}"
            )
        for tree in trees:
            print(f"  {names[tree]}: every 7 / none {medians[tree, 7] / medians[tree, 0]:.2f}")


if __name__ == "__main__":
    main()
