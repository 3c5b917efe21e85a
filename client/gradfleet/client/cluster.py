"""The parameter server as a Ray actor pinned to a chosen node of the cluster.

``train(..., server_placement="head")`` (or ``"node:<node id>"``) runs the server inside
a named actor on that node, serving gRPC on the node's IP, and hands ``<node ip>:<port>``
to the workers. The actor's name is published in the ``gradfleet`` namespace, so a
worker that loses the server asks the actor for its current address
(``gradfleet.worker.actor.server_locator``). If the node dies and ``checkpoint_dir`` is a path every
node can read, Ray restarts the actor on a surviving node and the server resumes every
job from its last checkpoint; without it, the job fails with ``ServerLost``.

``server_actor()`` yields a ``ServerActorRef`` (address and name): ``train()`` passes the
name to the workers and to its own client, which follow the server when it moves.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gradfleet.worker.actor import SERVER_ACTOR_NAMESPACE
from gradfleet.worker.ray_runner import kill_and_wait

logger = logging.getLogger(__name__)

HEAD_RESOURCE = "node:__internal_head__"
# Ray restarts the server actor this often after its node dies (only with a checkpoint dir).
SERVER_MAX_RESTARTS = 3
# With shared storage, checkpoint at least this often so a lost node costs few steps.
DEFAULT_CHECKPOINT_EVERY = 10


class ServerLost(RuntimeError):
    """The server actor's node died and the server could not be restarted."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class ServerActor:
    """Runs a ``ParameterServer`` in a Ray actor process, bound to its node's IP."""

    def __init__(
        self, token: str | None, checkpoint_dir: str | None, checkpoint_every: int
    ) -> None:
        from gradfleet.server import ParameterServer, ServerConfig

        # Bind the node's own address, not 0.0.0.0: reachable by the other nodes,
        # not by every network the machine happens to be on.
        config = ServerConfig(
            host=ray.util.get_node_ip_address(),
            port=0,
            token=token,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every if checkpoint_dir else 0,
        )
        self.server = ParameterServer(config).start()
        self.node_id = ray.get_runtime_context().get_node_id()

    def get_address(self) -> str:
        """``<node ip>:<port>`` of the running server (changes when the actor restarts)."""
        return self.server.address

    def node(self) -> str:
        """The node the server runs on (`start_server_actor` checks the placement)."""
        return self.node_id

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: drain calls, write a final checkpoint of every job."""
        self.server.stop(grace)


def resolve_node(placement: str) -> str:
    """The node id (hex) that ``placement`` ("head" or "node:<node id>") names."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    if placement == "head":
        for node in alive:
            if HEAD_RESOURCE in node["Resources"]:
                return str(node["NodeID"])
        raise ValueError("the Ray cluster reports no live head node to place the server on")
    if placement.startswith("node:"):
        node_id = placement.removeprefix("node:")
        if any(node["NodeID"] == node_id for node in alive):
            return node_id
        known = ", ".join(str(node["NodeID"]) for node in alive)
        raise ValueError(f"server_placement names node {node_id!r}, not a live node: {known}")
    raise ValueError(
        f"server_placement must be 'driver', 'head' or 'node:<node id>', got {placement!r}"
    )


def start_server_actor(
    placement: str,
    token: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    placement_timeout: float = 60.0,
) -> tuple[Any, str]:
    """Start the server actor on the chosen node; returns (actor handle, actor name)."""
    node_id = resolve_node(placement)
    restartable = checkpoint_dir is not None
    server_class: Any = ray.remote(ServerActor)
    deadline = time.monotonic() + placement_timeout
    for attempt in itertools.count():
        name = f"gradfleet-server-{uuid.uuid4().hex[:8]}"
        actor = server_class.options(
            name=name,
            namespace=SERVER_ACTOR_NAMESPACE,
            num_cpus=0,  # it must fit on a head node that offers no CPUs to tasks
            # Hard affinity cannot follow a dead node: with a checkpoint to resume
            # from, ask softly so that Ray can restart the actor on a surviving node.
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=restartable),
            max_restarts=SERVER_MAX_RESTARTS if restartable else 0,
            max_task_retries=-1 if restartable else 0,
        ).remote(token, str(checkpoint_dir) if restartable else None, checkpoint_every)
        placed = ray.get(actor.node.remote())
        if placed == node_id:
            return actor, name
        # Soft affinity may spill to another node for a while after the chosen node
        # joined, even once a hard-affinity probe succeeds: ask again until it lands.
        logger.info("server actor landed on %s, not %s (attempt %d)", placed, node_id, attempt)
        ray.kill(actor, no_restart=True)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"could not place the server actor on node {node_id} within "
                f"{placement_timeout:.0f}s; is the node still alive?"
            )
        time.sleep(1.0)
    raise AssertionError("unreachable")


