"""The store as a twistd service: opened at start, closed last, kept in step meanwhile."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:  # the package assembles Store and offers this service beside it
    from anonticket.store import Store

# The namespace these lines had before the store package was split: log filters keep working.
log = Logger(namespace="anonticket.store")


class StoreService(Service):
    """Opens the store when started and closes it when stopped (after the sites and monitor);
    meanwhile keeps its filter of known PIDs and its answer caches in step with the database."""

    name = "store"

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        sync_interval: float = 1.0,
        failed: Callable[[str], None] = lambda operation: None,
    ) -> None:
        """``failed(operation)`` counts a refresh that failed (``sync_known``, ``sync_tokens``):
        the metric the store-error alert reads."""
        self.store = store
        self._clock = clock
        self._interval = sync_interval
        self._failed = failed
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[LoopingCall] | None = None

    def startService(self) -> None:
        self.store.open()
        super().startService()
        self._loop = LoopingCall(self._sync)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self._interval, now=False)

    def _sync(self) -> Deferred[list[None]]:
        def failed(failure: Failure, what: str, operation: str) -> None:
            # Never let the loop die: the next tick tries again.
            self._failed(operation)
            log.warn(
                "store: refreshing the {what} failed: {error_type}",
                what=what,
                error_type=failure.type.__name__ if failure.type else "error",
            )

        return gatherResults(
            [
                self.store.sync_known().addErrback(failed, "known-PID filter", "sync_known"),
                self.store.sync_tokens().addErrback(failed, "token answers", "sync_tokens"),
            ]
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
            if self._loop_done is not None:
                await self._loop_done  # a refresh in flight finishes before the pool closes
        self.store.close()
