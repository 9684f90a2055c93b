"""HTTP plumbing shared by both sites: JSON in and out, body limits, and a Site that logs nothing.

* Every response is JSON, errors included: ``{"error": "<message>", "code": "<stable code>"}``.
  No traceback, SQL, path or library message reaches a client.
* Bodies over :data:`MAX_BODY` are refused with 413 as soon as the length is known (or the
  chunked body crosses the limit), before anything is buffered; the rest is read and dropped.
* The site writes no access log, no ``Server:`` header, and never logs a client's address.
* Slow clients cannot hold a site: each site caps its connections (the oldest connection
  waiting for a request is dropped to make room, see :meth:`PrivacySite.buildProtocol`), and a
  request's head and body must arrive within :data:`REQUEST_DEADLINE` of its first byte,
  however often the client trickles a byte.
* Whatever a client sends, the log grows by a bounded amount (:mod:`anonticket.web.ratelog`).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from io import BytesIO
from typing import Any, Final, NoReturn, TypeVar, cast

from klein import Klein
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from anonticket import limits
from anonticket.domain import DomainError
from anonticket.metrics import Metrics
from anonticket.web.guard import BrowserGuard, routing_host
from anonticket.web.ratelog import LogBudget

MAX_BODY: Final = 4096
# A batch of 100 pass token requests in JSON (base64url, 73 bytes each with quotes and comma).
PASS_BATCH_BODY: Final = 8192
# After a 413, keep reading (and dropping) this much before hanging up, so the client sees our
# answer instead of a connection reset caused by unread data.
_DISCARD_LIMIT: Final = 64 * 1024
_REJECT_GRACE: Final = 1.0
IDLE_TIMEOUT: Final = 60
# From a request's first byte until its body is complete.  A request is at most 16 KiB of
# headers and a 4 KiB body; over Tor that takes a few round trips of a second or two each at
# worst.  A client trickling a byte now and then keeps resetting the idle timeout but not this.
REQUEST_DEADLINE: Final = 10.0
# How often a site looks for requests past their deadline (at most this late).
_SWEEP_INTERVAL: Final = 1.0
_DEADLINE_GRACE: Final = 1.0  # to flush the 408 before the connection is aborted

log = Logger()

T = TypeVar("T")


class ApiError(Exception):
    """An error answer: HTTP status, stable code, stable message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        fields: dict[str, object] | None = None,
    ) -> None:
        """``fields``: more members of the JSON answer (e.g. the balance of a refusal)."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.fields = fields or {}


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


# Made once: json.dumps/json.loads with any option build a new encoder/decoder on every call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def json_body(obj: object) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def _error_bytes(code: str, message: str) -> bytes:
    return json_body({"error": message, "code": code})


def respond(request: IRequest, obj: object, status: int = 200) -> bytes:
    return respond_body(request, json_body(obj), status)


def respond_body(request: IRequest, body: bytes, status: int = 200) -> bytes:
    """Answer with ``body``, already JSON."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


