"""`init_ray` starts Ray a second time only when its GCS never came up (unit test)."""

from __future__ import annotations

from typing import Any

import pytest

from gradfleet.worker import ray_runner

GCS_TIMEOUT = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"


def test_a_gcs_that_never_came_up_is_started_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def fake_init(**kwargs: Any) -> str:
        calls.append(("init", kwargs))
        if len(calls) == 1:
            raise RuntimeError(GCS_TIMEOUT)
        return "context"

    monkeypatch.setattr(ray_runner.ray, "init", fake_init)
    monkeypatch.setattr(ray_runner.ray, "shutdown", lambda: calls.append(("shutdown", {})))
    assert ray_runner.init_ray(address="local", num_cpus=2) == "context"
    assert calls == [
        ("init", {"address": "local", "num_cpus": 2}),
        ("shutdown", {}),
        ("init", {"address": "local", "num_cpus": 2}),
    ]


def test_other_start_errors_are_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_init(**kwargs: Any) -> None:
        raise RuntimeError("Could not find any running Ray instance at 10.0.0.1:6379")

    monkeypatch.setattr(ray_runner.ray, "init", fake_init)
    with pytest.raises(RuntimeError, match="Could not find"):
        ray_runner.init_ray(address="10.0.0.1:6379")
