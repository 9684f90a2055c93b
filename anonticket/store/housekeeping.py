"""Forgetting what the store keeps only for a while: Idempotency-Keys past their retention,
events delivered a week ago (kept that long to answer "did you send it?"), and used passes of
issuer keys no pass verifies under any more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from anonticket.store import Store

PURGE_INTERVAL: Final = 600.0  # seconds between purges: a key lives at most this much longer
PURGE_BATCH: Final = 10_000  # keys deleted per transaction: bounds how long one holds the lock
MAX_BATCHES: Final = 100  # per purge; a backlog bigger than a million keys takes several
DELIVERED_RETENTION: Final = 7 * 86_400  # seconds a delivered event is kept

log = Logger()


class PurgeService(Service):
    """Every :data:`PURGE_INTERVAL` seconds, deletes the Idempotency-Keys older than
    ``retention`` seconds and the events delivered more than :data:`DELIVERED_RETENTION`
    seconds ago, a batch at a time.  Every node runs it; they delete the same rows,
    which is harmless.  A failure is logged and counted, and the next run tries again."""

    name = "purge"

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        retention: int,
        failed: Callable[[], None] = lambda: None,
        interval: float = PURGE_INTERVAL,
        oldest_pass_period: Callable[[float], int] | None = None,
    ) -> None:
        """``oldest_pass_period``: the oldest issuer key period a pass still verifies under
        (with --pass-price); used passes of older keys are forgotten."""
        self._store = store
        self._clock = clock
        self._retention = retention
        self._failed = failed
        self._interval = interval
        self._oldest_pass_period = oldest_pass_period
        self._loop: LoopingCall | None = None
        self._done: Deferred[LoopingCall] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self._purge()))
        self._loop.clock = self._clock
        self._done = self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is None or not loop.running:
            return None
        loop.stop()
        done = self._done
        assert done is not None
        # A purge in flight finishes before the store (stopped after this) closes its pool.
        return done.addCallback(lambda _: None)

    async def _purge(self) -> None:
        now = int(self._clock.seconds())
        await self._purge_one(
            "Idempotency-Keys past retention", self._store.purge_idempotency, now - self._retention
        )
        await self._purge_one(
            "delivered events", self._store.purge_delivered_events, now - DELIVERED_RETENTION
        )
        if self._oldest_pass_period is not None:
            await self._purge_one(
                "used passes of expired keys",
                self._store.purge_used_passes,
                self._oldest_pass_period(now),
            )

    async def _purge_one(
        self, what: str, purge: Callable[[int, int], Deferred[int]], before: int
    ) -> None:
        purged = 0
        try:
            for _ in range(MAX_BATCHES):
                gone = await purge(before, PURGE_BATCH)
                purged += gone
                if gone < PURGE_BATCH:
                    break
        except Exception as e:
            self._failed()
            log.warn(
                "purge: forgetting {what} failed: {error_type}",
                what=what,
                error_type=type(e).__name__,
            )
            return
        if purged:
            log.info("purge: forgot {count} {what}", count=purged, what=what)
