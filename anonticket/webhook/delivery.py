"""Deliver the outbox's events to ``--webhook-url`` as signed Standard Webhooks.

Every node runs one :class:`WebhookService`.  Each second (and at once after a change here
wrote an event, or a delivery finished) it leases the events that are due from the store -
the oldest waiting event of each token, so a token's events arrive in order - and POSTs them,
a few at a time.  2xx is delivered; anything else, a timeout or a refused connection is tried
again after the next delay of ``--webhook-retry-schedule`` (with jitter), and after the last
one the event is *failed*: kept, listed and retried from the internal site.  A lease that runs
out (a node died mid-delivery) lets another node deliver it: at least once, and receivers
deduplicate by ``webhook-id``.  Nothing here ever waits for a receiver on a request's path.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from anonticket.httpbody import BodyTooLarge, BytesProducer, read_capped
from anonticket.keys import load_or_create_key_file
from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.outbox import Due, EventState
from anonticket.webhook.signing import Signer

DEFAULT_SCHEDULE: Final = (5, 300, 1800, 7200, 18000, 36000, 36000)  # ~27.6 h in all
TIMEOUT: Final = 10.0  # seconds for one attempt: connect, send, and the whole answer
LEASE: Final = 60  # seconds a node holds an event it is delivering (well above TIMEOUT)
CONCURRENCY: Final = 8  # deliveries in flight per node (on different tokens)
INTERVAL: Final = 1.0  # seconds between looks for due events (retries, other nodes' events)
BACKLOG_EVERY: Final = 5.0  # seconds between refreshes of the backlog metrics (a count of
# the waiting events: ~5 ms at 20,000 on SQLite, so not at every look, which every change makes)
MAX_ANSWER: Final = 64 * 1024  # bytes of a receiver's answer read (and dropped) at most
JITTER: Final = 0.1  # each delay is drawn within +-10 %

log = Logger()


NODE_FILE: Final = "node.id"


def load_node_id(data_dir: Path) -> str:
    """This node's id, made at first start (``<data-dir>/node.id``): each node of a database
    has its own data directory, so its own id."""
    raw, _ = load_or_create_key_file(
        data_dir / NODE_FILE,
        lambda: secrets.token_hex(16).encode("ascii"),
        size=32,
        if_lost="delete it: a new one is made at start",
    )
    return raw.decode("ascii", "replace")


class WebhookService(Service):
    name = "webhooks"

    def __init__(
        self,
        store: Store,
        reactor: Any,
        url: str,
        signer: Callable[[], Signer],
        metrics: Metrics,
        schedule: Sequence[int] = DEFAULT_SCHEDULE,
        *,
        agent: Agent | None = None,
        rng: Callable[[], float] = random.random,
        interval: float = INTERVAL,
        node: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        """``signer`` and ``node`` are called at start: they read or make the signing key and
        this node's id in the data directory, which the store prepares first.  The node id
        names the leases this node takes; a restart with the same id takes them back at once
        (see :func:`load_node_id`)."""
        self._store = store
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._url = url.encode("ascii")
        self._make_signer = signer
        self._signer: Signer | None = None
        self._make_node = node
        self._node = ""
        self._released = False
        self._metrics = metrics
        self._schedule = tuple(schedule)
        self._agent = agent
        self._pool: HTTPConnectionPool | None = None
        self._rng = rng
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[LoopingCall] | None = None
        self._in_flight: dict[int, Deferred[None]] = {}  # outbox row -> its delivery
        self._looking: Deferred[None] | None = None
        self._kicked = False
        self._look_again = False  # kicked while a look ran: the event may be after its read
        self._backlog_at: float | None = None
        self._failing = False  # the receiver's last answer was not a 2xx (for the log)

    def startService(self) -> None:
        self._signer = self._make_signer()
        self._node = self._make_node()
        super().startService()
        if self._agent is None:
            self._pool = HTTPConnectionPool(self._reactor, persistent=True)
            self._pool.maxPersistentPerHost = CONCURRENCY
            self._agent = Agent(self._reactor, pool=self._pool, connectTimeout=TIMEOUT)
        self._store.event_written = self.kick
        self._loop = LoopingCall(self._look)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self._interval, now=True)

    async def _stop(self) -> None:
        self._store.event_written = lambda: None
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._looking is not None:
            await self._looking
        # A delivery cut short is not settled: its lease runs out and it is sent again (the
        # receiver deduplicates by webhook-id).
        for delivery in list(self._in_flight.values()):
            delivery.cancel()
        await DeferredList(list(self._in_flight.values()), consumeErrors=True)
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    def kick(self) -> None:
        """Look for due events at the end of this reactor turn (an event was just written)."""
        if not self._kicked and self.running:
            self._kicked = True
            self._clock.callLater(0, self._kick_now)

    def _kick_now(self) -> None:
        self._kicked = False
        if not self.running:
            return
        if self._looking is None:
            self._look()
        else:
            # The running look may have read the table before this event committed (another
            # connection on PostgreSQL): look again when it is done, not a second later.
            self._look_again = True

    def _look(self) -> Deferred[None] | None:
        if self._looking is not None:
            return self._looking  # one look at a time; the loop waits for it
        self._looking = Deferred.fromCoroutine(self._take())

        def done(_: object) -> None:
            self._looking = None
            if self._look_again:
                self._look_again = False
                self.kick()

        self._looking.addBoth(done)
        return self._looking

    async def _take(self) -> None:
        if not self._released:
            try:
                await self._store.release_event_leases(self._node)
                self._released = True
            except Exception as e:
                self._store_failed("release_event_leases", e)
                return
        now = int(self._clock.seconds())
        if self._backlog_at is None or self._clock.seconds() - self._backlog_at >= BACKLOG_EVERY:
            self._backlog_at = self._clock.seconds()
            await self._refresh_backlog(now)
        free = CONCURRENCY - len(self._in_flight)
        if free <= 0:
            return
        try:
            due = await self._store.take_due_events(now, LEASE, free, self._node)
        except Exception as e:
            self._store_failed("take_due_events", e)
            return
        for event in due:
            if event.row in self._in_flight:
                continue  # still ours from before (cannot happen while the lease holds)
            delivery = Deferred.fromCoroutine(self._deliver(event))
            self._in_flight[event.row] = delivery
            delivery.addBoth(self._delivered, event.row)

    def _delivered(self, result: object, row: int) -> None:
        self._in_flight.pop(row, None)
        self.kick()  # the token's next event may be due now

    async def _refresh_backlog(self, now: int) -> None:
        try:
            backlog = await self._store.event_backlog()
        except Exception as e:
            self._store_failed("event_backlog", e)
            return
        self._metrics.webhook_backlog.set(backlog.waiting)
        self._metrics.webhook_failed.set(backlog.failed)
        age = 0 if backlog.oldest is None else max(0, now - backlog.oldest)
        self._metrics.webhook_oldest_age.set(age)

    async def _deliver(self, event: Due) -> None:
        error = await self._post(event)
        now = int(self._clock.seconds())
        attempt = event.attempts + 1
        if error is None:
            outcome, state, retry_at = "delivered", EventState.DELIVERED, None
        elif attempt > len(self._schedule):
            outcome, state, retry_at = "failed", EventState.FAILED, None
        else:
            delay = self._schedule[attempt - 1] * (1 + JITTER * (2 * self._rng() - 1))
            outcome, state, retry_at = "retry", EventState.WAITING, now + math.ceil(delay)
        self._metrics.webhook_deliveries.labels(outcome).inc()
        self._note_receiver(error)
        if outcome == "failed":
            log.warn(
                "webhook: an event failed for good after {attempts} attempts ({error}); "
                "retry it from the internal site",
                attempts=attempt,
                error=error,
            )
        try:
            await self._store.settle_event(event.row, state, now, error, retry_at)
        except Exception as e:
            # Not recorded: the lease runs out and it is tried again (at least once).
            self._store_failed("settle_event", e)

    async def _post(self, event: Due) -> str | None:
        """One attempt; None when the receiver answered 2xx, else why not (a short code)."""
        assert self._agent is not None and self._signer is not None
        timestamp = int(self._clock.seconds())
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"webhook-id": [event.event_id.encode("ascii")],
                b"webhook-timestamp": [b"%d" % timestamp],
                b"webhook-signature": [
                    self._signer.sign(event.event_id, timestamp, event.body).encode("ascii")
                ],
            }
        )
        attempt = Deferred.fromCoroutine(self._exchange(headers, event.body))
        attempt.addTimeout(TIMEOUT, self._clock)
        try:
            code = await attempt
        except CancelledError:
            raise  # stopping: not an attempt
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except (ConnectError, DNSLookupError):
            return "unreachable"
        except BodyTooLarge:
            return "answer_too_large"
        except Exception as e:
            return "error_" + type(e).__name__
        return None if 200 <= code < 300 else f"http_{code}"

    async def _exchange(self, headers: Headers, body: bytes) -> int:
        assert self._agent is not None
        # No redirects: a receiver's 3xx is not a delivery, and must not send events elsewhere.
        response = await self._agent.request(b"POST", self._url, headers, BytesProducer(body))
        await read_capped(response, MAX_ANSWER)  # read whole, so the connection is reusable
        code: int = response.code
        return code

    def _note_receiver(self, error: str | None) -> None:
        """One line when the receiver starts failing and one when it answers again."""
        if error is not None and not self._failing:
            self._failing = True
            log.warn("webhook: the receiver is not taking events ({error}); retrying", error=error)
        elif error is None and self._failing:
            self._failing = False
            log.info("webhook: the receiver takes events again")

    def _store_failed(self, operation: str, error: Exception) -> None:
        self._metrics.store_errors.labels(operation).inc()
        log.warn(
            "webhook: the store failed ({operation}): {error_type}; trying again",
            operation=operation,
            error_type=type(error).__name__,
        )
