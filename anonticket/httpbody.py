"""HTTP client plumbing shared by the wallet client and ``anonticket-client``.

treq's defaults do not fit a daemon that talks to servers it does not fully trust: its body
producer runs on the global cooperator (not the injected reactor) and ``content()`` buffers a
response without limit.  These two pieces replace them.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer


class BodyTooLarge(Exception):
    """The answer is larger than the caller allows; the connection was dropped."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer over {limit} bytes")
        self.limit = limit


@implementer(IBodyProducer)
class BytesProducer:
    """Writes the whole request body at once, with no cooperator involved."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _CappedReader(Protocol):
    """Collects a body; past ``limit`` bytes (declared or received) it hangs up."""

    def __init__(self, limit: int, declared: int | None) -> None:
        self._limit = limit
        self._declared = declared
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        if self._declared is not None and self._declared > self._limit:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large()
        else:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        # PotentialDataLoss: a close-delimited body, complete as far as HTTP can tell.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def _too_large(self) -> None:
        self._chunks.clear()
        self.done.errback(BodyTooLarge(self._limit))
        self._hang_up()

    def _cancel(self, done: Deferred[bytes]) -> None:
        # Fire first, so the hang-up's connectionLost cannot be reported as a network error.
        done.errback(CancelledError())
        self._hang_up()

    def _hang_up(self) -> None:
        # Closing the connection is the only way to stop a response midway.
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def read_capped(response: IResponse, limit: int) -> Deferred[bytes]:
    """The response body, or a failure with :class:`BodyTooLarge`; cancelling hangs up."""
    length = response.length
    reader = _CappedReader(limit, None if length is UNKNOWN_LENGTH else int(length))
    response.deliverBody(reader)
    return reader.done
