"""Jobs on a Ray cluster of three nodes (head + two workers) on this machine.

Workers spread over the worker nodes and the sync invariant holds there; losing a
worker's node costs nothing; the server runs as an actor pinned to the head; when the
server's own node dies it resumes on another node from its checkpoint on shared
storage, or the job fails with one clear error when there is none.
Placement is read through Ray's state API (``list_actors``, served by the dashboard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.util.state import list_actors

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.cluster import ServerLost
from gradfleet.client.data import load_dataset

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def digits_job(steps: int = 20, **changes: Any) -> JobConfig:
    """A small float64 sync job on scikit-learn digits with two workers."""
    settings: dict[str, Any] = {
        "model": nn.MLP([64, 32, 10], seed=3, dtype="float64"),
        "dataset": load_dataset("digits"),
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "batch_size": 24,
        "steps": steps,
        "workers": 2,
        "seed": 11,
    }
    return JobConfig(**(settings | changes))


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def live_actors(class_name: str) -> list[Any]:
    return list_actors(
        filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], detail=True
    )


def test_workers_spread_over_two_nodes_and_match_local(two_worker_nodes: Any) -> None:
    job = digits_job()
    worker_nodes: set[str] = set()

    def record_nodes(entry: dict[str, float]) -> None:
        worker_nodes.update(actor.node_id for actor in live_actors("GradientWorker"))

    local = train(job, backend="local")
    distributed = train(
        job,
        backend="ray",
        worker_options=two_worker_nodes.worker_options(),
        progress=record_nodes,
    )

    assert worker_nodes == {node.node_id for node in two_worker_nodes.worker_nodes()}
    assert relative_difference(distributed.model.flat, local.model.flat) <= 1e-12
    assert distributed.final_metrics["steps"] == job.total_steps


def test_losing_a_worker_node_mid_run_costs_nothing(two_worker_nodes: Any) -> None:
    job = digits_job(steps=600)  # outlasts several 0.5 s polls: removal lands mid-run
    seen: dict[str, Any] = {"removed_at": None, "restarts": 0}

    def remove_a_worker_node(entry: dict[str, float]) -> None:
        actors = live_actors("GradientWorker")
        seen["restarts"] = max([seen["restarts"], *(a.num_restarts for a in actors)])
        if seen["removed_at"] is None and entry["step"] >= 5 and len(actors) == 2:
            seen["removed_at"] = entry["step"]
            two_worker_nodes.cluster.remove_node(two_worker_nodes.node_by_id(actors[0].node_id))

    undisturbed = train(job, backend="local")
    disturbed = train(
        job,
        backend="ray",
        worker_options=two_worker_nodes.worker_options(),
        progress=remove_a_worker_node,
    )

    assert seen["removed_at"] is not None and seen["removed_at"] < job.total_steps
    assert seen["restarts"] >= 1
    assert disturbed.final_metrics["steps"] == job.total_steps
    assert relative_difference(disturbed.model.flat, undisturbed.model.flat) <= 1e-12


def test_server_actor_pinned_to_the_head(two_worker_nodes: Any) -> None:
    job = digits_job()
    server_nodes: set[str] = set()

    def record_server_node(entry: dict[str, float]) -> None:
        server_nodes.update(actor.node_id for actor in live_actors("ServerActor"))

    local = train(job, backend="local")
    distributed = train(
        job,
        backend="ray",
        worker_options=two_worker_nodes.worker_options(),
        server_placement="head",
        progress=record_server_node,
    )

    assert server_nodes == {two_worker_nodes.head_id}
    assert relative_difference(distributed.model.flat, local.model.flat) <= 1e-12
    assert live_actors("ServerActor") == []


def test_server_node_loss_resumes_from_shared_checkpoint(
    two_worker_nodes: Any, tmp_path: Path
) -> None:
    # enough steps that the run outlasts several of the monitor's 0.5 s polls: the node
    # must be removed mid-run
    job = digits_job(steps=600)
    server_node = two_worker_nodes.worker_nodes()[0]
    removed_at: list[int] = []
    nodes_after: set[str] = set()

    def remove_the_server_node(entry: dict[str, float]) -> None:
        if removed_at:
            nodes_after.update(actor.node_id for actor in live_actors("ServerActor"))
        elif entry["step"] >= 12:
            removed_at.append(int(entry["step"]))
            two_worker_nodes.cluster.remove_node(server_node)

    distributed = train(
        job,
        backend="ray",
        worker_options=two_worker_nodes.worker_options(),
        server_placement=f"node:{server_node.node_id}",
        checkpoint_dir=str(tmp_path),
        progress=remove_the_server_node,
    )
    local = train(job, backend="local")

    assert removed_at and removed_at[0] < job.total_steps
    assert nodes_after and server_node.node_id not in nodes_after
    assert distributed.final_metrics["steps"] == job.total_steps
    assert relative_difference(distributed.model.flat, local.model.flat) <= 1e-12
    # the held-out scoring found the moved server too
    last, local_last = distributed.evaluations[-1], local.evaluations[-1]
    assert last["step"] == local_last["step"] == job.total_steps
    assert last["val_accuracy"] == local_last["val_accuracy"]


def test_server_node_loss_without_checkpoint_dir_fails_clearly(two_worker_nodes: Any) -> None:
    job = digits_job(steps=20_000)  # the node goes at step 5; the job must not end first
    server_node = two_worker_nodes.worker_nodes()[0]

    def remove_the_server_node(entry: dict[str, float]) -> None:
        if entry["step"] >= 5 and server_node in two_worker_nodes.cluster.worker_nodes:
            two_worker_nodes.cluster.remove_node(server_node)

    with pytest.raises(ServerLost, match="pass checkpoint_dir"):
        train(
            job,
            backend="ray",
            worker_options=two_worker_nodes.worker_options(),
            server_placement=f"node:{server_node.node_id}",
            progress=remove_the_server_node,
        )

    assert live_actors("ServerActor") == []
    assert live_actors("GradientWorker") == []


def test_shards_on_different_nodes_survive_the_loss_of_one(
    two_worker_nodes: Any, tmp_path: Path
) -> None:
    # two shards, spread over the nodes; the node of one of them is removed mid-run
    job = digits_job(steps=600)
    shard_nodes: list[set[str]] = []
    removed: list[str] = []

    def remove_a_shard_node(entry: dict[str, float]) -> None:
        nodes = {actor.node_id for actor in live_actors("ServerActor")}
        shard_nodes.append(nodes)
        workers = {node.node_id for node in two_worker_nodes.worker_nodes()}
        if not removed and entry["step"] >= 12 and nodes & workers:
            removed.append(sorted(nodes & workers)[0])
            two_worker_nodes.cluster.remove_node(two_worker_nodes.node_by_id(removed[0]))

    distributed = train(
        job,
        backend="ray",
        worker_options=two_worker_nodes.worker_options(),
        server_placement="head",
        servers=2,
        checkpoint_dir=str(tmp_path),
        progress=remove_a_shard_node,
    )
    local = train(job, backend="local")

    assert len(shard_nodes[0]) == 2  # one shard per node
    assert removed and any(removed[0] not in nodes for nodes in shard_nodes[-3:])
    assert distributed.final_metrics["steps"] == job.total_steps
    assert distributed.model.flat.tobytes() == local.model.flat.tobytes()
    assert live_actors("ServerActor") == []


def test_an_elastic_job_grows_with_a_node_and_shrinks_when_one_goes(
    two_worker_nodes: Any,
) -> None:
    # one worker node (2 CPUs) at the start: 2 workers; a second node: 4; its loss: 2
    two_worker_nodes.cluster.remove_node(two_worker_nodes.worker_nodes()[-1])
    # per-worker batches: a step's rows say how many members pushed to it
    job = digits_job(steps=4000, min_workers=1, max_workers=4, elastic_batch="per_worker")
    seen: list[int] = []
    added: list[Any] = []
    removed: list[str] = []

    def grow_then_shrink(entry: dict[str, float]) -> None:
        workers = live_actors("GradientWorker")
        seen.append(len(workers))
        if not added and entry["step"] >= 100:
            two_worker_nodes.ensure_worker_nodes(2)
            added.append(True)
        elif added and not removed and entry["rows"] == 4 * job.rows_per_worker:
            node = sorted({actor.node_id for actor in workers})[0]
            removed.append(node)
            two_worker_nodes.cluster.remove_node(two_worker_nodes.node_by_id(node))

    distributed = train(
        job,
        backend="ray",
        worker_options=two_worker_nodes.worker_options(),
        progress=grow_then_shrink,
    )
    sizes = [len(event["new"]) for event in distributed.membership]
    replayed = train(job, backend="local", membership=distributed.membership)

    assert seen[0] == 2 and 4 in seen and removed
    assert 4 in sizes and sizes[-1] == 2  # grew to 4, shrank back when the node went
    assert {event["reason"] for event in distributed.membership} >= {"join", "lost"}
    assert distributed.final_metrics["steps"] == job.total_steps
    counters = distributed.final_metrics["server_counters"]
    assert counters["received"] == (
        counters["accepted"] + counters["duplicate"] + counters["dropped_late"]
        + counters["dropped_removed"] + sum(counters["rejected"].values())
    )  # fmt: skip
    assert replayed.model.flat.tobytes() == distributed.model.flat.tobytes()
    assert live_actors("GradientWorker") == []
