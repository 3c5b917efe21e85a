"""Async mode: apply on arrival, reject gradients staler than the bound."""

from __future__ import annotations

import pickle

import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import Reason, StaleGradient
from gradfleet.proto.v1 import parameter_server_pb2 as pb


def test_each_gradient_is_applied_on_arrival(client: ParameterServerClient, make_job, kit) -> None:
    # prepare
    job, layout, _, ref = make_job(num_workers=2, mode="async", staleness_bound=2)
    pushes = [(0, 0), (1, 0), (0, 1)]  # (worker, version the gradient was computed on)
    # execute
    acks = [client.push_gradient(job, w, s, 2, 1.0, kit.gradient(layout, w, s)) for w, s in pushes]
    version, weights = client.pull_weights(job, min_version=3)
    # assert
    assert [a.version for a in acks] == [1, 2, 3]
    assert version == 3
    for w, s in pushes:
        expected = ref.async_step(kit.gradient(layout, w, s))
    assert weights.tobytes() == expected.tobytes()


def test_too_stale_gradient_fails_precondition_and_changes_nothing(
    client: ParameterServerClient, make_job, state_of, kit
) -> None:
    # prepare: bound 1, version 2 -> gradients computed on version 0 are too stale
    job, layout, *_ = make_job(num_workers=2, mode="async", staleness_bound=1)
    client.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
    client.push_gradient(job, 0, 1, 1, 1.0, kit.gradient(layout, 0, 1))
    before = state_of(job)
    # execute
    with pytest.raises(StaleGradient) as err:
        client.push_gradient(job, 1, 0, 1, 1.0, kit.gradient(layout, 1, 0))
    after = state_of(job)
    within_bound = client.push_gradient(job, 1, 1, 1, 1.0, kit.gradient(layout, 1, 1))
    # assert
    assert err.value.code.name == "FAILED_PRECONDITION"
    assert "too stale" in err.value.message
    assert after[:2] == before[:2] and after[0] == 2
    assert after[2].accepted == before[2].accepted == 2
    assert within_bound.outcome == pb.PUSH_OUTCOME_ACCEPTED and within_bound.version == 3
    assert client.get_job(job).counters.rejected["stale"] == 1


def test_a_stale_exchange_is_refused_once_with_its_reason(
    client: ParameterServerClient, make_job, kit
) -> None:
    # prepare: bound 1, version 2
    job, layout, *_ = make_job(num_workers=2, mode="async", staleness_bound=1)
    client.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
    client.push_gradient(job, 0, 1, 1, 1.0, kit.gradient(layout, 0, 1))
    # execute: a worker's whole exchange (one call) with a gradient of version 0
    with pytest.raises(StaleGradient) as err:
        client.push_and_pull(job, 1, 0, 1, 1.0, kit.gradient(layout, 1, 0))
    counters = client.get_job(job).counters
    # assert: the type and reason travel with the error (and through pickling, as from a
    # Ray actor), and the refused gradient was sent and counted once
    assert err.value.code.name == "FAILED_PRECONDITION" and err.value.reason is Reason.STALE
    unpickled = pickle.loads(pickle.dumps(err.value))
    assert isinstance(unpickled, StaleGradient) and unpickled.reason is Reason.STALE
    assert counters.received == 3 and counters.rejected["stale"] == 1


def test_async_retry_is_a_duplicate(client: ParameterServerClient, make_job, kit) -> None:
    # prepare
    job, layout, *_ = make_job(num_workers=1, mode="async", staleness_bound=4)
    grad = kit.gradient(layout, 0, 0)
    client.push_gradient(job, 0, 0, 1, 1.0, grad)
    # execute
    retry = client.push_gradient(job, 0, 0, 1, 1.0, grad)
    # assert
    assert retry.outcome == pb.PUSH_OUTCOME_DUPLICATE
    info = client.get_job(job)
    assert info.version == 1 and info.counters.duplicate == 1
