"""The onion service against a real tor (the OS package) that has no network (DisableNetwork 1):
it cannot publish, but it checks our key, address, ADD_ONION line and DoS keywords, and the
service's whole life cycle up to "publishing".  Every tor started here is stopped by PID, and
each also exits by itself if this process dies (__OwningControllerProcess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txtorcon
from treq.client import HTTPClient
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from txtorcon.torcontrolprotocol import TorProtocolError
from zope.interface import implementer

from anonticket.metrics import Metrics
from anonticket.onion import (
    OnionDefenses,
    OnionService,
    OnionTimeouts,
    add_onion_command,
    add_onion_key_blob,
    load_or_create_onion_key,
    onion_address,
    parse_service_id,
)
from anonticket.web.site import PrivacySite

from .conftest import reactor
from .test_onion import VECTOR_ADDRESS, VECTOR_SEED

TOR = shutil.which("tor") or (os.path.exists("/usr/sbin/tor") and "/usr/sbin/tor") or None
pytestmark = pytest.mark.skipif(TOR is None, reason="needs the tor binary (apt-get install tor)")

QUICK = OnionTimeouts(connect=10, command=5, upload=60, stop=3, backoff_base=0.2, backoff_cap=1)


class Tor:
    """A tor without network and with a unix control socket (cookie auth)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.control = directory / "control"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Tor:
        assert TOR is not None
        self.directory.mkdir(mode=0o700, exist_ok=True)
        log = (self.directory / "tor.log").open("ab")
        # fmt: off
        args = [
            TOR, "-f", "/dev/null", "--defaults-torrc", "/dev/null", "--ignore-missing-torrc",
            "DataDirectory", str(self.directory), "ControlPort", f"unix:{self.control}",
            "CookieAuthentication", "1", "SocksPort", "0", "DisableNetwork", "1",
            "Log", "notice stdout", "__OwningControllerProcess", str(os.getpid()),
        ]
        # fmt: on
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while not self.control.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError((self.directory / "tor.log").read_text())
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Short paths: a unix socket path must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ot-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tor(short_dir: Path) -> Iterator[Tor]:
    t = Tor(short_dir / "tor").start()
    yield t
    t.stop()


async def controller(path: Path) -> Any:
    connection = await txtorcon.connect(reactor, UNIXClientEndpoint(reactor, str(path)))
    return connection.protocol


async def hang_up(protocol: Any) -> None:
    await protocol.quit()
    await protocol.when_disconnected().addErrback(lambda _: None)


async def current_onions(protocol: Any) -> set[str]:
    answer = await protocol.get_info("onions/current")
    return set(answer["onions/current"].split())


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError("condition not met in time")


class Ok(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"ok"


def state(metrics: Metrics) -> str:
    for metric in metrics.registry.collect():
        if metric.name == "anonticket_onion_state":
            return next(str(s.labels["anonticket_onion_state"]) for s in metric.samples if s.value)
    raise AssertionError("no onion state")


@implementer(IAgentEndpointFactory)
class _Via:
    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: object) -> Any:
        return self.endpoint