def respond_error(request: IRequest, error: ApiError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return respond(
        request, {"error": error.message, "code": error.code, **error.fields}, error.status
    )


def read_json_object(request: IRequest, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, or ApiError 400/413/415."""
    content_type = request.getHeader(b"content-type")
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != b"application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                "request body must be JSON (Content-Type: application/json)",
            )
    content = request.content
    assert content is not None
    content.seek(0)
    limit = body_limit(request)
    raw = content.read(limit + 1)
    if len(raw) > limit:  # the Request already refuses these; this keeps the bound local
        raise ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")
    if not raw.strip() and allow_empty:
        return {}
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    return value


def body_limit(request: object) -> int:
    """The largest body the request's site takes."""
    site = getattr(getattr(request, "channel", None), "site", None)
    return site.max_body if isinstance(site, PrivacySite) else MAX_BODY


def install_error_handlers(app: Klein, site: str) -> None:
    """Map every failure to one JSON answer.  Order matters: Klein tries handlers in order, and a
    catch-all registered first would turn 404 and 405 into 500."""

    @app.handle_errors(HTTPException)
    def http_error(self: object, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, HTTPException)
        if isinstance(e, MethodNotAllowed):
            allowed = ", ".join(sorted(e.valid_methods or ()))
            return respond_error(
                request,
                ApiError(405, "method_not_allowed", "method not allowed", {"Allow": allowed}),
            )
        if e.code == 404 or e.code is None or 300 <= e.code < 400:
            # Werkzeug redirects "/x/" to "/x"; we have no such routes to redirect to.
            return respond_error(request, ApiError(404, "not_found", "not found"))
        return respond_error(request, ApiError(e.code, "http_error", e.name.lower()))

    @app.handle_errors(ApiError)
    def api_error(self: object, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, ApiError)
        return respond_error(request, e)

    @app.handle_errors(DomainError)
    def domain_error(self: object, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, DomainError)
        return respond_error(request, ApiError(400, e.code, e.message))

    @app.handle_errors(Exception)
    def unexpected(self: object, request: IRequest, failure: Failure) -> bytes:
        # Log the type and where it happened, not the value: a repr could carry request data.
        # A client that can trigger it can trigger it a million times: bounded.
        error_type = _type_name(failure)
        _log_budget(request).emit(
            log,
            LogLevel.error,
            ("unexpected", site, error_type),
            "{site} site: unexpected {error_type} answering a request",
            site=site,
            error_type=error_type,
        )
        return respond_error(request, ApiError(500, "internal_error", "internal error"))


def _type_name(failure: Failure) -> str:
    return failure.type.__name__ if failure.type else "error"


# For log lines raised where no site is at hand (a store failure): a monotonic clock is enough
# to space out log lines, and nothing a test or the daemon decides depends on it.
_PROCESS_LOG: Final = LogBudget(time.monotonic)


def _log_budget(request: object) -> LogBudget:
    site = getattr(request, "site", None)
    return site.log_budget if isinstance(site, PrivacySite) else _PROCESS_LOG


def set_route(request: IRequest, route: str) -> None:
    """Name the route for the latency and response metrics (a fixed label, never the path)."""
    request.route_label = route  # type: ignore[attr-defined]


class LimitedRequest(server.Request):
    """A Request that refuses oversized bodies before buffering them and sends no Server header.

    It also feeds the per-route metrics and the site's count of requests in flight, answers
    even a failure inside twisted.web with JSON, and never lets a client's ``Host`` reach
    Werkzeug (see :func:`anonticket.web.guard.routing_host`).
    """

    route_label = "other"
    _hangup: IDelayedCall | None = None

    def __init__(self, channel: http.HTTPChannel, *args: Any, **kwargs: Any) -> None:
        # Never parse form bodies into request.args: every body here is JSON, and Twisted's
        # Content-Type parsing for it (the email package) cost ~15% of a POST's time.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(channel, *args, **kwargs)

    _rejected = False
    _received = 0
    _limit = MAX_BODY  # the site's, from gotLength on
    started_at = 0.0
    _site: PrivacySite | None = None  # the site counting this request while it is in flight

    def gotLength(self, length: int | None) -> None:
        # twisted.web buffers a chunked body (length None) in a temporary *file*; keep every
        # body in memory, which the limit below bounds.
        self.content = BytesIO()
        self._limit = body_limit(self)
        if length is not None and length > self._limit:
            self._reject()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._rejected:
            if self._received > _DISCARD_LIMIT:
                _transport(self.channel).abortConnection()
            return
        if self._received > self._limit:
            self._reject()
            return
        assert self.content is not None
        self.content.write(data)

    def _reject(self) -> None:
        """Answer 413 now and close; the rest of the body is read and dropped, not stored."""
        if self._rejected:
            return
        self._rejected = True
        # A client waiting for "100 Continue" must not get it after our final answer.
        self.requestHeaders.removeHeader(b"expect")
        body = _error_bytes("body_too_large", f"request body exceeds {self._limit} bytes")
        _transport(self.channel).write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.persistent = False
        if isinstance(self.channel, PrivacyChannel):
            self.channel.answered = True
        # Hang up once the body has been read and dropped, or after a short grace if the client
        # never sends it (it may be waiting for the "100 Continue" it will not get).
        self._hangup = self.channel.callLater(_REJECT_GRACE, self.channel.loseConnection)
        site = getattr(self.channel, "site", None)
        if isinstance(site, PrivacySite):
            site.count_response("other", 413)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            self._cancel_hangup()
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_hangup()
        super().connectionLost(reason)
        self._done()

    def finish(self) -> None:
        super().finish()
        self._done()

    def _done(self) -> None:
        # Called directly rather than through notifyFinish(): one Deferred less per request.
        site, self._site = self._site, None
        if site is not None:
            site.request_done(self)

    def _cancel_hangup(self) -> None:
        if self._hangup is not None and self._hangup.active():
            self._hangup.cancel()
        self._hangup = None

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        # twisted.web announces "Server: TwistedWeb/<version>"; do not help fingerprinting.
        key = name.lower() if isinstance(name, bytes) else name.lower().encode("ascii")
        if key == b"server":
            return
        super().setHeader(name, value)

    def getRequestHostname(self) -> bytes:
        # Klein binds Werkzeug's URL map with this name (see guard.routing_host).
        return routing_host(self)

    def process(self) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, PrivacySite):
            self._site = site
            site.request_started(self)
        super().process()

    def processingFailed(self, reason: Failure) -> Failure:
        """A failure no route handled (twisted.web, Klein or our own guard raised).

        twisted.web would log it with a traceback at level critical and answer an HTML page;
        here it is one bounded log line with the error's type, and a JSON 500."""
        error_type = _type_name(reason)
        _log_budget(self).emit(
            log,
            LogLevel.error,
            ("processing", error_type),
            "{site} site: processing a request failed with {error_type}",
            site=getattr(getattr(self, "site", None), "name", "?"),
            error_type=error_type,
        )
        if self.finished or self._disconnected:
            return reason
        if self.startedWriting:
            # The status line is gone; the only honest ending left is a cut connection.
            _transport(self.channel).abortConnection()
            return reason
        self._answer(500, _error_bytes("internal_error", "internal error"))
        return reason

    def _handleStar(self) -> None:
        # "OPTIONS *" and any other method on "*": twisted.web answers these itself, without a
        # body; here, as every answer, in JSON.
        if self.method == b"OPTIONS":
            self._answer(200, json_body({}))
        else:
            self.setHeader(b"allow", b"OPTIONS")
            self._answer(405, _error_bytes("method_not_allowed", "method not allowed"))

    def _answer(self, status: int, body: bytes) -> None:
        respond_body(self, body, status)
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


def _transport(channel: http.HTTPChannel) -> ITCPTransport:
    # TCP and UNIX server transports can both write, lose and abort a connection.
    transport = channel.transport
    assert transport is not None
    return cast(ITCPTransport, transport)


class PrivacyChannel(http.HTTPChannel):
    """HTTPChannel whose protocol-level errors are JSON and whose timeouts log no address.

    It tells its site when it waits for a request (it may then be dropped to make room for a
    new connection) and when a request's first byte arrived (the whole request must follow
    within the site's deadline).
    """

    site: PrivacySite
    answered = False  # an error answer went out, the connection is closing
    evicted = False  # aborted to make room for a newer connection
    receiving_since: float | None = None  # first byte of the request now arriving

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.answered = True
        body = _error_bytes("bad_request", "malformed HTTP request")
        _transport(self).write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.loseConnection()

    def timeoutConnection(self) -> None:
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self._abortingCall = None
        _transport(self).abortConnection()

    def connectionMade(self) -> None:
        super().connectionMade()
        # Twisted prefixes the legacy log lines written while a connection's data is handled
        # with "<protocol>,<session>,<client address>"; who connected is nobody's business.
        transport = self.transport
        if transport is not None and hasattr(transport, "logstr"):
            transport.logstr = f"{self.site.name}-site"
        self.site.channel_opened(self)

    def dataReceived(self, data: bytes) -> None:
        # While a request is handled, Twisted buffers what follows and replays it through here
        # once the answer is out: the next request's clock starts then, not before.
        if self.receiving_since is None and not self._handlingRequest and not self.answered:
            self.site.receiving_started(self)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self.site.request_arrived(self)
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Waiting again before the base class replays pipelined data, which may start (and
        # finish receiving) the next request at once.
        if self.persistent:
            self.site.waiting_again(self)
        super().requestDone(request)

    def deadline_passed(self) -> None:
        """The request did not arrive in time: answer 408 and hang up, however often the client
        still sends a byte."""
        transport = _transport(self)
        if self.answered or getattr(transport, "disconnecting", False):
            transport.abortConnection()
            return
        self.answered = True
        self.persistent = False
        body = _error_bytes(
            "request_timeout", f"request not received within {self.site.request_deadline:g}s"
        )
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.loseConnection()
        # A client that does not read cannot keep the socket: abort once the grace is over.
        self._abortingCall = self.callLater(_DEADLINE_GRACE, self.forceAbortClient)

    def evict(self) -> None:
        """Drop the connection at once (to make room): no answer, the client reconnects."""
        if self.evicted:
            return
        self.evicted = True
        _transport(self).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.channel_closed(self)


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


def shielded(d: Deferred[T]) -> Deferred[T]:
    """A Deferred with ``d``'s result whose cancellation (the client went away) leaves ``d`` to
    finish: for work whose outcome must be seen whoever waits for it."""
    outer: Deferred[T] = Deferred()

    def forward(result: object) -> object:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)  # type: ignore[arg-type]
        return None  # ``d`` itself ends here: its failure is outer's to report

    d.addBoth(forward)
    return outer


def store_answer(metrics: Metrics, operation: str, d: Deferred[T]) -> Deferred[T]:
    """``d`` (a store operation's result) with a failure turned into one log line, a metric and
    ApiError 503 for the client: the one place a store failure becomes an HTTP answer.

    The async rule of the web layer: handlers on the measured hot paths (the public redeem and
    token check) are plain functions that return bytes when memory answers and chain callbacks
    on this Deferred otherwise (no coroutine, no exception on the fast path); every other
    handler is ``async def`` and awaits this."""

    def failed(failure: Failure) -> Failure:
        if failure.check(CancelledError):
            return failure  # the client went away; nothing failed
        metrics.store_errors.labels(operation).inc()
        # Every request fails while the store is down: the metric counts them all, the log
        # says so a few times a minute.
        error_type = _type_name(failure)
        _PROCESS_LOG.emit(
            log,
            LogLevel.error,
            ("store", operation, error_type),
            "store {operation} failed: {error_type}",
            operation=operation,
            error_type=error_type,
        )
        return Failure(
            ApiError(
                503,
                "unavailable",
                "service temporarily unavailable, retry later",
                {"Retry-After": "5"},
            )
        )

    return d.addErrback(failed)
