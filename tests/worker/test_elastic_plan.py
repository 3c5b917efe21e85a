"""Which rows an elastic job's members read: every row once an epoch whatever the
membership does, equal shares in a step, the same plan from the same events; and local
mode replaying a run's membership events."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import load_dataset
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.worker.elastic import Change, ElasticPlan, Timeline, timeline_of

BATCH = 12  # the global batch; every member set of a "global" timeline divides it
IDS = range(6)  # max_workers 6
DIVIDING = (1, 2, 3, 4, 6)
PER_WORKER = 5  # rows per member of a "per_worker" plan


@st.composite
def timelines(draw: st.DrawFn, sizes: tuple[int, ...]) -> Timeline:
    """Members over steps as a server records them: a change at a step boundary (joins,
    leaves, anything) comes first at its version; after it, changes mid-step only remove
    members (each of `sizes` workers)."""

    def members_of(pool: tuple[int, ...], allowed: list[int]) -> tuple[int, ...]:
        size = draw(st.sampled_from(allowed))
        return tuple(sorted(draw(st.permutations(pool))[:size]))

    current = initial = members_of(tuple(IDS), list(sizes))
    changes: list[Change] = []
    version = 0
    for _ in range(draw(st.integers(0, 6))):
        version += draw(st.integers(0, 4))
        if draw(st.booleans()):  # mid-step: members that had not pushed leave
            smaller = [s for s in sizes if s < len(current)]
            if not smaller:
                continue
            change = Change(version, members_of(current, smaller), mid_step=True)
        else:  # at a boundary, before any mid-step change of that step
            if version == 0 or (changes and changes[-1].version == version):
                version += 1
            new = members_of(tuple(IDS), list(sizes))
            if new == current:
                continue
            change = Change(version, new)
        changes.append(change)
        current = change.members
    return Timeline(initial, tuple(changes))


def global_timelines() -> st.SearchStrategy[Timeline]:
    return timelines(DIVIDING)


def any_timelines() -> st.SearchStrategy[Timeline]:
    return timelines(tuple(range(1, len(IDS) + 1)))


def planned_rows(plan: ElasticPlan, timeline: Timeline, steps: range) -> list[np.ndarray]:
    """The rows of `steps`, every planned member's in worker order."""
    return [plan.indices(s, w, timeline) for s in steps for w in timeline.planned(s)]


# the plan


@settings(max_examples=150, deadline=None)
@given(timeline=global_timelines(), per_epoch=st.integers(1, 6), extra=st.integers(0, 11))
def test_global_batches_read_each_row_at_most_once_an_epoch(
    timeline: Timeline, per_epoch: int, extra: int
) -> None:
    # prepare: `extra` rows beyond whole batches are left out of each epoch
    rows = per_epoch * BATCH + extra
    plan = ElasticPlan(seed=5, rows=rows, policy="global", batch=BATCH)
    permutations = [np.random.default_rng([5, e]).permutation(rows) for e in range(3)]
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        # execute
        planned = np.concatenate(planned_rows(plan, timeline, steps))
        read = [plan.indices(s, w, timeline) for s in steps for w in timeline.members(s)]
        # assert: the planned rows are the epoch's whole batches, each once; the rows read
        # (without members that left mid-step) are some of them
        assert sorted(planned) == sorted(permutations[epoch][: per_epoch * BATCH])
        assert len(np.unique(planned)) == len(planned) == per_epoch * BATCH
        read_rows = np.concatenate(read)
        assert len(np.unique(read_rows)) == len(read_rows)
        assert set(read_rows) <= set(planned)
        if extra == 0:
            assert sorted(planned) == list(range(rows))