@dataclass
class ServerActorRef:
    """Running server actors: their first addresses, and the names to find them again by
    (comma-separated, one per shard of a sharded job)."""

    address: str
    name: str


@contextlib.contextmanager
def shard_actors(
    count: int,
    token: str | None = None,
    checkpoint_dir: str | Path | None = None,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    placement_timeout: float = 60.0,
) -> Iterator[ServerActorRef]:
    """Run `count` server actors, one per shard, spread over the cluster's nodes (a
    placement group with the SPREAD strategy), for the block. With a checkpoint
    directory, shard s keeps its checkpoints in ``<dir>/shard-<s>`` and Ray restarts it
    elsewhere when its node dies; the job's client follows it."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # a token of memory per bundle: a server needs no CPU slot (it fits a head node that
    # offers none) and must not take one a worker needs after a node loss
    group = placement_group([{"memory": 1}] * count, strategy="SPREAD")
    if not group.wait(placement_timeout):
        remove_placement_group(group)
        raise RuntimeError(f"the cluster could not place {count} parameter servers")
    restartable = checkpoint_dir is not None
    server_class: Any = ray.remote(ServerActor)
    actors, names = [], []
    try:
        for shard in range(count):
            name = f"gradfleet-shard{shard}-{uuid.uuid4().hex[:8]}"
            directory = None
            if checkpoint_dir is not None:
                directory = str(Path(checkpoint_dir) / f"shard-{shard}")
            actors.append(
                server_class.options(
                    name=name,
                    namespace=SERVER_ACTOR_NAMESPACE,
                    num_cpus=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, shard),
                    max_restarts=SERVER_MAX_RESTARTS if restartable else 0,
                    max_task_retries=-1 if restartable else 0,
                ).remote(token, directory, checkpoint_every)
            )
            names.append(name)
        addresses = ray.get([actor.get_address.remote() for actor in actors])
        ref = ServerActorRef(",".join(addresses), ",".join(names))
        logger.info("%d parameter server shards on %s", count, ref.address)
        yield ref
    finally:
        for actor in actors:
            _stop(actor)
        remove_placement_group(group)


@contextlib.contextmanager
def server_actor(
    placement: str,
    token: str | None = None,
    checkpoint_dir: str | Path | None = None,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> Iterator[ServerActorRef]:
    """Run the server as an actor on ``placement`` for the block; yields where it is.

    The actor is owned by this driver, so it also ends if the driver dies. On leaving,
    the server stops gracefully (final checkpoint) and the actor is killed. If the block
    fails because the server's node died and there was no checkpoint directory to resume
    from, the error is ``ServerLost``, saying so.
    """
    actor, name = start_server_actor(placement, token, checkpoint_dir, checkpoint_every)
    ref = ServerActorRef(str(ray.get(actor.get_address.remote())), name)
    logger.info("parameter server actor %s on %s (%s)", name, ref.address, placement)
    try:
        yield ref
    except Exception as exc:
        if checkpoint_dir is None and not _is_alive(actor):
            raise ServerLost(
                f"the parameter server's node died (actor {name}) and the job cannot "
                "resume: pass checkpoint_dir, a path every node can read, to resume "
                "from the last checkpoint"
            ) from exc
        raise
    finally:
        _stop(actor)


def _is_alive(actor: Any) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
    return True


def _stop(actor: Any) -> None:
    """Stop the server gracefully (30 s at most), then kill the actor and wait for Ray to
    report it dead."""
    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(actor.stop.remote(), timeout=30)
    kill_and_wait([actor])
