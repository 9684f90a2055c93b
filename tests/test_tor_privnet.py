"""A real onion service on a private Tor network (tests/tor_privnet.py): published with txtorcon
through the service tor's control port, fetched through the client tor's SOCKS port with treq,
and redeemed against with ``anonticket-client --socks`` as a subprocess.

One network for the whole module (about 20 s to get ready); prints its timings.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing
import pytest
import pytest_twisted
import txtorcon
from treq.client import HTTPClient
from twisted.internet.endpoints import clientFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from txtorcon.web import tor_agent

from anonticket.client import SOCKS_ENV

from . import tor_privnet
from .conftest import reactor
from .daemonproc import run_client

pytestmark = [
    pytest.mark.skipif(
        not tor_privnet.available(), reason="needs tor and tor-gencert (Debian package tor)"
    ),
    # txtorcon 26.6 reads Deferred.callbacks whenever a control connection closes.
    pytest.mark.filterwarnings(
        "ignore:twisted.internet.defer.Deferred.callbacks:DeprecationWarning"
    ),
]

REPO = Path(__file__).resolve().parent.parent
PID = "0123456789abcdef"
TOKEN = "cd" * 32
REDEEMED = {"status": "success", "service_token": TOKEN, "balance": 7}
ACTIVE = {"status": "active", "balance": 7, "issued_at": "2026-01-01T00:00:00Z", "revoked_at": None}
HELLO = b"hello from the onion\n"
FIRST_FETCH_DEADLINE = 60.0


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[tor privnet] {text}", flush=True)


class StandIn(Resource):
    """A tiny stand-in for the public site: ``/`` and the two API calls the client makes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, bytes]] = []

    def render(self, request):
        method, path = request.method.decode(), request.path.decode()
        self.seen.append((method, path, request.content.read()))
        if (method, path) == ("GET", "/"):
            return HELLO
        request.setHeader(b"content-type", b"application/json")
        if (method, path) == ("POST", "/api/v1/redeem"):
            return json.dumps(REDEEMED).encode()
        if (method, path) == ("GET", f"/api/v1/token/{TOKEN}"):
            return json.dumps(ACTIVE).encode()
        request.setResponseCode(404)
        return b'{"error": "not found", "code": "not_found"}'


@pytest.fixture(scope="module")
def network() -> Iterator[tor_privnet.TorNetwork]:
    with tor_privnet.TorNetwork() as net:
        net.client_tor()
        net.service_tor()
        net.wait_ready(90)
        yield net


@dataclass
class Onion:
    url: str
    socks: str  # the client tor's SOCKS port as an endpoint string
    site: StandIn
    timings: dict[str, float] = field(default_factory=dict)


async def get(agent, url: str, timeout: float = 30.0) -> bytes:
    response = await HTTPClient(agent).get(url, timeout=timeout)
    assert response.code == 200, response.code
    return await response.content()


@pytest_twisted.async_yield_fixture(scope="module")
async def onion(network):
    site = StandIn()
    port = reactor.listenTCP(0, Site(site), interface="127.0.0.1")
    control = clientFromString(reactor, network.service_tor())
    tor = await txtorcon.connect(reactor, control).addTimeout(10, reactor)
    timings = dict(network.timings)
    started = time.monotonic()
    # No timeout of its own: it waits for the first HS_DESC UPLOADED, forever if none comes.
    service = await tor.create_onion_service([(80, port.getHost().port)], version=3).addTimeout(
        60, reactor
    )
    timings["published"] = round(time.monotonic() - started, 2)
    url = f"http://{service.hostname}"
    socks = network.client_socks_endpoint
    agent = tor_agent(reactor, clientFromString(reactor, socks))
    # Until the descriptor reaches the HSDirs the client tor answers "host unreachable".
    attempts = 0
    while True:
        attempts += 1
        try:
            assert await get(agent, url) == HELLO
            break
        except Exception:
            if time.monotonic() - started > FIRST_FETCH_DEADLINE:
                raise
            await deferLater(reactor, 1.0, lambda: None)
    timings["first fetch"] = round(time.monotonic() - started, 2)
    timings["first fetch attempts"] = attempts
    yield Onion(url, socks, site, timings)
    await service.remove()
    # Not tor.quit(): that goes through txtorcon's deprecated on_disconnect.
    gone = tor.protocol.when_disconnected().addErrback(lambda _: None)
    tor.protocol.transport.loseConnection()
    await gone
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_onion_served_through_private_network(onion, capsys):
    agent = tor_agent(reactor, clientFromString(reactor, onion.socks))
    times = []
    for _ in range(5):
        started = time.monotonic()
        assert await get(agent, onion.url + "/") == HELLO
        times.append(time.monotonic() - started)
    onion.timings["later fetch (mean of 5)"] = round(sum(times) / len(times), 3)
    # Seconds: network stages since its start; "published"/"first fetch" since publishing began.
    say(capsys, ", ".join(f"{k}: {v}" for k, v in onion.timings.items()))


def client(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_client(*argv, timeout=90, **env)


@pytest_twisted.ensureDeferred
async def test_client_redeems_and_checks_status_over_tor(onion, capsys):
    # In a thread: the stand-in site is served by this process's reactor.
    started = time.monotonic()
    argv = ["--url", onion.url, "--socks", onion.socks, "--timeout", "30"]
    done = await deferToThread(client, "redeem", PID, *argv, "--json")
    took = time.monotonic() - started
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == REDEEMED
    assert ("POST", "/api/v1/redeem", json.dumps({"pid": PID}).encode()) in onion.site.seen

    argv = ["--url", onion.url, "--timeout", "30"]
    done = await deferToThread(client, "status", TOKEN, *argv, **{SOCKS_ENV: onion.socks})
    assert (done.returncode, done.stderr) == (0, "")
    assert "status:      active\n" in done.stdout and "balance:     7 atomic units" in done.stdout
    say(capsys, f"anonticket-client redeem over tor, whole process: {took:.2f} s")


def unknown_onion() -> str:
    # A well-formed v3 address (valid key and checksum) that nobody publishes.
    key = bytes(nacl.signing.SigningKey.generate().verify_key)
    check = hashlib.sha3_256(b".onion checksum" + key + b"\x03").digest()[:2]
    return base64.b32encode(key + check + b"\x03").decode().lower() + ".onion"


@pytest_twisted.ensureDeferred
async def test_client_reports_an_unpublished_onion_in_one_line(onion, capsys):
    url = f"http://{unknown_onion()}"
    argv = ["--url", url, "--socks", onion.socks, "--timeout", "30"]
    done = await deferToThread(client, "status", TOKEN, *argv)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"anonticket-client: error: cannot reach {url} through "), (
        done.stderr
    )
    say(capsys, f"unpublished onion: {done.stderr.strip()}")
