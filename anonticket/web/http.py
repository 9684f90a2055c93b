"""HTTP plumbing shared by both sites: JSON in and out, body limits, and a Site that logs nothing.

* Every response is JSON, errors included: ``{"error": "<message>", "code": "<stable code>"}``.
  No traceback, SQL, path or library message reaches a client.
* Bodies over :data:`MAX_BODY` are refused with 413 as soon as the length is known (or the
  chunked body crosses the limit), before anything is buffered; the rest is read and dropped.
* The site writes no access log, no ``Server:`` header, and never logs a client's address.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from io import BytesIO
from typing import Any, Final, NoReturn, TypeVar, cast

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from anonticket.domain import DomainError
from anonticket.metrics import Metrics

MAX_BODY: Final = 4096
# After a 413, keep reading (and dropping) this much before hanging up, so the client sees our
# answer instead of a connection reset caused by unread data.
_DISCARD_LIMIT: Final = 64 * 1024
_REJECT_GRACE: Final = 1.0
IDLE_TIMEOUT: Final = 60

log = Logger()

T = TypeVar("T")


class ApiError(Exception):
    """An error answer: HTTP status, stable code, stable message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


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
    return respond(request, {"error": error.message, "code": error.code}, error.status)


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
    raw = content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:  # the Request already refuses these; this keeps the bound local
        raise ApiError(413, "body_too_large", f"request body exceeds {MAX_BODY} bytes")
    if not raw.strip() and allow_empty:
        return {}
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    return value


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
        log.error(
            "{site} site: unexpected {error_type} answering a request",
            site=site,
            error_type=failure.type.__name__ if failure.type else "error",
        )
        return respond_error(request, ApiError(500, "internal_error", "internal error"))


def set_route(request: IRequest, route: str) -> None:
    """Name the route for the latency and response metrics (a fixed label, never the path)."""
    request.route_label = route  # type: ignore[attr-defined]


class LimitedRequest(server.Request):
    """A Request that refuses oversized bodies before buffering them and sends no Server header.

    It also feeds the per-route metrics and the site's count of requests in flight.
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
    started_at = 0.0
    _site: PrivacySite | None = None  # the site counting this request while it is in flight

    def gotLength(self, length: int | None) -> None:
        # twisted.web buffers a chunked body (length None) in a temporary *file*; keep every
        # body in memory, which the limit below bounds.
        self.content = BytesIO()
        if length is not None and length > MAX_BODY:
            self._reject()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._rejected:
            if self._received > _DISCARD_LIMIT:
                _transport(self.channel).abortConnection()
            return
        if self._received > MAX_BODY:
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
        body = _error_bytes("body_too_large", f"request body exceeds {MAX_BODY} bytes")
        _transport(self.channel).write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.persistent = False
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

    def process(self) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, PrivacySite):
            self._site = site
            site.request_started(self)
        super().process()


def _transport(channel: http.HTTPChannel) -> ITCPTransport:
    # TCP and UNIX server transports can both write, lose and abort a connection.
    transport = channel.transport
    assert transport is not None
    return cast(ITCPTransport, transport)


class PrivacyChannel(http.HTTPChannel):
    """HTTPChannel whose protocol-level errors are JSON and whose timeouts log no address."""

    def _respondToBadRequestAndDisconnect(self) -> None:
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
        site = getattr(self, "site", None)
        if isinstance(site, PrivacySite):
            site.channels.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if isinstance(site, PrivacySite):
            site.channel_closed(self)


class _Guard(Resource):
    """Rejects URLs Klein cannot decode with a JSON 400 (Klein would log the URL and answer
    text/plain), then hands the request to the Klein resource."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: server.Request) -> bytes | int:
        try:
            b"/".join(request.postpath or ()).decode("utf-8")
            # What Klein decodes is the Host header's name part; no header means our own
            # address, always ASCII.
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return respond_error(request, ApiError(400, "bad_request", "URL is not valid UTF-8"))
        result: bytes | int = self._inner.render(request)
        return result


class PrivacySite(server.Site):
    """A Site with no access log that counts its requests and can drain them on stop."""

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
    ) -> None:
        super().__init__(_Guard(resource), timeout=timeout)
        self.name = name
        self.metrics = metrics
        self.clock = clock
        self.channels: set[PrivacyChannel] = set()
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


def store_answer(metrics: Metrics, operation: str, d: Deferred[T]) -> Deferred[T]:
    """``d`` (a store operation's result) with a failure turned into one log line, a metric and
    ApiError 503 for the client."""

    def failed(failure: Failure) -> Failure:
        if failure.check(CancelledError):
            return failure  # the client went away; nothing failed
        metrics.store_errors.labels(operation).inc()
        log.error(
            "store {operation} failed: {error_type}",
            operation=operation,
            error_type=failure.type.__name__ if failure.type else "error",
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


async def store_call(metrics: Metrics, operation: str, call: Callable[[], Deferred[Any]]) -> Any:
    """Run a store operation; a failure becomes one log line, a metric and a 503 for the client."""
    return await store_answer(metrics, operation, call())
