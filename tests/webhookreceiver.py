"""A webhook receiver for the tests: a twisted.web site on loopback that records every delivery,
answers 500 to the first ``fail_first`` attempts, and verifies signatures with the receiver's
side of the standard written by others: the ``standardwebhooks`` package for ``v1`` (HMAC), and
pynacl over the same content for ``v1a`` (Ed25519), which that package does not verify."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import standardwebhooks
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server

from .conftest import reactor, tcp_port


@dataclass
class Delivery:
    event_id: str
    timestamp: str
    signature: str
    body: bytes
    answered: int

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver(resource.Resource):
    fail_first: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    port: IListeningPort | None = None
    isLeaf = True

    def __post_init__(self) -> None:
        resource.Resource.__init__(self)
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def render_POST(self, request: server.Request) -> bytes:
        def header(name: bytes) -> str:
            values = request.requestHeaders.getRawHeaders(name) or [b""]
            return values[0].decode()

        assert request.content is not None
        code = 500 if len(self.deliveries) < self.fail_first else 204
        self.deliveries.append(
            Delivery(
                header(b"webhook-id"),
                header(b"webhook-timestamp"),
                header(b"webhook-signature"),
                request.content.read(),
                code,
            )
        )
        request.setResponseCode(code)
        for wanted, d in list(self._waiters):
            if len(self.accepted) >= wanted:
                self._waiters.remove((wanted, d))
                d.callback(None)
        return b""

    @property
    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.answered == 204]

    def wait_for(self, count: int, timeout: float = 20) -> Deferred[None]:
        """Fires once ``count`` deliveries were accepted."""
        d: Deferred[None] = Deferred()
        if len(self.accepted) >= count:
            d.callback(None)
        else:
            self._waiters.append((count, d))
        return d.addTimeout(timeout, reactor)

    def listen(self, port: int = 0) -> str:
        self.port = reactor.listenTCP(port, server.Site(self), interface="127.0.0.1")
        return f"http://127.0.0.1:{tcp_port(self.port)}/hook"

    async def stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            assert stopped is not None  # a TCP port's: fires once the socket is closed
            await stopped


def verify_hmac(data_dir: Path, delivery: Delivery) -> dict[str, Any]:
    secret = (data_dir / "webhook.secret").read_text()
    headers = {
        "webhook-id": delivery.event_id,
        "webhook-timestamp": delivery.timestamp,
        "webhook-signature": delivery.signature,
    }
    event: dict[str, Any] = standardwebhooks.Webhook(secret).verify(delivery.body, headers)
    return event


def verify_ed25519(data_dir: Path, delivery: Delivery) -> dict[str, Any]:
    public = (data_dir / "webhook.pub").read_text().strip()
    assert public.startswith("whpk_")
    key = nacl.signing.VerifyKey(base64.b64decode(public[len("whpk_") :]))
    version, signature = delivery.signature.split(",", 1)
    assert version == "v1a"
    content = f"{delivery.event_id}.{delivery.timestamp}.".encode() + delivery.body
    key.verify(content, base64.b64decode(signature))  # raises BadSignatureError
    return delivery.event
