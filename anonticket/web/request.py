"""The request of a :class:`~anonticket.web.site.PrivacySite`: oversized bodies refused before
they are buffered, no ``Server:`` header, twisted.web's own failures answered in JSON, and the
per-route metrics and the site's count of requests in flight fed.
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest

from anonticket.web import HTTP_LOG_NAMESPACE
from anonticket.web.channel import PrivacyChannel, transport_of
from anonticket.web.errors import log_budget, type_name
from anonticket.web.guard import routing_host
from anonticket.web.jsonio import MAX_BODY, body_limit, error_body, json_body, respond_body

if TYPE_CHECKING:  # site.py uses this request
    from anonticket.web.site import PrivacySite

# After a 413, keep reading (and dropping) this much before hanging up, so the client sees our
# answer instead of a connection reset caused by unread data.
_DISCARD_LIMIT: Final = 64 * 1024
_REJECT_GRACE: Final = 1.0

log = Logger(namespace=HTTP_LOG_NAMESPACE)


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
                transport_of(self.channel).abortConnection()
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
        body = error_body("body_too_large", f"request body exceeds {self._limit} bytes")
        transport_of(self.channel).write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.persistent = False
        channel = self.channel
        if isinstance(channel, PrivacyChannel):
            channel.answered = True
        # Hang up once the body has been read and dropped, or after a short grace if the client
        # never sends it (it may be waiting for the "100 Continue" it will not get).
        self._hangup = channel.callLater(_REJECT_GRACE, channel.loseConnection)
        if isinstance(channel, PrivacyChannel):
            channel.site.count_response("other", 413)

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
        # A PrivacySite builds PrivacyChannels, and only it does: the channel's site is one.
        channel = self.channel
        if isinstance(channel, PrivacyChannel):
            site = self._site = channel.site
            site.request_started(self)
        super().process()

    def processingFailed(self, reason: Failure) -> Failure:
        """A failure no route handled (twisted.web, Klein or our own guard raised).

        twisted.web would log it with a traceback at level critical and answer an HTML page;
        here it is one bounded log line with the error's type, and a JSON 500."""
        error_type = type_name(reason)
        log_budget(self).emit(
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
            transport_of(self.channel).abortConnection()
            return reason
        self._answer(500, error_body("internal_error", "internal error"))
        return reason

    def _handleStar(self) -> None:
        # "OPTIONS *" and any other method on "*": twisted.web answers these itself, without a
        # body; here, as every answer, in JSON.
        if self.method == b"OPTIONS":
            self._answer(200, json_body({}))
        else:
            self.setHeader(b"allow", b"OPTIONS")
            self._answer(405, error_body("method_not_allowed", "method not allowed"))

    def _answer(self, status: int, body: bytes) -> None:
        respond_body(self, body, status)
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