async def fetch(endpoint: Any) -> bytes:
    """GET / through *endpoint*, the way tor reaches the site."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        client = HTTPClient(Agent.usingEndpointFactory(reactor, _Via(endpoint), pool=pool))
        response = await client.get("http://example.onion/", timeout=5)
        body: bytes = await response.content()
        return body
    finally:
        await pool.closeCachedConnections()


# -- raw control-port checks ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_onion_with_our_key_gives_our_address(tor: Tor) -> None:
    protocol = await controller(tor.control)
    try:
        for seed in (VECTOR_SEED, os.urandom(32)):
            command = add_onion_command(add_onion_key_blob(seed), 80, "127.0.0.1:9")
            started = time.monotonic()
            service_id = parse_service_id(await protocol.queue_command(command))
            assert time.monotonic() - started < 1
            assert service_id + ".onion" == onion_address(seed)
            assert service_id in await current_onions(protocol)
            await protocol.queue_command(f"DEL_ONION {service_id}")
            assert service_id not in await current_onions(protocol)
        assert onion_address(VECTOR_SEED) == VECTOR_ADDRESS
    finally:
        await hang_up(protocol)


@pytest_twisted.ensureDeferred
async def test_tor_parses_our_dos_keywords_and_has_none_for_intro_dos(tor: Tor) -> None:
    protocol = await controller(tor.control)
    try:
        assert protocol.version.startswith("0.4.")
        seed = os.urandom(32)
        blob = add_onion_key_blob(seed)
        defended = add_onion_command(blob, 80, "unix:/tmp/nowhere.sock", OnionDefenses())
        service_id = parse_service_id(await protocol.queue_command(defended))
        assert service_id + ".onion" == onion_address(seed)
        # Tor validates each keyword's value: they are parsed, not silently ignored.
        base = "ADD_ONION NEW:ED25519-V3 Flags=DiscardPK"
        refused = {
            f"{base} PoWDefensesEnabled=2 Port=80,127.0.0.1:9": "Invalid PoWDefensesEnabled",
            f"{base} PoWDefensesEnabled=1 PoWQueueRate=x Port=80,127.0.0.1:9": "PoWQueueRate",
            f"{base} PoWDefensesEnabled=1 PoWQueueBurst=-1 Port=80,127.0.0.1:9": "PoWQueueBurst",
            f"{base} MaxStreams=65536 Port=80,127.0.0.1:9": "Invalid MaxStreams",
            "ADD_ONION NEW:ED25519-V3 Flags=Bogus Port=80,127.0.0.1:9": "Invalid 'Flags'",
        }
        # ...and the intro-point DoS defense has no keyword, under any likely name.
        for name in ("EnableIntroDoSDefense", "HiddenServiceEnableIntroDoSDefense", "IntroDoS"):
            refused[f"{base} {name}=1 Port=80,127.0.0.1:9"] = "Unrecognized keyword"
        for command, message in refused.items():
            with pytest.raises(TorProtocolError, match=message):
                await protocol.queue_command(command)
        # An ephemeral service's settings are not configuration: GETCONF shows none of them
        # (tor answers each name without "=value": unset).
        names = [
            "HiddenServicePoWDefensesEnabled",
            "HiddenServiceMaxStreams",
            "HiddenServiceEnableIntroDoSDefense",
        ]
        conf = await protocol.queue_command("GETCONF " + " ".join(names))
        assert sorted(conf.split()) == sorted(names), conf
        assert await current_onions(protocol) == {service_id}
    finally:
        await hang_up(protocol)


def test_intro_dos_defense_needs_a_hidden_service_dir(short_dir: Path) -> None:
    """So not even a tor we launch can give it to an ephemeral (ADD_ONION) service."""
    assert TOR is not None
    # fmt: off
    base = [
        TOR, "--verify-config", "-f", "/dev/null", "--defaults-torrc", "/dev/null",
        "--ignore-missing-torrc", "DataDirectory", str(short_dir / "v"), "SocksPort", "0",
        "DisableNetwork", "1",
    ]
    # fmt: on
    result = subprocess.run(
        [*base, "HiddenServiceEnableIntroDoSDefense", "1"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "HiddenServiceEnableIntroDoSDefense with no preceding HiddenServiceDir" in (
        result.stdout
    )
    hs_dir = short_dir / "hs"
    # fmt: off
    ok = subprocess.run(
        [*base, "HiddenServiceDir", str(hs_dir), "HiddenServicePort", "80 127.0.0.1:9",
         "HiddenServiceEnableIntroDoSDefense", "1"],
        capture_output=True, text=True,
    )
    # fmt: on
    assert ok.returncode == 0, ok.stdout


@pytest_twisted.ensureDeferred
async def test_same_key_same_address_in_a_new_tor(short_dir: Path) -> None:
    seed = os.urandom(32)
    command = add_onion_command(add_onion_key_blob(seed), 80, "127.0.0.1:9")
    ids = []
    for name in ("first", "second"):  # two processes, two empty data dirs
        t = Tor(short_dir / name).start()
        try:
            protocol = await controller(t.control)
            ids.append(parse_service_id(await protocol.queue_command(command)))
            await hang_up(protocol)
        finally:
            t.stop()
    assert ids[0] == ids[1] and ids[0] + ".onion" == onion_address(seed)


# -- the service ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_service_attached_publishes_recreates_and_removes(tor: Tor, short_dir: Path) -> None:
    data_dir = short_dir / "data"
    metrics = Metrics()
    site = PrivacySite(Ok(), name="public", metrics=metrics, clock=reactor)
    svc = OnionService(
        reactor,
        data_dir=data_dir,
        site=site,
        metrics=metrics,
        tor_control=f"unix:{tor.control}",
        timeouts=QUICK,
    )
    svc.startService()
    try:
        await until(lambda: state(metrics) == "bootstrapping")
        address = (data_dir / "onion_hostname").read_text().strip()
        assert address == svc.address == onion_address(load_or_create_onion_key(data_dir))
        assert svc._target.startswith("127.0.0.1:")
        port = int(svc._target.rsplit(":", 1)[1])
        assert await fetch(_tcp(port)) == b"ok"
        probe = add_onion_command(
            add_onion_key_blob(load_or_create_onion_key(data_dir)), 80, svc._target
        )
        protocol = await controller(tor.control)
        with pytest.raises(TorProtocolError, match="collision"):  # tor holds it for svc
            await protocol.queue_command(probe)
        await hang_up(protocol)

        tor.stop()  # tor goes away; the service must come back on a new tor
        await until(lambda: state(metrics) in ("failed", "starting"))
        tor.start()
        await until(lambda: state(metrics) == "bootstrapping")
        assert (data_dir / "onion_hostname").read_text().strip() == address
    finally:
        await svc.stopService()
    assert state(metrics) == "disabled"
    protocol = await controller(tor.control)
    try:
        # Removed: the same key can be added again.
        assert parse_service_id(await protocol.queue_command(probe)) + ".onion" == address
    finally:
        await hang_up(protocol)
    with pytest.raises(ConnectionRefusedError):
        await fetch(_tcp(port))


def _tcp(port: int) -> Any:
    from twisted.internet.endpoints import TCP4ClientEndpoint

    return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)


@pytest_twisted.ensureDeferred
async def test_service_launches_its_own_tor_and_stops_it(short_dir: Path) -> None:
    metrics = Metrics()
    site = PrivacySite(Ok(), name="public", metrics=metrics, clock=reactor)
    svc = OnionService(
        reactor,
        data_dir=short_dir,
        site=site,
        metrics=metrics,
        timeouts=QUICK,
        tor_binary=TOR,
        tor_options={"DisableNetwork": "1"},
    )
    started = time.monotonic()
    svc.startService()
    assert time.monotonic() - started < 0.5  # tor is not waited for
    pid = None
    try:
        # Without network tor stays below 100 %; the service is added to it all the same.
        hostname = short_dir / "onion_hostname"
        await until(lambda: state(metrics) == "bootstrapping" and hostname.exists())
        health = svc.health()
        assert health["state"] == "bootstrapping" and health["bootstrap_percent"] == 0, health
        session = svc._session
        assert session is not None
        assert session.process is not None
        assert session.process.transport is not None
        pid = session.process.transport.pid
        os.kill(pid, 0)
        # Tied to us: tor watches this process until we own it on the control connection.
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        owner = argv.index(b"__OwningControllerProcess")
        assert argv[owner + 1] == str(os.getpid()).encode()
        sock = short_dir / "public.sock"
        assert svc._target == f"unix:{sock}"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert await fetch(UNIXClientEndpoint(reactor, str(sock))) == b"ok"
        assert hostname.read_text().strip() == svc.address
        conf = await session.protocol.get_conf("SocksPort", "DisableNetwork", "DataDirectory")
        assert conf == {
            "SocksPort": "0",
            "DisableNetwork": "1",
            "DataDirectory": str(short_dir / "tor"),
        }
        assert svc._service_id in await current_onions(session.protocol)
    finally:
        await svc.stopService()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (short_dir / "public.sock").exists()
    assert not (short_dir / "tor" / "control").exists()
    assert state(metrics) == "disabled"


@pytest_twisted.ensureDeferred
async def test_a_launched_tor_exits_when_its_owner_hangs_up(short_dir: Path) -> None:
    """TAKEOWNERSHIP: tor goes when our control connection goes, e.g. when the daemon dies."""
    metrics = Metrics()
    site = PrivacySite(Ok(), name="public", metrics=metrics, clock=reactor)
    svc = OnionService(
        reactor,
        data_dir=short_dir,
        site=site,
        metrics=metrics,
        timeouts=QUICK,
        tor_binary=TOR,
        tor_options={"DisableNetwork": "1"},
    )
    svc.startService()
    try:
        await until(lambda: (short_dir / "onion_hostname").exists())
        session = svc._session
        assert session is not None and session.process is not None
        assert session.process.transport is not None
        pid = session.process.transport.pid
        # Only the connection goes: the loop is stopped first, so nothing of ours stops tor.
        assert svc._loop is not None
        svc._loop.cancel()
        session.protocol.transport.loseConnection()
        await until(lambda: session.process is not None and session.process.exit is not None)
        assert session.process.exit == "code 0"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_a_tor_that_cannot_start_fails_fast(
    short_dir: Path, caplog_events: list[str]
) -> None:
    metrics = Metrics()
    site = PrivacySite(Ok(), name="public", metrics=metrics, clock=reactor)
    timeouts = OnionTimeouts(connect=30, backoff_base=30, backoff_cap=30)
    svc = OnionService(
        reactor,
        data_dir=short_dir,
        site=site,
        metrics=metrics,
        timeouts=timeouts,
        tor_binary=TOR,
        tor_options={"DisableNetwork": "1", "NoSuchOption": "1"},
    )
    started = time.monotonic()
    svc.startService()
    try:
        await until(lambda: state(metrics) == "failed")
        assert time.monotonic() - started < 5  # not the 30 s connect timeout
    finally:
        await svc.stopService()
    text = "\n".join(caplog_events)
    assert "tor: Failed to parse/validate config: Unknown option 'NoSuchOption'" in text
    assert "could not launch tor: tor exited (code 1) before its control port was up" in text
    assert "Traceback" not in text and "Unhandled" not in text
