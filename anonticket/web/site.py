"""A Site with no access log that counts its requests, can drain them on stop, caps its
connections, and holds every request to a deadline.

* The site writes no access log, no ``Server:`` header, and never logs a client's address.
* Slow clients cannot hold a site: each site caps its connections (the oldest connection
  waiting for a request is dropped to make room, see :meth:`PrivacySite.buildProtocol`), and a
  request's head and body must arrive within :data:`REQUEST_DEADLINE` of its first byte,
  however often the client trickles a byte.
* Whatever a client sends, the log grows by a bounded amount (:mod:`anonticket.web.ratelog`).

Its connection is :class:`~anonticket.web.channel.PrivacyChannel`, its request
:class:`~anonticket.web.request.LimitedRequest`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.web import server
from twisted.web.resource import Resource

from anonticket import limits
from anonticket.metrics import Metrics
from anonticket.web import HTTP_LOG_NAMESPACE
from anonticket.web.channel import PrivacyChannel
from anonticket.web.guard import BrowserGuard
from anonticket.web.jsonio import MAX_BODY, ApiError, respond_error
from anonticket.web.ratelog import LogBudget
from anonticket.web.request import LimitedRequest

IDLE_TIMEOUT: Final = 60
# From a request's first byte until its body is complete.  A request is at most 16 KiB of
# headers and a 4 KiB body; over Tor that takes a few round trips of a second or two each at
# worst.  A client trickling a byte now and then keeps resetting the idle timeout but not this.
REQUEST_DEADLINE: Final = 10.0
# How often a site looks for requests past their deadline (at most this late).
_SWEEP_INTERVAL: Final = 1.0

log = Logger(namespace=HTTP_LOG_NAMESPACE)


class _Guard(Resource):
    """Answers what must not reach the routes with a JSON error, before Klein sees it:

    * a URL Klein cannot decode (Klein would log the URL and answer text/plain): 400;
    * on a site with a :class:`~anonticket.web.guard.BrowserGuard` (the internal one), a
      foreign ``Host`` or a request from another site's web page: 403.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request: server.Request) -> bytes | int:
        try:
            b"/".join(request.postpath or ()).decode("utf-8")
        except UnicodeDecodeError:
            return _answer_now(request, ApiError(400, "bad_request", "URL is not valid UTF-8"))
        site = getattr(request, "site", None)
        if isinstance(site, PrivacySite) and site.guard is not None:
            refused = site.guard.refusal(request)
            if refused is not None:
                return _answer_now(request, ApiError(403, *refused))
        result: bytes | int = self.inner.render(request)
        return result


def _answer_now(request: server.Request, error: ApiError) -> int:
    # Written here rather than returned: twisted.web logs a returned body for a HEAD request
    # together with the request's repr, which holds its URL (a token, perhaps).
    request.write(respond_error(request, error))
    request.finish()
    return server.NOT_DONE_YET


