"""The outbox of events (:mod:`anonticket.store.outbox`) for the webhook delivery and the
internal site."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from anonticket.store import outbox
from anonticket.store.pool import StorePool


class StoreEvents(StorePool):
    """Events taken, settled, listed and retried."""

    def take_due_events(
        self, now: int, lease: int, limit: int, owner: str
    ) -> Deferred[list[outbox.Due]]:
        return self._run(outbox.take_due, now, lease, limit, owner)

    def release_event_leases(self, owner: str) -> Deferred[int]:
        return self._run(outbox.release_leases, owner)

    def settle_event(
        self,
        row: int,
        state: outbox.EventState,
        now: int,
        error: str | None = None,
        retry_at: int | None = None,
    ) -> Deferred[None]:
        return self._run(outbox.settle, row, state, now, error, retry_at)

    def event_backlog(self) -> Deferred[outbox.Backlog]:
        return self._run(outbox.backlog)

    def failed_events(self, limit: int, after: int | None) -> Deferred[list[outbox.FailedEvent]]:
        return self._run(outbox.failed_events, limit, after)

    def retry_failed_events(self, event_id: str | None, now: int) -> Deferred[int]:
        """Make one failed event (or, with None, every one) due again; how many."""
        return self._run(outbox.retry_failed, event_id, now)

    def purge_delivered_events(self, before: int, limit: int = 10_000) -> Deferred[int]:
        return self._run(outbox.purge_delivered, before, limit)
