"""The connection of a :class:`~anonticket.web.site.PrivacySite`: protocol-level errors in JSON,
timeouts that log no address, and what the site's connection cap and request deadline need to
know of it (when it waits for a request, when a request's first byte arrived).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http

from anonticket.web.jsonio import error_body

if TYPE_CHECKING:  # site.py builds these channels
    from anonticket.web.site import PrivacySite

_DEADLINE_GRACE: Final = 1.0  # to flush the 408 before the connection is aborted


def transport_of(channel: http.HTTPChannel) -> ITCPTransport:
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
        body = error_body("bad_request", "malformed HTTP request")
        transport_of(self).write(
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
        transport_of(self).abortConnection()

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
        transport = transport_of(self)
        if self.answered or getattr(transport, "disconnecting", False):
            transport.abortConnection()
            return
        self.answered = True
        self.persistent = False
        body = error_body(
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
        transport_of(self).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.channel_closed(self)
