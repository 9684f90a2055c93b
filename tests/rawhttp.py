"""A raw TCP client for requests treq will not send: oversized, truncated, malformed."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class _Collect(Protocol):
    def __init__(self, chunks: list[bytes], pause: float, reactor: Any) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()
        self._chunks = chunks
        self._pause = pause
        self._reactor = reactor

    def connectionMade(self) -> None:
        self._send()

    def _send(self) -> None:
        if not self._chunks or self.transport is None:
            return
        self.transport.write(self._chunks.pop(0))
        if self._chunks:
            self._reactor.callLater(self._pause, self._send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._chunks = []
        if not self.done.called:
            self.done.callback(self.received)


async def raw_request(
    reactor: Any,
    port: int,
    *chunks: bytes,
    pause: float = 0.05,
    timeout: float = 10,
    hangup: bool = False,
) -> bytes:
    """Send the chunks (pausing between them) and return all bytes until the server closes.

    With ``hangup`` the client closes right after sending, as a vanished Tor circuit would.
    """
    proto = _Collect(list(chunks), pause, reactor)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    if hangup:
        assert proto.transport is not None
        proto.transport.loseConnection()
    proto.done.addTimeout(timeout, reactor)
    try:
        return await proto.done
    finally:
        if proto.transport is not None:
            proto.transport.loseConnection()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    return code, headers, body
