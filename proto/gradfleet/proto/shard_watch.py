"""Keeps the shards of a running job at one version after one of them was rebuilt."""

from __future__ import annotations

import logging
import time

from gradfleet.proto.sharded import ShardedClient

log = logging.getLogger(__name__)


class ShardWatch:
    """Checked at every poll of a running sharded job by whoever drives it.

    When a shard's state was rebuilt from disk (its process or node was lost), every
    shard goes back to the newest version all of them hold (`ShardedClient.agree`).
    A push that reached a shard while that happened can close a step there after the
    others went back: that shard is then one step ahead and nobody pushes the step the
    others miss. So after an agreement the watch stays open until every shard has
    closed a step past it, and agrees again when the shards stay at different versions
    with none closing a step for `settle` seconds.
    """

    def __init__(self, client: ShardedClient, job_id: str, settle: float = 5.0) -> None:
        self.client, self.job_id, self.settle = client, job_id, settle
        self._incarnations: list[int] = []
        self._open: tuple[int, float] | None = None  # (oldest version, seen since)

    def check(self) -> None:
        infos = self.client.shard_infos(self.job_id)
        incarnations = [info.incarnation for info in infos]
        versions = [info.version for info in infos]
        rebuilt = bool(self._incarnations) and incarnations != self._incarnations
        if rebuilt or self._stuck(versions):
            target = self.client.agree(self.job_id)
            self._open = (target, time.monotonic())
            incarnations = self.client.incarnations(self.job_id)
        self._incarnations = incarnations

    def _stuck(self, versions: list[int]) -> bool:
        """Whether the shards stayed apart, with no step closed, for `settle` seconds
        since the last agreement (the watch closes once every shard is past it)."""
        if self._open is None:
            return False
        agreed, since = self._open
        oldest, now = min(versions), time.monotonic()
        if oldest > agreed:
            self._open = None
            return False
        if len(set(versions)) == 1:
            self._open = (agreed, now)
            return False
        if now - since < self.settle:
            return False
        log.warning("job %s: shards stuck at versions %s", self.job_id, versions)
        return True