@settings(max_examples=150, deadline=None)
@given(timeline=any_timelines(), rows=st.integers(6, 80), steps=st.integers(1, 30))
def test_per_worker_batches_read_the_epochs_one_after_another(
    timeline: Timeline, rows: int, steps: int
) -> None:
    # prepare
    plan = ElasticPlan(seed=9, rows=rows, policy="per_worker", batch=PER_WORKER)
    # execute
    stream = np.concatenate(planned_rows(plan, timeline, range(steps)))
    # assert: every complete epoch is its permutation (each row once), in order; the
    # last one reads each row at most once
    assert len(stream) == timeline.rows_before(steps, PER_WORKER)
    for start in range(0, len(stream), rows):
        epoch = stream[start : start + rows]
        if len(epoch) == rows:
            permutation = np.random.default_rng([9, start // rows]).permutation(rows)
            assert epoch.tolist() == permutation.tolist()
        else:
            assert len(np.unique(epoch)) == len(epoch)


@settings(max_examples=200, deadline=None)
@given(timeline=any_timelines(), per_worker=st.integers(1, 7))
def test_rows_before_is_the_sum_of_the_planned_steps(timeline: Timeline, per_worker: int) -> None:
    # prepare
    last = max([c.version for c in timeline.changes], default=0) + 3
    # execute
    computed = [timeline.rows_before(step, per_worker) for step in range(last)]
    # assert
    brute = [
        sum(per_worker * len(timeline.planned(s)) for s in range(step)) for step in range(last)
    ]
    assert computed == brute


@settings(max_examples=200, deadline=None)
@given(timeline=any_timelines())
def test_planned_and_closing_members_differ_exactly_at_mid_step_changes(
    timeline: Timeline,
) -> None:
    # prepare
    last = max([c.version for c in timeline.changes], default=0) + 3
    mid_steps = {c.version for c in timeline.changes if c.mid_step}
    # execute
    differ = {s for s in range(last) if timeline.planned(s) != timeline.members(s)}
    # assert: a step closes over members it planned for, less those that left mid-step
    assert differ == mid_steps
    for s in range(last):
        assert set(timeline.members(s)) <= set(timeline.planned(s))


@pytest.mark.parametrize("policy", ["global", "per_worker"])
@settings(max_examples=100, deadline=None)
@given(timeline=global_timelines())
def test_every_member_of_a_step_reads_as_many_rows(policy: str, timeline: Timeline) -> None:
    # prepare
    batch = BATCH if policy == "global" else PER_WORKER
    plan = ElasticPlan(seed=1, rows=50, policy=policy, batch=batch)
    last = max([c.version for c in timeline.changes], default=0) + 3
    for step in range(last):
        # execute
        sizes = {len(plan.indices(step, w, timeline)) for w in timeline.members(step)}
        # assert: the share of the members the step was planned over
        share = BATCH // len(timeline.planned(step)) if policy == "global" else PER_WORKER
        assert sizes == {share}


@pytest.mark.parametrize("policy", ["global", "per_worker"])
@settings(max_examples=50, deadline=None)
@given(timeline=global_timelines())
def test_the_same_timeline_gives_the_same_rows(policy: str, timeline: Timeline) -> None:
    # prepare: two plans, asked in opposite orders (each caches a few epochs)
    batch = BATCH if policy == "global" else PER_WORKER
    first, second = (ElasticPlan(seed=3, rows=40, policy=policy, batch=batch) for _ in "ab")
    keys = [(s, w) for s in range(30) for w in timeline.members(s)]
    # execute
    forward = [first.indices(s, w, timeline).tolist() for s, w in keys]
    backward = [second.indices(s, w, timeline).tolist() for s, w in reversed(keys)][::-1]
    again = [first.indices(s, w, timeline).tolist() for s, w in keys]
    # assert
    assert forward == backward == again
    other = ElasticPlan(seed=4, rows=40, policy=policy, batch=batch)
    assert [other.indices(s, w, timeline).tolist() for s, w in keys] != forward


@pytest.mark.parametrize(("policy", "members"), [("global", (0, 2, 5)), ("per_worker", (1, 3))])
def test_async_members_read_disjoint_shares_of_an_epoch(
    policy: str, members: tuple[int, ...]
) -> None:
    # prepare: 60 rows, 20 (or 30) a member; batches of 4 (global 12 over 3) or 5 rows
    plan = ElasticPlan(seed=2, rows=60, policy=policy, batch=BATCH if policy == "global" else 5)
    per_epoch = (60 // len(members)) // (4 if policy == "global" else 5)
    # execute
    shares = [
        np.concatenate([plan.async_indices(own, w, members) for own in range(per_epoch)])
        for w in members
    ]
    # assert
    together = np.concatenate(shares)
    assert len(np.unique(together)) == len(together) == 60
    assert plan.async_indices(per_epoch, members[0], members).tolist() != shares[0][:4].tolist()


def test_timeline_of_a_job_info() -> None:
    # prepare
    info = pb.JobInfo(
        members=[0, 2],
        membership=[
            pb.MembershipEvent(version=3, old=[0, 1], new=[0, 1, 2], reason="join"),
            pb.MembershipEvent(version=5, old=[0, 1, 2], new=[0, 2], reason="lost", mid_step=True),
        ],
    )
    # execute
    timeline, fixed = timeline_of(info), timeline_of(pb.JobInfo(members=[0, 1, 2]))
    # assert
    members = [timeline.members(s) for s in (2, 3, 4, 5, 6)]
    assert members == [(0, 1), (0, 1, 2), (0, 1, 2), (0, 2), (0, 2)]
    assert timeline.planned(5) == (0, 1, 2)
    assert fixed == Timeline((0, 1, 2))


# local replay

EVENTS = [
    {"version": 5, "old": [0, 1], "new": [0, 1, 2], "reason": "join", "mid_step": False},
    {"version": 9, "old": [0, 1, 2], "new": [0, 2], "reason": "lost", "mid_step": True},
]


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def digits_job(data: Any, **changes: Any) -> JobConfig:
    settings_: dict[str, Any] = {
        "model": nn.MLP([64, 32, 10], seed=3, dtype="float64"),
        "dataset": data,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "batch_size": 24,
        "steps": 20,
        "workers": 2,
        "seed": 11,
        "min_workers": 1,
        "max_workers": 3,
    }
    return JobConfig(**(settings_ | changes))


@pytest.mark.parametrize(
    ("policy", "rows"),
    [
        ("global", [24] * 9 + [16] + [24] * 10),  # step 9 loses worker 1's third of 24
        ("per_worker", [24] * 5 + [36] * 4 + [24] * 11),  # 12 rows a member
    ],
)
def test_local_mode_replays_membership_events(digits: Any, policy: str, rows: list[int]) -> None:
    # prepare
    job = digits_job(digits, elastic_batch=policy)
    # execute
    replayed = train(job, backend="local", membership=EVENTS)
    again = train(job, backend="local", membership=EVENTS)
    fixed = train(job, backend="local")
    # assert: every step ran, over the rows the events plan
    assert [h["rows"] for h in replayed.history] == rows
    assert np.isfinite(replayed.losses).all()
    assert replayed.model.flat.tobytes() == again.model.flat.tobytes()
    assert replayed.model.flat.tobytes() != fixed.model.flat.tobytes()
    assert [h["rows"] for h in fixed.history] == [24] * 20


def test_membership_events_for_a_job_that_is_not_elastic_are_refused(digits: Any) -> None:
    # prepare
    job = digits_job(digits, min_workers=None, max_workers=None)
    # execute, assert
    with pytest.raises(ValueError, match="elastic"):
        train(job, backend="local", membership=EVENTS)