class PrivacySite(server.Site):
    """A Site with no access log that counts its requests, can drain them on stop, caps its
    connections, and holds every request to a deadline.

    :param max_connections: the most connections held at once (default: by ``name``, from
        :mod:`anonticket.limits`; :class:`~anonticket.web.service.SiteService` lowers it to fit
        the open-file limit).
    :param request_deadline: seconds from a request's first byte until its body is complete.
    :param browser_guard: refuse foreign ``Host`` values and cross-site browser requests
        (default: only for the site named ``internal``).
    :param max_body: the largest request body taken (default :data:`MAX_BODY`; the public
        site of a pass issuer takes :data:`PASS_BATCH_BODY` for a batch of token requests).
    """

    protocol = PrivacyChannel  # type: ignore[assignment]  # no HTTP/2 negotiation wrapper
    requestFactory = LimitedRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: Resource,
        *,
        name: str,
        metrics: Metrics,
        clock: IReactorTime,
        timeout: float = IDLE_TIMEOUT,
        max_connections: int | None = None,
        request_deadline: float = REQUEST_DEADLINE,
        browser_guard: bool | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        super().__init__(_Guard(resource), timeout=timeout)
        self.max_body = max_body
        self.name = name
        self.metrics = metrics
        self.clock = clock
        self.max_connections = (
            max_connections if max_connections is not None else limits.default_cap(name)
        )
        self.request_deadline = request_deadline
        guarded = name == "internal" if browser_guard is None else browser_guard
        self.guard = BrowserGuard() if guarded else None
        self.log_budget = LogBudget(clock.seconds)
        self.channels: set[PrivacyChannel] = set()
        # Connections not handling a request, longest waiting first: dropped first at the cap.
        self._waiting: OrderedDict[PrivacyChannel, None] = OrderedDict()
        # Connections whose request is arriving, by its first byte (so oldest first).
        self._receiving: OrderedDict[PrivacyChannel, float] = OrderedDict()
        self._evicting = 0  # aborted, not yet closed: they still hold a descriptor
        # Totals since start (anonticket_http_connections_dropped_total, read when scraped).
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        metrics.watch_site(self)
        self._sweeper: LoopingCall | None = None
        self.in_flight = 0
        self._drained: list[Deferred[None]] = []
        self._closed: list[Deferred[None]] = []
        # Labelled children looked up once: labels() takes a lock and builds a key every call.
        # Both label sets are small and fixed (routes, status codes).  The in-flight gauge is
        # read when scraped instead of being moved twice per request.
        metrics.requests_in_flight.labels(name).set_function(lambda: self.in_flight)
        self._durations: dict[str, Any] = {}
        self._responses: dict[tuple[str, int], Any] = {}

    def log(self, request: object) -> None:
        """No access log: a request line can hold a token, and who asked is nobody's business."""

    # -- where the site listens ------------------------------------------------------------

    def listening_on(self, address: object) -> None:
        """The site's own address, once bound: its name is a valid ``Host`` for the guard, and on
        a unix socket a request may come without one."""
        if self.guard is None:
            return
        if isinstance(address, UNIXAddress):
            self.guard.unix = True
        elif isinstance(address, IPv6Address):
            self.guard.names |= {b"[" + address.host.lower().encode("ascii") + b"]"}
        elif isinstance(address, IPv4Address):
            self.guard.names |= {address.host.encode("ascii")}

    # -- the connection cap ------------------------------------------------------------------

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel for a new connection, or None (Twisted then closes the socket at once).

        At the cap, the connection that has waited longest for a request is dropped to make
        room, so a client that sends its request promptly gets in however many idle or
        trickling connections an attacker keeps opening; refusing newcomers instead would let
        those lock everyone out.  Only when every connection is busy with a request (or too
        many dropped ones are still closing) is the newcomer refused.
        """
        if len(self.channels) - self._evicting >= self.max_connections:
            if not self._waiting or self._evicting >= limits.EVICT_SLACK:
                self.refused += 1
                self._note_full()
                return None
            victim, _ = self._waiting.popitem(last=False)
            self._receiving.pop(victim, None)
            self._evicting += 1
            self.evicted += 1
            victim.evict()
            self._note_full()
        return super().buildProtocol(addr)

    @property
    def live_connections(self) -> int:
        """Connections held, not counting those dropped and about to close."""
        return len(self.channels) - self._evicting

    def _note_full(self) -> None:
        self.log_budget.emit(
            log,
            LogLevel.warn,
            ("full", self.name),
            "{site} site at its cap of {cap} connections: dropping the longest waiting "
            "({dropped} so far), refusing when all are busy ({refused} so far)",
            site=self.name,
            cap=self.max_connections,
            dropped=self.evicted,
            refused=self.refused,
        )

    def channel_opened(self, channel: PrivacyChannel) -> None:
        self.channels.add(channel)
        self._waiting[channel] = None

    def receiving_started(self, channel: PrivacyChannel) -> None:
        now = self.clock.seconds()
        channel.receiving_since = now
        self._receiving[channel] = now

    def request_arrived(self, channel: PrivacyChannel) -> None:
        self._waiting.pop(channel, None)
        channel.receiving_since = None
        self._receiving.pop(channel, None)

    def waiting_again(self, channel: PrivacyChannel) -> None:
        if not channel.evicted:
            self._waiting[channel] = None

    # -- the request deadline ----------------------------------------------------------------

    def startFactory(self) -> None:
        super().startFactory()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(min(_SWEEP_INTERVAL, self.request_deadline / 4), now=False)

    def stopFactory(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        super().stopFactory()

    def _sweep(self) -> None:
        """Cut the requests whose first byte is older than the deadline (oldest first, so the
        walk stops at the first one still in time)."""
        started_before = self.clock.seconds() - self.request_deadline
        cut = 0
        while self._receiving:
            channel, since = next(iter(self._receiving.items()))
            if since > started_before:
                break
            del self._receiving[channel]
            channel.receiving_since = None
            cut += 1
            channel.deadline_passed()
        if cut:
            self.timed_out += cut
            self.log_budget.emit(
                log,
                LogLevel.info,
                ("deadline", self.name),
                "{site} site: {count} requests not received within {deadline}s, cut off",
                site=self.name,
                count=cut,
                deadline=self.request_deadline,
            )

    # -- requests and connections in flight --------------------------------------------------

    def count_response(self, route: str, code: int) -> None:
        child = self._responses.get((route, code))
        if child is None:
            child = self.metrics.http_responses.labels(self.name, route, str(code))
            self._responses[(route, code)] = child
        child.inc()

    def request_started(self, request: LimitedRequest) -> None:
        self.in_flight += 1
        request.started_at = self.clock.seconds()

    def request_done(self, request: LimitedRequest) -> None:
        """The request is answered, or its client has gone: exactly once per started one."""
        self.in_flight -= 1
        route = request.route_label
        duration = self._durations.get(route)
        if duration is None:
            duration = self.metrics.http_duration.labels(self.name, route)
            self._durations[route] = duration
        duration.observe(self.clock.seconds() - request.started_at)
        if request.finished:
            self.count_response(route, request.code)
        if self.in_flight == 0:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires once no request is in flight."""
        return self._when(self.in_flight == 0, self._drained)

    def channel_closed(self, channel: PrivacyChannel) -> None:
        self.channels.discard(channel)
        self._waiting.pop(channel, None)
        self._receiving.pop(channel, None)
        if channel.evicted:
            self._evicting -= 1
        if not self.channels:
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)

    def closed(self) -> Deferred[None]:
        """Fires once every connection is gone (its last bytes flushed to the client)."""
        return self._when(not self.channels, self._closed)

    @staticmethod
    def _when(now: bool, waiters: list[Deferred[None]]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if now:
            d.callback(None)
        else:
            waiters.append(d)
        return d
