"""The client's one retry policy: how long it tries a server that does not answer, and
how it follows a server that moved (a server actor restarted on another node)."""

from __future__ import annotations

import socket
import time

import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import Reason, ServerUnavailable
from gradfleet.server import serve


def _dead_address() -> str:
    """A loopback address nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_server_is_tried_for_the_clients_patience_then_given_up() -> None:
    # prepare: the server's locator keeps naming the same dead address
    dead = _dead_address()
    asked: list[str] = []

    def locate() -> str:
        asked.append(dead)
        return dead

    with ParameterServerClient(dead, timeout=5, patience=1.0, locate=locate) as client:
        started = time.monotonic()
        # execute
        with pytest.raises(ServerUnavailable) as err:
            client.list_jobs()
        waited = time.monotonic() - started
    # assert: it asked where the server is while it was patient, then gave up clearly
    assert asked and waited >= 1.0
    assert err.value.reason is Reason.UNREACHABLE and dead in str(err.value)


def test_a_server_that_moved_is_followed_and_each_new_address_gets_full_patience() -> None:
    # prepare: the locator names two dead addresses, one after the other, then the live one
    with serve(port=0) as server:
        addresses = iter([_dead_address(), _dead_address(), server.address])
        first = _dead_address()
        # execute: each new address restarts the patience, which alone would have run out
        with ParameterServerClient(
            first, timeout=5, patience=0.5, locate=lambda: next(addresses)
        ) as client:
            jobs = client.list_jobs()
            followed = client.address
    # assert
    assert jobs == [] and followed == server.address
