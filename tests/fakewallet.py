"""An in-process stand-in for monero-wallet-rpc, for faults only (hangs, HTTP errors, garbage,
stale Digest nonces) that the real wallet will not produce on demand.

Its Digest side follows epee (contrib/epee/src/http_auth.cpp): realm monero-rpc, qop=auth, one
nonce per TCP connection, `nc` must equal the server's own counter, otherwise 401 with a new
nonce (stale=true when the password was right).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from anonticket.wallet import WalletClient, WalletError

reactor: Any = _reactor
USER, PASSWORD = "monitor", "s3cret-Pa55word"
Action = Callable[[Request, dict[str, Any]], Any]


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def reply(result: Any = None, **document: Any) -> Action:
    def act(request: Request, body: dict[str, Any]) -> bytes:
        request.setHeader("content-type", "application/json")
        doc = document or {"result": result}
        return json.dumps({"jsonrpc": "2.0", "id": body.get("id"), **doc}).encode()

    return act


def status(code: int) -> Action:
    def act(request: Request, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        return b"server error page"

    return act


def raw(data: bytes) -> Action:
    return lambda request, body: data


def silent(request: Request, body: dict[str, Any]) -> Any:
    return NOT_DONE_YET  # never answers at all


def stall_after_headers(request: Request, body: dict[str, Any]) -> Any:
    request.setHeader("content-length", "1000")
    request.write(b'{"result": {')
    return NOT_DONE_YET


def declare_huge(request: Request, body: dict[str, Any]) -> Any:
    request.setHeader("content-length", str(10 << 30))
    request.write(b"{")
    return NOT_DONE_YET


def drop(request: Request, body: dict[str, Any]) -> Any:
    # What a client sees when its pooled connection was closed just as it sent the request.
    ITCPTransport(request.channel.transport).abortConnection()
    return NOT_DONE_YET


def big(size: int, declared: bool) -> Action:
    def act(request: Request, body: dict[str, Any]) -> Any:
        doc = json.dumps({"result": {"pad": "x" * size}}).encode()
        if declared:
            return doc  # twisted.web sets Content-Length
        for i in range(0, len(doc), 65536):  # no length: chunked transfer-encoding
            request.write(doc[i : i + 65536])
        request.finish()
        return NOT_DONE_YET

    return act


class _Pieces:
    """A pull producer writing ``head``, ``count`` times ``piece`` and ``tail`` a block at a time,
    as the connection drains: the server holds one block, whatever the body's size, so a test
    can measure the client's memory alone."""

    def __init__(
        self, request: Request, head: bytes, piece: bytes, count: int, tail: bytes
    ) -> None:
        self._request = request
        per_block = max(1, 65536 // len(piece))
        self._blocks = [head] + [piece * per_block] * (count // per_block)
        self._last = piece * (count % per_block) + tail
        self._next = 0
        self._stopped = False
        request.notifyFinish().addErrback(lambda _: self.stopProducing())

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        if self._next < len(self._blocks):
            self._request.write(self._blocks[self._next])
            self._next += 1
            return
        self._stopped = True
        self._request.write(self._last)
        self._request.unregisterProducer()
        self._request.finish()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self._stopped = True


def stream(head: bytes, piece: bytes, count: int, tail: bytes, declared: bool = True) -> Action:
    """Answer ``head + piece * count + tail`` without ever holding it (see _Pieces); with a
    Content-Length, or chunked."""

    def act(request: Request, body: dict[str, Any]) -> Any:
        request.setHeader("content-type", "application/json")
        if declared:
            size = len(head) + len(piece) * count + len(tail)
            request.setHeader("content-length", str(size))
        request.registerProducer(_Pieces(request, head, piece, count, tail), False)
        return NOT_DONE_YET

    return act


def _fields(header: str) -> dict[str, str]:
    pairs = re.findall(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))', header.split(" ", 1)[1])
    return {k.lower(): quoted or bare for k, quoted, bare in pairs}


@dataclass
class EpeeDigest:
    user: str
    password: str
    algorithms: tuple[str, ...] = ("MD5",)
    sessions: dict[Any, list[Any]] = field(default_factory=dict)  # channel -> [nonce, counter]
    challenges: list[bool] = field(default_factory=list)  # stale flag of each 401
    accepted: list[tuple[str, str, int]] = field(default_factory=list)  # algorithm, nonce, nc

    def check(self, request: Request) -> bool:
        session = self.sessions.setdefault(request.channel, ["", 0])
        header = request.getHeader("authorization")
        stale = False
        if header is not None:
            session[1] += 1
            f = _fields(header)
            if header.lower().startswith("digest ") and self._valid(f, request):
                if f["nonce"] == session[0] and int(f["nc"], 16) == session[1]:
                    self.accepted.append((f["algorithm"], f["nonce"], int(f["nc"], 16)))
                    return True
                stale = True
        session[0], session[1] = secrets.token_urlsafe(16), 0
        self.challenges.append(stale)
        request.setResponseCode(401)
        for algorithm in self.algorithms:
            for variant in (algorithm, algorithm + "-sess"):
                request.responseHeaders.addRawHeader(
                    "WWW-authenticate",
                    f'Digest qop="auth",algorithm={variant},realm="monero-rpc",'
                    f'nonce="{session[0]}",stale={"true" if stale else "false"}',
                )
        return False

    def _valid(self, f: dict[str, str], request: Request) -> bool:
        algorithm = f.get("algorithm", "")
        base = algorithm.upper().removesuffix("-SESS")
        if base not in self.algorithms or f.get("qop") != "auth" or f.get("username") != self.user:
            return False
        if f.get("realm") != "monero-rpc" or f.get("uri") != request.uri.decode():
            return False

        def h(*parts: str) -> str:
            return hashlib.new(base.replace("-", "").lower(), ":".join(parts).encode()).hexdigest()

        ha1 = h(self.user, "monero-rpc", self.password)
        if algorithm.upper().endswith("-SESS"):
            ha1 = h(ha1, f["nonce"], f["cnonce"])
        ha2 = h(request.method.decode(), f["uri"])
        return f.get("response") == h(ha1, f["nonce"], f["nc"], f["cnonce"], "auth", ha2)

    def expire_nonces(self) -> None:
        for session in self.sessions.values():
            session[0] = secrets.token_urlsafe(16)


class FakeWallet(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.auth: EpeeDigest | None = None
        self.script: list[Action] = []  # one per request, then `default`
        self.default: Action = reply({"height": 42})
        self.received: list[dict[str, Any]] = []
        self.content_types: list[str | None] = []

    def render_POST(self, request: Request) -> Any:
        if self.auth is not None and not self.auth.check(request):
            return b"<html><body><h1>401 Unauthorized</h1></body></html>"
        assert request.content is not None
        body = json.loads(request.content.read())
        self.received.append(body)
        self.content_types.append(request.getHeader("content-type"))
        action = self.script.pop(0) if self.script else self.default
        return action(request, body)


class TrackingSite(Site):
    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.connections: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol._channel)  # the HTTPChannel inside the HTTP/2 switch
        return protocol

    def open_connections(self) -> list[Any]:
        return [c for c in self.connections if c.transport is not None and c.transport.connected]


@dataclass
class Fake:
    wallet: FakeWallet
    site: TrackingSite
    url: str
    clients: list[WalletClient]

    def client(self, **kwargs: Any) -> WalletClient:
        client = WalletClient(reactor, self.url, **kwargs)
        self.clients.append(client)
        return client


async def _listen(site: Site) -> Any:
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)


async def _shutdown(fake: Fake, port: Any) -> None:
    for client in fake.clients:
        await client.close()
    for protocol in fake.site.open_connections():
        protocol.transport.abortConnection()
    await port.stopListening()
    await sleep(0.01)  # let connectionLost run everywhere
    assert fake.site.open_connections() == []


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[Fake]:
    wallet = FakeWallet()
    site = TrackingSite(wallet)
    port = await _listen(site)
    f = Fake(wallet, site, f"http://127.0.0.1:{port.getHost().port}", [])
    yield f
    await _shutdown(f, port)


async def failure_of(coroutine: Any) -> WalletError:
    with pytest.raises(WalletError) as info:
        await coroutine
    return info.value
