"""Elastic membership against a real server: who a step closes over, pushes from workers
that left, changes named for a later step, refusals, lost workers, restarts, watches,
async jobs and sharded jobs."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.sharded import ShardedClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, encode_chunk_message
from gradfleet.server import serve

pytestmark = pytest.mark.integration

ELASTIC = {"num_workers": 3, "min_workers": 1, "max_workers": 4}
ACCEPTED, REMOVED = pb.PUSH_OUTCOME_ACCEPTED, pb.PUSH_OUTCOME_DROPPED_REMOVED
SERVICE = "/gradfleet.v1.ParameterService/"


def grad(kit, layout: FlatLayout, worker: int, step: int) -> np.ndarray:
    """Worker `worker`'s gradient of `step`, scaled so that the order of the sum shows."""
    return kit.gradient(layout, worker, step) * 10.0**worker


def events(info: pb.JobInfo) -> list[tuple]:
    return [(e.version, list(e.old), list(e.new), e.reason, e.mid_step) for e in info.membership]


def reconciles(c: pb.JobCounters) -> bool:
    counted = c.accepted + c.duplicate + c.dropped_late + c.dropped_removed
    return c.received == counted + sum(c.rejected.values())


def push_step(client, job: str, layout: FlatLayout, kit, step: int, workers) -> list[int]:
    """Each worker's push of its gradient of `step`, in this order; their outcomes."""
    acks = [client.push_gradient(job, w, step, 1, 1.0, grad(kit, layout, w, step)) for w in workers]
    return [ack.outcome for ack in acks]


def header(job: str, layout: FlatLayout, worker: int, step: int) -> bytes:
    return pb.PushHeader(
        job_id=job,
        worker=worker,
        step=step,
        rows=1,
        loss=1.0,
        dtype=pb.DTYPE_FLOAT64,
        total_bytes=layout.nbytes,
        layout=layout.to_proto(),
    ).SerializeToString()


def one_sentence(message: str) -> bool:
    """The client drops the closing full stop; no other sentence may end inside."""
    text = message.rstrip(".")
    return bool(text) and ". " not in text and "\n" not in text


# who a step closes over


