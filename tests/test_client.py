"""anonticket-client: `new` offline, `redeem`/`status` against the real in-process daemon and
against hostile little servers, and the console script as a real subprocess."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import nacl.utils
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from anonticket.address import Address, parse_address, split_integrated_address
from anonticket.client import (
    ONION_NEEDS_SOCKS,
    PID_IS_SECRET,
    SOCKS_ENV,
    ClientError,
    TorAgent,
    build_parser,
    make_agent,
    run,
)
from anonticket.store.records import PaymentStatus

from .conftest import post_json, reactor, transfer
from .daemonproc import run_client

PRIMARY = (
    "4ADT1BtbxqEWeMKp9GgPr2NeyJXXtNxvoDawpyA4WpzFcGcoHUvXeijE66DNfohE9r1bQYaBiQjEtKE7CtkTdLwi"
    "DznFzra"
)
INTEGRATED = (
    "4Kv81zi6a6kWeMKp9GgPr2NeyJXXtNxvoDawpyA4WpzFcGcoHUvXeijE66DNfohE9r1bQYaBiQjEtKE7CtkTdLwiLEgreQ"
    "tSJKWTyvJ8n1"
)
PID = "0123456789abcdef"
NEW_OUTPUT = re.compile(r"payment id: +([0-9a-f]{16})\nintegrated address: +(\w+)\n")
REPO = Path(__file__).resolve().parent.parent


ONION = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd.onion"


@pytest.fixture(autouse=True)
def no_socks_from_the_environment(monkeypatch):
    # A developer's own ANONTICKET_SOCKS would send every request below through Tor.
    monkeypatch.delenv(SOCKS_ENV, raising=False)


def other_kind(kind: str, network: str = "mainnet") -> str:
    base = parse_address(PRIMARY)
    return Address(network, kind, base.spend_key, base.view_key).encode()  # type: ignore[arg-type]


async def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(reactor, list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, expected: str) -> None:
    assert err.count("\n") == 1 and err.startswith("anonticket-client: error: "), err
    assert expected in err and "Traceback" not in err


# --------------------------------------------------------------------------- new


@pytest_twisted.ensureDeferred
async def test_new_prints_a_pid_whose_integrated_address_round_trips():
    code, out, err = await cli("new", "--address", PRIMARY)
    assert code == 0
    match = NEW_OUTPUT.fullmatch(out)
    assert match, out
    pid, integrated = match.groups()
    assert split_integrated_address(integrated) == (PRIMARY, bytes.fromhex(pid))
    assert err == PID_IS_SECRET + "\n"


@pytest_twisted.ensureDeferred
async def test_new_draws_a_fresh_pid_every_time():
    pids = set()
    for _ in range(5):
        code, out, _ = await cli("new", "--address", PRIMARY)
        match = NEW_OUTPUT.fullmatch(out)
        assert code == 0 and match
        pids.add(match.group(1))
    assert len(pids) == 5


@pytest_twisted.ensureDeferred
async def test_new_redraws_an_all_zero_pid(monkeypatch):
    draws = iter([bytes(8), bytes.fromhex(PID)])
    monkeypatch.setattr(nacl.utils, "random", lambda n: next(draws))
    code, out, _ = await cli("new", "--address", PRIMARY)
    assert code == 0
    assert out == f"payment id:          {PID}\nintegrated address:  {INTEGRATED}\n"


@pytest_twisted.ensureDeferred
async def test_new_json_is_one_object_and_nothing_on_stderr():
    code, out, err = await cli("new", "--json", "--address", PRIMARY, "--network", "mainnet")
    assert code == 0 and err == ""
    body = json.loads(out)
    assert set(body) == {"pid", "integrated_address"}
    assert split_integrated_address(body["integrated_address"])[1].hex() == body["pid"]


@pytest_twisted.ensureDeferred
async def test_new_on_testnet():
    testnet = other_kind("standard", "testnet")
    code, out, _ = await cli("new", "--json", "--address", testnet, "--network", "testnet")
    integrated = json.loads(out)["integrated_address"]
    assert code == 0 and parse_address(integrated).network == "testnet"
    assert split_integrated_address(integrated)[0] == testnet


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--address", other_kind("subaddress")], "this is a subaddress"),
        (["--address", INTEGRATED], "already an integrated address"),
        (["--address", "hello"], "not a Monero address"),
        (["--address", PRIMARY[:-1] + "b"], "not a Monero address: address checksum mismatch"),
        (["--address", ""], "not a Monero address"),
        (
            ["--address", PRIMARY, "--network", "stagenet"],
            "mainnet address, but --network stagenet",
        ),
        (
            ["--address", other_kind("standard", "testnet"), "--network", "mainnet"],
            "testnet address, but --network mainnet",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_new_refuses_unsuitable_addresses(argv, message):
    code, out, err = await cli("new", *argv)
    assert code == 2 and out == ""
    one_error_line(err, message)


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2_and_help_exits_0():
    code, _, err = await cli("new")
    assert code == 2 and "--address" in err
    code, _, err = await cli("redeem", PID, "--url", "ftp://example.org")
    assert code == 2 and "http:// or https://" in err
    code, _, err = await cli("redeem", PID, "--url", "http://x", "--timeout", "-1")
    assert code == 2 and "positive" in err
    code, out, _ = await cli("redeem", "--help")
    assert code == 0 and "--timeout SECONDS" in out and "--json" in out


# --------------------------------------------------------------------------- redeem / status


@pytest_twisted.ensureDeferred
async def test_redeem_then_again_then_status(daemon):
    await daemon.store.record_transfers([transfer(PID, 1, amount=1_234_567_890_123)], now=1)
    code, out, err = await cli("redeem", PID.upper(), "--url", daemon.public_url + "/")
    assert (code, err) == (0, "")
    found = re.search(r"^service token: +([0-9a-f]{64})$", out, re.M)
    assert found, out
    token = found.group(1)
    assert re.search(r"^status: +success$", out, re.M)
    assert re.search(r"^balance: +1234567890123 atomic units \(1\.234567890123 XMR\)$", out, re.M)

    code, again, _ = await cli("redeem", PID, "--url", daemon.public_url)
    assert code == 0 and again == out.replace("success", "already_claimed")

    code, out, err = await cli("status", token, "--url", daemon.public_url)
    assert (code, err) == (0, "")
    assert re.search(r"^status: +active$", out, re.M)
    assert re.search(r"^balance: +1234567890123 atomic units", out, re.M)
    assert re.search(r"^issued at: +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", out, re.M)
    assert re.search(r"^revoked at: +-$", out, re.M)


@pytest_twisted.ensureDeferred
async def test_redeem_and_status_json_print_the_server_body(daemon):
    await daemon.store.record_transfers([transfer(PID, 1, amount=7)], now=1)
    code, out, err = await cli("redeem", "--json", PID, "--url", daemon.public_url)
    body = json.loads(out)
    assert (code, err, out.count("\n")) == (0, "", 1)
    assert body["status"] == "success" and body["balance"] == 7
    code, out, _ = await cli("status", "--json", body["service_token"], "--url", daemon.public_url)
    assert code == 0 and json.loads(out)["status"] == "active"
    code, out, _ = await cli("redeem", "--json", "fedcba9876543210", "--url", daemon.public_url)
    assert code == 4 and json.loads(out)["code"] == "payment_not_found"


@pytest_twisted.ensureDeferred
async def test_pending_payment_exits_3(daemon):
    await daemon.store.record_transfers(
        [transfer(PID, 1, height=100, status=PaymentStatus.PENDING)], now=1, wallet_height=104
    )
    code, out, _ = await cli("redeem", PID, "--url", daemon.public_url)
    assert code == 3 and out == "pending:  4 of 10 confirmations\n"


@pytest_twisted.ensureDeferred
async def test_unknown_pid_and_unknown_token_exit_4(daemon):
    code, out, err = await cli("redeem", PID, "--url", daemon.public_url)
    assert code == 4 and out == ""
    one_error_line(err, "payment not found")
    code, out, err = await cli("status", "ab" * 32, "--url", daemon.public_url)
    assert code == 4 and out == ""
    one_error_line(err, "not found")


def redeem_requests(daemon) -> float:
    (family,) = daemon.metrics.redeems.collect()
    total: float = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


@pytest.mark.parametrize("pid", ["0" * 16, "xyz", PID + "0", "ab" * 32, "0123456789abcdeg"])
@pytest_twisted.ensureDeferred
async def test_bad_pid_is_refused_before_any_request(daemon, http, pid):
    # Control: a bad PID that does reach the server is counted.
    await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": "xyz"})
    invalid = daemon.metrics.redeems.labels("invalid")._value.get()
    total = redeem_requests(daemon)
    assert invalid == total == 1
    code, out, err = await cli("redeem", pid, "--url", daemon.public_url)
    assert code == 2 and out == ""
    one_error_line(err, "invalid payment id")
    assert daemon.metrics.redeems.labels("invalid")._value.get() == invalid
    assert redeem_requests(daemon) == total


@pytest_twisted.ensureDeferred
async def test_malformed_token_is_refused_locally(daemon):
    before = daemon.metrics.token_lookups.labels("invalid")._value.get()
    code, _, err = await cli("status", "zz" * 32, "--url", daemon.public_url)
    assert code == 2
    one_error_line(err, "invalid token")
    assert daemon.metrics.token_lookups.labels("invalid")._value.get() == before


@pytest_twisted.ensureDeferred
async def test_revoked_token_exits_5(daemon, http):
    await daemon.store.record_transfers([transfer(PID, 1, amount=5)], now=1)
    _, out, _ = await cli("redeem", "--json", PID, "--url", daemon.public_url)
    token = json.loads(out)["service_token"]
    code, _, _ = await post_json(http, f"{daemon.internal_url}/api/v1/token/{token}/revoke", {})
    assert code == 200
    code, out, err = await cli("status", token, "--url", daemon.public_url)
    assert (code, err) == (5, "")
    assert re.search(r"^status: +revoked$", out, re.M)
    assert re.search(r"^revoked at: +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", out, re.M)
    # A new payment to its PID is recorded, but the redeem says the token is revoked: exit 5,
    # not 0 ("active").
    await daemon.store.record_transfers([transfer(PID, 2, amount=3)], now=2)
    code, out, err = await cli("redeem", PID, "--url", daemon.public_url)
    assert (code, err) == (5, "")
    assert re.search(r"^token status: +revoked$", out, re.M)
    assert re.search(r"^balance: +8 atomic units", out, re.M)
    # Asked again (now answered from memory): the same.
    assert (await cli("redeem", PID, "--url", daemon.public_url))[0] == 5


@pytest_twisted.ensureDeferred
async def test_suspended_token_exits_6(daemon):
    await daemon.store.record_transfers([transfer(PID, 1, amount=5, height=100)], now=1)
    _, out, _ = await cli("redeem", "--json", PID, "--url", daemon.public_url)
    token = json.loads(out)["service_token"]
    await daemon.store.record_transfers([], now=2, recheck=(90, 110))  # double-spent
    code, out, err = await cli("status", token, "--url", daemon.public_url)
    assert (code, err) == (6, "")
    assert re.search(r"^status: +suspended$", out, re.M)
    code, out, _ = await cli("redeem", PID, "--url", daemon.public_url)
    assert code == 6 and re.search(r"^token status: +suspended$", out, re.M)


# --------------------------------------------------------------------------- network trouble


async def closed_port_url() -> str:
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}"


@pytest_twisted.ensureDeferred
async def test_unreachable_server_is_one_line_exit_1():
    url = await closed_port_url()
    for argv in (["redeem", PID], ["status", "ab" * 32]):
        code, out, err = await cli(*argv, "--url", url, "--timeout", "5")
        assert code == 1 and out == ""
        one_error_line(err, f"cannot reach {url}: ")


@pytest.mark.parametrize(
    "url",
    [
        "http://abcdefghij234567.onion",
        "http://X.ONION./base",
        # Dots a resolver reads as ".": the check must see the name as it will be used.
        "http://abcdefghij234567\uff0eonion",
        "http://abcdefghij234567\u3002onion:80/",
        "http://abcdefghij234567\uff61ONION",
        "http://abcdefghij234567\uff0eonion\u3002",
    ],
)
@pytest_twisted.ensureDeferred
async def test_onion_url_needs_socks(url):
    for argv in (["redeem", PID], ["status", "ab" * 32]):
        code, out, err = await cli(*argv, "--url", url)
        assert code == 1 and out == ""
        one_error_line(err, ONION_NEEDS_SOCKS)


class Hostile(Resource):
    """Serves one answer; ``mode`` picks how it misbehaves.  ``gone`` fires once the client
    hangs up, so a test can see the connection was really dropped, not just abandoned."""

    isLeaf = True

    def __init__(self, mode: str, code: int = 200, body: bytes = b"") -> None:
        super().__init__()
        self.mode, self.code, self.body = mode, code, body
        self.gone: Deferred[None] = Deferred()
        self.sent = 0

    def render(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        request.notifyFinish().addBoth(lambda _: self.gone.callback(None))
        if self.mode == "fixed":
            return self.body
        if self.mode == "declared":
            request.setHeader(b"content-length", b"%d" % 10**9)
        if self.mode == "silent":
            return NOT_DONE_YET  # not even the headers
        request.write(b'{"status": "')
        if self.mode in ("endless", "declared"):
            self.pump(request)
        return NOT_DONE_YET  # "stall": headers and a bit of body, then silence

    def pump(self, request) -> None:
        if not self.gone.called and self.sent < 2**26:
            request.write(b"x" * 16384)
            self.sent += 16384
            reactor.callLater(0, self.pump, request)


@pytest_twisted.async_yield_fixture
async def serve():
    ports = []

    def start(resource: Resource) -> str:
        ports.append(reactor.listenTCP(0, Site(resource), interface="127.0.0.1"))
        return f"http://127.0.0.1:{ports[-1].getHost().port}"

    yield start
    for port in ports:
        await port.stopListening()


@pytest.mark.parametrize("mode", ["endless", "declared"])
@pytest_twisted.ensureDeferred
async def test_huge_body_is_cut_off_at_the_cap(serve, mode):
    server = Hostile(mode)
    code, out, err = await cli("redeem", PID, "--url", serve(server), "--timeout", "10")
    assert code == 1 and out == ""
    one_error_line(err, "answer exceeds 64 KiB")
    await server.gone.addTimeout(5, reactor)  # the client really hung up
    assert server.sent < 2**20


@pytest.mark.parametrize("mode", ["silent", "stall"])
@pytest_twisted.ensureDeferred
async def test_timeout_covers_headers_and_body(serve, mode):
    server = Hostile(mode)
    code, out, err = await cli("status", "ab" * 32, "--url", serve(server), "--timeout", "0.3")
    assert code == 1 and out == ""
    one_error_line(err, "no complete answer from http://127.0.0.1:")
    assert "within 0.3 s" in err
    await server.gone.addTimeout(5, reactor)


@pytest.mark.parametrize(
    ("code", "body", "exit_code", "message"),
    [
        (500, b"<html>oops</html>", 1, "HTTP 500 without a JSON object"),
        (503, b'{"error": "busy \\u001b[31m"}', 1, "the server answered HTTP 503: busy ?[31m"),
        (400, b'{"error": "no such thing"}', 2, "no such thing"),
        (200, b'{"status": "success", "service_token": "zz", "balance": 1}', 1, "unexpected"),
        (200, b'{"status": "success", "service_token": "' + b"a" * 64 + b'"}', 1, "unexpected"),
        (202, b'{"status": "pending", "confirmations": true, "required": 1}', 1, "unexpected"),
        (200, b"[" * 60000, 1, "without a JSON object"),
        (302, b"{}", 1, "HTTP 302"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_odd_answers_are_reported_not_trusted(serve, code, body, exit_code, message):
    url = serve(Hostile("fixed", code, body))
    got, out, err = await cli("redeem", PID, "--url", url, "--timeout", "10")
    assert got == exit_code and out == ""
    one_error_line(err, message)


# --------------------------------------------------------------------------- console script


def script(*argv: str) -> subprocess.CompletedProcess[str]:
    # Through ``python -m``: the module's own entry point, not only the installed script.
    return run_client(*argv, command=[sys.executable, "-m", "anonticket.client"])


def test_console_script_new():
    done = script("new", "--address", PRIMARY)
    assert done.returncode == 0, done.stderr
    shown = NEW_OUTPUT.fullmatch(done.stdout)
    assert shown, done.stdout
    pid, integrated = shown.groups()
    assert split_integrated_address(integrated) == (PRIMARY, bytes.fromhex(pid))
    assert done.stderr == PID_IS_SECRET + "\n"


@pytest_twisted.ensureDeferred
async def test_console_script_exit_code_and_one_line_error():
    url = await closed_port_url()
    done = script("redeem", PID, "--url", url, "--timeout", "5")
    assert done.returncode == 1 and done.stdout == ""
    one_error_line(done.stderr, "cannot reach")


# --------------------------------------------------------------------------- --socks (no tor)


class FakeSocks(Protocol):
    """A SOCKS5 server standing in for tor: it records each CONNECT, then serves ``site`` itself
    over the same connection, whatever the requested host.  ``reply`` != 0 refuses with that
    SOCKS error code; None never answers the CONNECT (tor building a slow circuit)."""

    def __init__(self, factory: FakeSocksFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.greeted = False
        self.http: Protocol | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.http is not None:
            self.http.dataReceived(data)
            return
        assert self.transport is not None
        self.buffer += data
        if not self.greeted:
            if len(self.buffer) < 2 or len(self.buffer) < 2 + self.buffer[1]:
                return
            assert self.buffer[0] == 5 and 0 in self.buffer[2 : 2 + self.buffer[1]]
            self.buffer = self.buffer[2 + self.buffer[1] :]
            self.transport.write(b"\x05\x00")  # version 5, no authentication
            self.greeted = True
        if len(self.buffer) < 5:
            return
        _, command, _, kind = self.buffer[:4]
        if kind == 3:  # a name, for tor to resolve
            end = 5 + self.buffer[4]
            host = self.buffer[5:end].decode()
        else:
            assert kind == 1, kind
            end = 8
            host = socket.inet_ntoa(self.buffer[4:8])
        if len(self.buffer) < end + 2:
            return
        port = int.from_bytes(self.buffer[end : end + 2], "big")
        rest, self.buffer = self.buffer[end + 2 :], b""
        self.factory.requests.append((command, kind, host, port))
        if self.factory.reply is None:
            return
        self.transport.write(bytes([5, self.factory.reply, 0, 1, 0, 0, 0, 0, 0, 0]))
        if self.factory.reply:
            self.transport.loseConnection()
            return
        self.http = self.factory.site.buildProtocol(None)
        self.http.makeConnection(self.transport)
        if rest:
            self.http.dataReceived(rest)

    def connectionLost(self, reason=None) -> None:
        if self.http is not None:
            self.http.connectionLost(reason)
        if not self.factory.gone.called:
            self.factory.gone.callback(None)


class FakeSocksFactory(Factory):
    def __init__(self, site: Site, reply: int | None) -> None:
        self.site, self.reply = site, reply
        self.requests: list[tuple[int, int, str, int]] = []
        self.gone: Deferred[None] = Deferred()
        self.endpoint = ""

    def buildProtocol(self, addr):
        return FakeSocks(self)


@pytest_twisted.async_yield_fixture
async def fake_tor():
    ports = []

    def start(resource: Resource | None = None, reply: int | None = 0) -> FakeSocksFactory:
        factory = FakeSocksFactory(Site(resource or Resource()), reply)
        ports.append(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        factory.endpoint = f"tcp:127.0.0.1:{ports[-1].getHost().port}"
        return factory

    yield start
    for port in ports:
        await port.stopListening()


REDEEMED = b'{"status": "success", "service_token": "%s", "balance": 7}' % (b"ab" * 32)
ACTIVE = b'{"status": "active", "balance": 7, "issued_at": "2026-01-01T00:00:00Z"}'


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_agent_choice(monkeypatch):
    direct = parse("redeem", PID, "--url", "http://127.0.0.1:1")
    assert direct.socks is None and isinstance(make_agent(reactor, direct), Agent)
    via = parse("status", "ab" * 32, "--url", f"http://{ONION}", "--socks", "tcp:127.0.0.1:9050")
    agent = make_agent(reactor, via)
    assert isinstance(agent, TorAgent) and agent.socks == "tcp:127.0.0.1:9050"
    with pytest.raises(ClientError, match=re.escape("pass --socks tcp:127.0.0.1:9050")):
        make_agent(reactor, parse("redeem", PID, "--url", f"http://{ONION}"))
    with pytest.raises(ClientError, match="not a client endpoint") as caught:
        make_agent(reactor, parse("redeem", PID, "--url", f"http://{ONION}", "--socks", "9050"))
    assert caught.value.exit_code == 2

    monkeypatch.setenv(SOCKS_ENV, "unix:/run/tor/socks")
    assert parse("redeem", PID, "--url", "http://x").socks == "unix:/run/tor/socks"
    assert parse("redeem", PID, "--url", "http://x", "--socks", "tcp:h:1").socks == "tcp:h:1"
    # An empty value, given or in the environment, means direct.
    assert parse("redeem", PID, "--url", "http://x", "--socks", "").socks == ""
    assert isinstance(
        make_agent(reactor, parse("status", "x", "--url", "http://x", "--socks", "")), Agent
    )
    monkeypatch.setenv(SOCKS_ENV, "")
    assert parse("redeem", PID, "--url", "http://x").socks is None


@pytest_twisted.ensureDeferred
async def test_help_mentions_socks():
    for command in ("redeem", "status"):
        code, out, _ = await cli(command, "--help")
        assert code == 0 and "--socks ENDPOINT" in out and SOCKS_ENV in out
    code, out, _ = await cli("new", "--help")
    assert code == 0 and "--socks" not in out


@pytest_twisted.ensureDeferred
async def test_socks_hands_the_onion_name_to_tor_unresolved(fake_tor, monkeypatch):
    tor = fake_tor(Hostile("fixed", 200, REDEEMED))
    code, out, err = await cli("redeem", PID, "--url", f"http://{ONION}", "--socks", tor.endpoint)
    assert (code, err) == (0, "")
    assert re.search(r"^service token: +(ab){32}$", out, re.M)
    assert tor.requests == [(1, 3, ONION, 80)]  # CONNECT, by name

    tor = fake_tor(Hostile("fixed", 200, ACTIVE))
    monkeypatch.setenv(SOCKS_ENV, tor.endpoint)
    code, out, err = await cli("status", "ab" * 32, "--json", "--url", "http://example.org:8080")
    assert (code, err) == (0, "") and json.loads(out)["status"] == "active"
    assert tor.requests == [(1, 3, "example.org", 8080)]  # every request, not only .onion


@pytest_twisted.ensureDeferred
async def test_socks_gets_the_ascii_name_of_a_unicode_dotted_onion(fake_tor):
    tor = fake_tor(Hostile("fixed", 200, REDEEMED))
    url = "http://" + ONION.replace(".onion", "\uff0eonion")
    code, _, err = await cli("redeem", PID, "--url", url, "--socks", tor.endpoint)
    assert (code, err) == (0, "")
    assert tor.requests == [(1, 3, ONION, 80)]


@pytest_twisted.ensureDeferred
async def test_socks_refusal_is_one_line_exit_1(fake_tor):
    tor = fake_tor(reply=4)  # what tor answers while an onion has no descriptor yet
    code, out, err = await cli("redeem", PID, "--url", f"http://{ONION}", "--socks", tor.endpoint)
    assert code == 1 and out == ""
    one_error_line(err, f"cannot reach http://{ONION} through {tor.endpoint}: Host unreachable")


@pytest_twisted.ensureDeferred
async def test_closed_socks_port_is_named(fake_tor):
    url = await closed_port_url()
    endpoint = url.replace("http://", "tcp:")
    code, out, err = await cli("status", "ab" * 32, "--url", f"http://{ONION}", "--socks", endpoint)
    assert code == 1 and out == ""
    one_error_line(err, f"cannot reach the Tor SOCKS port {endpoint}: ")


@pytest_twisted.ensureDeferred
async def test_bad_socks_endpoint_is_a_usage_error():
    code, out, err = await cli(
        "redeem", PID, "--url", f"http://{ONION}", "--socks", "127.0.0.1:9050"
    )
    assert code == 2 and out == ""
    one_error_line(err, "--socks: not a client endpoint like tcp:127.0.0.1:9050")


@pytest_twisted.ensureDeferred
async def test_deadline_hangs_up_a_socks_handshake_tor_never_answers(fake_tor):
    tor = fake_tor(reply=None)
    argv = ["--url", f"http://{ONION}", "--socks", tor.endpoint, "--timeout", "0.3"]
    code, out, err = await cli("redeem", PID, *argv)
    assert code == 1 and out == ""
    one_error_line(err, f"no complete answer from http://{ONION} within 0.3 s")
    await tor.gone.addTimeout(5, reactor)  # the client really hung up


@pytest.mark.parametrize("mode", ["endless", "stall"])
@pytest_twisted.ensureDeferred
async def test_cap_and_deadline_hold_through_socks(fake_tor, mode):
    server = Hostile(mode)
    tor = fake_tor(server)
    argv = ["--url", f"http://{ONION}", "--socks", tor.endpoint, "--timeout", "0.5"]
    code, out, err = await cli("redeem", PID, *argv)
    assert code == 1 and out == ""
    one_error_line(err, "exceeds 64 KiB" if mode == "endless" else "no complete answer")
    await server.gone.addTimeout(5, reactor)
    assert server.sent < 2**20


@pytest_twisted.ensureDeferred
async def test_no_redirects_through_socks(fake_tor):
    tor = fake_tor(Hostile("fixed", 302, b"{}"))
    code, out, err = await cli("redeem", PID, "--url", f"http://{ONION}", "--socks", tor.endpoint)
    assert code == 1 and out == "" and len(tor.requests) == 1
    one_error_line(err, "HTTP 302")


def test_console_script_onion_without_socks_says_how():
    done = script("redeem", PID, "--url", f"http://{ONION}")
    assert done.returncode == 1 and done.stdout == ""
    one_error_line(done.stderr, "run a local tor and pass --socks tcp:127.0.0.1:9050")


@pytest_twisted.ensureDeferred
async def test_version_is_the_package_version():
    from anonticket import __version__

    code, out, err = await cli("--version")
    assert (code, out, err) == (0, f"anonticket-client {__version__}\n", "")
