"""What the monitor records of the wallet's answers, and the state it resumes from."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred

from anonticket.store import queries
from anonticket.store.pool import StorePool
from anonticket.store.records import MonitorState, RecordResult, Transfer


class StoreIngest(StorePool):
    """The monitor's side of the store."""

    def record_transfers(
        self,
        transfers: Sequence[Transfer],
        now: int,
        cursor: int | None = None,
        wallet_height: int | None = None,
        recheck: tuple[int, int] | None = None,
        sweep: int | None = None,
        trusted_height: int | None = None,
    ) -> Deferred[RecordResult]:
        """Record one answer of the wallet (see :func:`queries.record_transfers`)."""
        d = self._run(
            queries.record_transfers,
            self.tagger,
            list(transfers),
            now,
            cursor,
            wallet_height,
            recheck,
            sweep,
            trusted_height,
            self.events,
        )

        def notify(result: RecordResult) -> RecordResult:
            if result.reversed.get("claimed") or result.restored.get("claimed"):
                self._written()
            for tag in result.stale_pids:
                if self._known is not None:
                    self._known.add(tag)
                self.unknown.discard(tag)
            if result.stale_pids:
                self.redeem_answers.invalidate(result.stale_pids)
            if result.stale_tokens:
                self.token_answers.invalidate(result.stale_tokens)
            return result

        d.addCallback(notify)
        return d

    def monitor_state(self) -> Deferred[MonitorState]:
        return self._run(queries.monitor_state)