def test_removing_a_worker_that_has_not_pushed_closes_the_step_over_the_rest(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(**ELASTIC)
    push_step(client, job, layout, kit, 0, [2, 0])
    # execute
    changed = client.set_members(job, [0, 2], "leave")
    version, weights = client.pull_weights(job, min_version=1, timeout=10)
    # assert
    info = client.get_job(job)
    assert list(changed.members) == [0, 2] and version == 1
    assert weights.tobytes() == ref.sync_step([grad(kit, layout, w, 0) for w in (0, 2)]).tobytes()
    assert events(info) == [(0, [0, 1, 2], [0, 2], "leave", True)]
    assert info.history[0].contributors == 2


def test_removing_a_worker_that_pushed_applies_from_the_next_step(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(**ELASTIC)
    push_step(client, job, layout, kit, 0, [1])
    # execute
    waiting = client.set_members(job, [0, 2], "leave")
    push_step(client, job, layout, kit, 0, [0, 2])
    after_0 = client.pull_weights(job, min_version=1, timeout=10)[1]
    push_step(client, job, layout, kit, 1, [0, 2])
    version, after_1 = client.pull_weights(job, min_version=2, timeout=10)
    # assert: worker 1's gradient counts in step 0, and step 1 closes without it
    assert list(waiting.members) == [0, 1, 2]
    assert (list(waiting.next_members), waiting.next_members_version) == ([0, 2], 1)
    assert after_0.tobytes() == ref.sync_step([grad(kit, layout, w, 0) for w in range(3)]).tobytes()
    expected = ref.sync_step([grad(kit, layout, w, 1) for w in (0, 2)])
    assert version == 2 and after_1.tobytes() == expected.tobytes()
    info = client.get_job(job)
    assert events(info) == [(1, [0, 1, 2], [0, 2], "leave", False)]
    assert not info.next_members


def test_a_change_that_waits_takes_the_leavers_that_never_pushed_out_of_the_open_step(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: worker 1 pushed to step 0, worker 2 never will (its node is gone)
    job, layout, _, ref = make_job(**ELASTIC)
    push_step(client, job, layout, kit, 0, [1])
    # execute: both leave; worker 1's ack stands, so the change waits for step 1
    client.set_members(job, [0], "lost")
    push_step(client, job, layout, kit, 0, [0])
    version, after_0 = client.pull_weights(job, min_version=1, timeout=10)
    # assert: step 0 closed over workers 0 and 1, without waiting for worker 2
    expected = ref.sync_step([grad(kit, layout, w, 0) for w in (0, 1)])
    assert version == 1 and after_0.tobytes() == expected.tobytes()
    info = client.get_job(job)
    assert events(info) == [
        (0, [0, 1, 2], [0, 1], "lost", True),
        (1, [0, 1], [0], "lost", False),
    ]
    assert list(info.members) == [0] and reconciles(info.counters)


def test_a_join_applies_from_the_next_step(client: ParameterServerClient, make_job, kit) -> None:
    # prepare
    job, layout, _, ref = make_job(**ELASTIC)
    # execute: the newcomer's push to the open step does not count
    waiting = client.set_members(job, [0, 1, 2, 3], "join")
    early = push_step(client, job, layout, kit, 0, [3])
    push_step(client, job, layout, kit, 0, [0, 1, 2])
    after_0 = client.pull_weights(job, min_version=1, timeout=10)[1]
    push_step(client, job, layout, kit, 1, [3, 0, 2, 1])
    version, after_1 = client.pull_weights(job, min_version=2, timeout=10)
    # assert
    assert list(waiting.members) == [0, 1, 2] and waiting.next_members_version == 1
    assert early == [REMOVED]
    assert after_0.tobytes() == ref.sync_step([grad(kit, layout, w, 0) for w in range(3)]).tobytes()
    expected = ref.sync_step([grad(kit, layout, w, 1) for w in range(4)])
    assert version == 2 and after_1.tobytes() == expected.tobytes()
    info = client.get_job(job)
    assert events(info) == [(1, [0, 1, 2], [0, 1, 2, 3], "join", False)]
    assert (info.counters.accepted, info.counters.dropped_removed) == (7, 1)


def test_pushes_from_a_removed_worker_are_dropped_counted_and_change_nothing(
    client: ParameterServerClient, make_job, state_of, kit
) -> None:
    # prepare: worker 2 leaves step 0 before pushing to it
    job, layout, _, ref = make_job(**ELASTIC)
    push_step(client, job, layout, kit, 0, [0, 1])
    client.set_members(job, [0, 1], "leave")
    before = state_of(job)
    # execute: its pushes to the step it left and to the open one
    outcomes = push_step(client, job, layout, kit, 0, [2])
    outcomes += push_step(client, job, layout, kit, 1, [2])
    after = state_of(job)
    push_step(client, job, layout, kit, 1, [0, 1])
    _, weights = client.pull_weights(job, min_version=2, timeout=10)
    # assert
    assert outcomes == [REMOVED, REMOVED]
    assert after[:2] == before[:2]
    counters = after[2]
    assert counters.dropped_removed == before[2].dropped_removed + 2 == 2
    assert counters.received == before[2].received + 2 and reconciles(counters)
    ref.sync_step([grad(kit, layout, w, 0) for w in (0, 1)])
    assert weights.tobytes() == ref.sync_step([grad(kit, layout, w, 1) for w in (0, 1)]).tobytes()


def test_the_quorum_follows_the_members_with_backup_workers(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: 3 members and 1 backup close on 2 gradients; worker 0's is in
    job, layout, _, ref = make_job(3, backup_workers=1, min_workers=2, max_workers=4)
    push_step(client, job, layout, kit, 0, [0])
    # execute: 2 members and 1 backup close on 1 gradient, which is in
    client.set_members(job, [0, 1], "leave")
    version, weights = client.pull_weights(job, min_version=1, timeout=10)
    late = push_step(client, job, layout, kit, 0, [1])
    # assert
    assert version == 1
    assert weights.tobytes() == ref.sync_step([grad(kit, layout, 0, 0)]).tobytes()
    assert late == [pb.PUSH_OUTCOME_DROPPED_LATE]


# a push in flight while its worker is removed


def test_a_push_in_flight_when_its_worker_is_removed_is_dropped_not_half_counted(
    server, client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: worker 2's stream has sent its header and first chunk, and waits
    job, layout, _, ref = make_job(**ELASTIC)
    push_step(client, job, layout, kit, 0, [0])
    data = grad(kit, layout, 2, 0).tobytes()
    sent, removed = threading.Event(), threading.Event()

    def messages():  # type: ignore[no-untyped-def]
        yield encode_chunk_message(0, data[:256], header(job, layout, 2, 0))
        sent.set()
        removed.wait(10)
        yield encode_chunk_message(256, data[256:])

    acks: list[pb.PushAck] = []

    def push() -> None:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.stream_unary(
                SERVICE + "PushGradient", response_deserializer=pb.PushAck.FromString
            )
            acks.append(call(messages(), timeout=20))

    pusher = threading.Thread(target=push)
    pusher.start()
    sent.wait(10)
    time.sleep(0.3)  # let the server read the header and wait for the rest
    # execute
    client.set_members(job, [0, 1], "leave")
    removed.set()
    pusher.join(30)
    push_step(client, job, layout, kit, 0, [1])
    version, weights = client.pull_weights(job, min_version=1, timeout=10)
    # assert
    assert [a.outcome for a in acks] == [REMOVED]
    assert version == 1
    assert weights.tobytes() == ref.sync_step([grad(kit, layout, w, 0) for w in (0, 1)]).tobytes()
    counters = client.get_job(job).counters
    assert (counters.received, counters.accepted, counters.dropped_removed) == (3, 2, 1)
    assert reconciles(counters)


def race_removal(
    client: ParameterServerClient, streaming: ParameterServerClient, kit, delay: float
) -> int:
    """Worker 2 streams its push to step 0 while, `delay` s after it starts, SetMembers
    removes it; then worker 1 pushes. Checks the job and returns the push's outcome."""
    job = client.create_job(kit.SPEC64, kit.SGD, total_steps=5, **ELASTIC)
    _, weights0 = client.pull_weights(job, 0)
    layout = client.layout(job)
    push_step(client, job, layout, kit, 0, [0])
    start, acks = threading.Barrier(2), []

    def push() -> None:
        start.wait()
        acks.append(streaming.push_gradient(job, 2, 0, 1, 1.0, grad(kit, layout, 2, 0)))

    pusher = threading.Thread(target=push)
    pusher.start()
    start.wait()
    time.sleep(delay)
    client.set_members(job, [0, 1], "leave")
    pusher.join(30)
    push_step(client, job, layout, kit, 0, [1])
    version, weights = client.pull_weights(job, min_version=1, timeout=10)
    info, ref = client.get_job(job), kit.Reference(layout, weights0, kit.SGD)
    (outcome,) = [a.outcome for a in acks]
    counters = info.counters
    assert version == 1 and list(info.members) == [0, 1]
    assert counters.received == 3 and reconciles(counters)
    if outcome == ACCEPTED:  # in the sum; the removal waited for step 1
        expected = ref.sync_step([grad(kit, layout, w, 0) for w in range(3)])
        assert (counters.accepted, counters.dropped_removed) == (3, 0)
        assert events(info) == [(1, [0, 1, 2], [0, 1], "leave", False)]
    else:  # dropped; the removal applied to step 0
        assert outcome == REMOVED
        expected = ref.sync_step([grad(kit, layout, w, 0) for w in (0, 1)])
        assert (counters.accepted, counters.dropped_removed) == (2, 1)
        assert events(info) == [(0, [0, 1, 2], [0, 1], "leave", True)]
    assert weights.tobytes() == expected.tobytes()
    return outcome


def test_a_streamed_push_racing_its_removal_counts_once_or_is_dropped(
    server, client: ParameterServerClient, kit
) -> None:
    # prepare: 64-byte chunks, so every push is a stream of several messages
    with ParameterServerClient(server.address, timeout=10, chunk_bytes=64) as streaming:
        assert client.layout(client.create_job(kit.SPEC64, kit.SGD, total_steps=1)).nbytes > 4 * 64
        # execute: SetMembers lands before, during or after the stream
        outcomes = [race_removal(client, streaming, kit, i * 0.0005) for i in range(12)]
    # assert (each round checked its own sum and counters)
    assert set(outcomes) <= {ACCEPTED, REMOVED}


# changes named for a step


def test_a_change_from_a_future_step_applies_exactly_there(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(**ELASTIC)
    # execute
    waiting = client.set_members(job, [0, 1, 2, 3], "join", from_version=2)
    for step in range(2):
        early = push_step(client, job, layout, kit, step, [3])
        push_step(client, job, layout, kit, step, [0, 1, 2])
    at_two = client.get_job(job)
    push_step(client, job, layout, kit, 2, range(4))
    version, weights = client.pull_weights(job, min_version=3, timeout=10)
    # assert
    assert (list(waiting.next_members), waiting.next_members_version) == ([0, 1, 2, 3], 2)
    assert early == [REMOVED]
    assert at_two.version == 2 and list(at_two.members) == [0, 1, 2, 3]
    assert events(at_two) == [(2, [0, 1, 2], [0, 1, 2, 3], "join", False)]
    for step in range(2):
        ref.sync_step([grad(kit, layout, w, step) for w in range(3)])
    expected = ref.sync_step([grad(kit, layout, w, 2) for w in range(4)])
    assert version == 3 and weights.tobytes() == expected.tobytes()


def test_a_removal_named_for_the_open_step_applies_at_once(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare
    job, layout, *_ = make_job(**ELASTIC)
    push_step(client, job, layout, kit, 0, [0, 1])
    # execute
    client.set_members(job, [0, 1], "leave", from_version=0)
    # assert
    info = client.get_job(job)
    assert info.version == 1 and events(info) == [(0, [0, 1, 2], [0, 1], "leave", True)]


@pytest.mark.parametrize(
    ("members", "from_version"),
    [([0, 1, 2], 1), ([0, 1], 1), ([0, 1], 2), ([0, 1, 2, 3], 2)],
    ids=["past", "past-removal", "open-step-leaver-pushed", "open-step-join"],
)
def test_a_change_named_for_a_step_it_cannot_apply_to_is_refused(
    client: ParameterServerClient, make_job, state_of, kit, members, from_version
) -> None:
    # prepare: version 2, worker 2 has pushed to it
    job, layout, *_ = make_job(**ELASTIC)
    for step in range(2):
        push_step(client, job, layout, kit, step, range(3))
    push_step(client, job, layout, kit, 2, [2])
    before, info_before = state_of(job), client.get_job(job)
    # execute
    with pytest.raises(GradfleetError) as err:
        client.set_members(job, members, "change", from_version=from_version)
    # assert
    assert err.value.code.name == "FAILED_PRECONDITION"
    assert one_sentence(err.value.message)
    info = client.get_job(job)
    assert state_of(job)[:2] == before[:2]
    assert list(info.members) == list(info_before.members) == [0, 1, 2]
    assert events(info) == [] and not info.next_members


# refusals


@pytest.mark.parametrize(
    ("settings", "workers"),
    [
        ({}, 5),
        ({}, 0),
        ({}, -1),
        ({"min_workers": 2}, 1),
        ({"global_batch": 6}, 4),
    ],
    ids=["above-max", "zero", "negative", "below-min", "batch-does-not-split"],
)
def test_scale_job_outside_what_the_job_can_have_is_refused(
    client: ParameterServerClient, make_job, settings, workers
) -> None:
    # prepare
    job, *_ = make_job(**(ELASTIC | settings))
    # execute
    with pytest.raises(GradfleetError) as err:
        client.scale_job(job, workers)
    # assert
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert one_sentence(err.value.message)
    info = client.get_job(job)
    assert info.requested_workers == 0 and list(info.members) == [0, 1, 2]
    assert events(info) == []


def test_scale_job_records_the_size_and_leaves_the_members(
    client: ParameterServerClient, make_job
) -> None:
    # prepare
    job, *_ = make_job(**ELASTIC)
    # execute
    answer = client.scale_job(job, 4)
    # assert
    info = client.get_job(job)
    assert answer.requested_workers == info.requested_workers == 4
    assert list(info.members) == [0, 1, 2] and events(info) == []


@pytest.mark.parametrize(
    ("settings", "members"),
    [
        ({}, [0, 0, 1]),
        ({}, [0, 4]),
        ({}, [-1, 0]),
        ({}, []),
        ({"min_workers": 2}, [0]),
        ({"global_batch": 6}, [0, 1, 2, 3]),
        ({"backup_workers": 1}, [0]),
    ],
    ids=["duplicate", "id-at-max", "negative-id", "empty", "below-min", "batch", "no-quorum"],
)
def test_set_members_the_job_cannot_have_is_refused_and_changes_nothing(
    client: ParameterServerClient, make_job, state_of, kit, settings, members
) -> None:
    # prepare
    job, layout, *_ = make_job(**(ELASTIC | settings))
    push_step(client, job, layout, kit, 0, [0])
    before = state_of(job)
    # execute
    with pytest.raises(GradfleetError) as err:
        client.set_members(job, members, "bad")
    # assert
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert one_sentence(err.value.message)
    info = client.get_job(job)
    assert state_of(job)[:2] == before[:2]
    assert list(info.members) == [0, 1, 2]
    assert events(info) == [] and not info.next_members


# lost workers


def test_a_member_that_never_pushes_is_removed_once_the_grace_passes(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: workers 0 and 1 push to step 0, worker 2 never does
    job, layout, _, ref = make_job(**ELASTIC, member_grace_seconds=0.4)
    push_step(client, job, layout, kit, 0, [0, 1])
    waiting = client.get_job(job)
    time.sleep(0.7)
    still = client.get_job(job)  # no push arrived: nothing is checked
    # execute: a retried push arrives
    retry = push_step(client, job, layout, kit, 0, [0])
    version, weights = client.pull_weights(job, min_version=1, timeout=10)
    after = push_step(client, job, layout, kit, 1, [2])
    # assert
    assert (waiting.version, list(waiting.members)) == (0, [0, 1, 2])
    assert (still.version, list(still.members)) == (0, [0, 1, 2])
    assert retry == [pb.PUSH_OUTCOME_DUPLICATE] and after == [REMOVED]
    assert version == 1
    assert weights.tobytes() == ref.sync_step([grad(kit, layout, w, 0) for w in (0, 1)]).tobytes()
    ((at, old, new, reason, mid_step),) = events(client.get_job(job))
    assert (at, old, new, mid_step) == (0, [0, 1, 2], [0, 1], True)
    assert reason.startswith("lost")


def test_members_that_waited_for_a_lost_worker_are_not_lost_themselves(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: workers 0 and 1 wait for worker 2 past the grace; a retry removes it
    job, layout, *_ = make_job(**ELASTIC, member_grace_seconds=0.4)
    push_step(client, job, layout, kit, 0, [0, 1])
    time.sleep(0.7)
    push_step(client, job, layout, kit, 0, [0])
    # execute: both push to step 1 as soon as it opens
    outcomes = push_step(client, job, layout, kit, 1, [0, 1])
    # assert: step 1 waited for nobody past the grace, so nobody is lost from it
    info = client.get_job(job)
    assert outcomes == [ACCEPTED, ACCEPTED], events(info)
    assert info.version == 2 and list(info.members) == [0, 1]
    assert [e[0] for e in events(info)] == [0]


# records: checkpoints and watches


def test_membership_survives_a_restart_from_a_checkpoint(tmp_path: Path, kit) -> None:
    # prepare: a removal at once, a join waiting for step 3, a requested size
    with (
        serve(host="127.0.0.1", port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address, timeout=10) as c,
    ):
        job = c.create_job(kit.SPEC64, kit.SGD, total_steps=10, job_id="elastic", **ELASTIC)
        layout = c.layout(job)
        push_step(c, job, layout, kit, 0, range(3))
        c.set_members(job, [0, 1], "leave")
        c.set_members(job, [0, 1, 3], "join", from_version=3)
        c.scale_job(job, 3)
        c.checkpoint(job)
        before = c.get_job(job)
    # execute
    with (
        serve(host="127.0.0.1", port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address, timeout=10) as c,
    ):
        resumed = c.get_job(job)
        gone = push_step(c, job, layout, kit, 1, [2])
        for step in (1, 2):
            push_step(c, job, layout, kit, step, [0, 1])
        at_three = c.get_job(job)
    # assert
    assert resumed.version == 1 and list(resumed.members) == [0, 1]
    assert events(resumed) == events(before) == [(1, [0, 1, 2], [0, 1], "leave", True)]
    assert (list(resumed.next_members), resumed.next_members_version) == ([0, 1, 3], 3)
    assert resumed.requested_workers == 3
    assert gone == [REMOVED]
    assert at_three.version == 3 and list(at_three.members) == [0, 1, 3]
    assert events(at_three)[-1] == (3, [0, 1], [0, 1, 3], "join", False)


def test_watch_job_yields_the_membership_event(client: ParameterServerClient, make_job) -> None:
    # prepare: a watch that has seen the job running
    job, *_ = make_job(**ELASTIC)
    seen: list[pb.JobEvent] = []
    started, changed = threading.Event(), threading.Event()

    def watch() -> None:
        for event in client.watch(job):
            seen.append(event)
            started.set()
            if event.HasField("membership"):
                changed.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert started.wait(10)
    # execute
    client.set_members(job, [0, 2], "leave")
    assert changed.wait(10)
    client.stop_job(job)  # ends the watch
    watcher.join(10)
    # assert
    (event,) = [e for e in seen if e.HasField("membership")]
    m = event.membership
    assert event.version == 0 and m.version == 0
    assert (list(m.old), list(m.new), m.reason, m.mid_step) == ([0, 1, 2], [0, 2], "leave", True)


# async and sharded jobs


def test_an_async_push_from_a_removed_worker_is_dropped(
    client: ParameterServerClient, make_job, state_of, kit
) -> None:
    # prepare
    job, layout, _, ref = make_job(2, mode="async", staleness_bound=4, min_workers=1, max_workers=3)
    # execute
    client.set_members(job, [0], "leave")
    before = state_of(job)
    dropped = push_step(client, job, layout, kit, 0, [1])
    after = state_of(job)
    accepted = push_step(client, job, layout, kit, 0, [0])
    version, weights = client.pull_weights(job, min_version=1, timeout=10)
    # assert
    assert dropped == [REMOVED] and accepted == [ACCEPTED]
    assert after[:2] == before[:2] and after[2].dropped_removed == 1
    assert version == 1 and weights.tobytes() == ref.async_step(grad(kit, layout, 0, 0)).tobytes()
    info = client.get_job(job)
    assert events(info) == [(0, [0, 1], [0], "leave", True)]
    assert reconciles(info.counters)


def test_a_sharded_job_changes_members_at_the_same_step_on_every_shard(kit) -> None:
    # prepare: two shards, shard 0 a step ahead of shard 1
    with contextlib.ExitStack() as stack:
        addresses = [stack.enter_context(serve(host="127.0.0.1", port=0)).address for _ in "ab"]
        clients = [ParameterServerClient(a, timeout=10) for a in addresses]
        sharded = stack.enter_context(ShardedClient(clients))
        model = MLP.from_spec(kit.SPEC64)
        layout = FlatLayout.from_arrays(model.unflatten(model.flat))
        job = sharded.create_job(kit.SPEC64, kit.SGD, layout=layout, total_steps=10, **ELASTIC)
        bounds = list(sharded.shard_infos(job)[0].spec.shard.bounds)
        for w in range(3):
            full = grad(kit, layout, w, 0)
            clients[0].push_gradient(job, w, 0, 1, 1.0, full[bounds[0] : bounds[1]])
        assert [i.version for i in sharded.shard_infos(job)] == [1, 0]
        # execute
        sharded.set_members(job, [0, 1], "leave")
        waiting = sharded.shard_infos(job)
        for w in range(3):
            full = grad(kit, layout, w, 0)
            clients[1].push_gradient(job, w, 0, 1, 1.0, full[bounds[1] : bounds[2]])
        for w in range(3):
            sharded.push_gradient(job, w, 1, 1, 1.0, grad(kit, layout, w, 1))
        gone = sharded.push_gradient(job, 2, 2, 1, 1.0, grad(kit, layout, 2, 2))
        infos = sharded.shard_infos(job)
    # assert: the change waited for step 2 on both, though shard 1 could have had it at once
    assert [(list(i.next_members), i.next_members_version) for i in waiting] == [([0, 1], 2)] * 2
    assert [i.version for i in infos] == [2, 2]
    assert [events(i) for i in infos] == [[(2, [0, 1, 2], [0, 1], "leave", False)]] * 2
    assert [a.outcome for a in gone] == [REMOVED, REMOVED]


# a change that waits must stay one the job can have


@pytest.mark.parametrize(
    ("settings", "later", "now"),
    [
        ({"num_workers": 2}, [1], [0]),  # the waiting change would leave no member
        ({"num_workers": 2, "global_batch": 4}, [0, 1, 2, 3], [0]),  # 4 rows over 3
        ({"num_workers": 3, "min_workers": 2}, [1, 2], [0, 1]),  # 1 member, min 2
    ],
    ids=["no-members", "batch-does-not-split", "below-min"],
)
def test_a_waiting_change_stays_valid_when_workers_leave_before_it(
    client: ParameterServerClient, make_job, kit, settings, later, now
) -> None:
    # prepare: a change from step 2 waits; then a removal applies at once
    job, layout, *_ = make_job(**(ELASTIC | settings))
    client.set_members(job, later, "later", from_version=2)
    with contextlib.suppress(GradfleetError):  # refusing the removal is fine too
        client.set_members(job, now, "now")
    # execute: run to step 2
    for step in range(2):
        push_step(client, job, layout, kit, step, client.get_job(job).members)
    # assert: every member set the job took is one set_members would accept
    info = client.get_job(job)
    low, high = settings.get("min_workers", 1), ELASTIC["max_workers"]
    batch = settings.get("global_batch", 0)
    assert info.version == 2
    for _, _, new, _, _ in events(info):
        assert low <= len(new) <= high and not (batch and batch % len(new)), events(info)


def test_two_changes_named_for_later_steps_each_apply_at_their_step(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: worker 3 joins from step 2 and leaves again from step 4
    job, layout, *_ = make_job(**ELASTIC)
    client.set_members(job, [0, 1, 2, 3], "join", from_version=2)
    client.set_members(job, [0, 1, 2], "leave", from_version=4)
    # execute
    for step in range(4):
        push_step(client, job, layout, kit, step, client.get_job(job).members)
    # assert
    info = client.get_job(job)
    assert info.version == 4
    assert events(info) == [
        (2, [0, 1, 2], [0, 1, 2, 3], "join", False),
        (4, [0, 1, 2, 3], [0, 1, 2], "leave", False),
    ]
