"""The onion service without a tor binary: key file, address, ADD_ONION line, and the service's
life cycle against txtorcon's FakeControlProtocol (time from a task.Clock)."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nacl.bindings
import nacl.signing
import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from txtorcon.testutil import FakeControlProtocol
from txtorcon.torcontrolprotocol import TorDisconnectError, TorProtocolError

from anonticket import onion, torcontrol
from anonticket.keys import DataDirError
from anonticket.metrics import Metrics
from anonticket.onion import (
    DescriptorWatch,
    OnionDefenses,
    OnionError,
    OnionService,
    OnionTimeouts,
    add_onion_command,
    add_onion_key_blob,
    load_or_create_onion_key,
    onion_address,
    parse_service_id,
    print_address_main,
)
from anonticket.onion import process as tor_process
from anonticket.onion import service as onion_service
from anonticket.onion.process import TorLaunch, TorOutput, TorProcess
from anonticket.torcontrol import DEFAULT_COOKIE_FILES, CookiePolicy
from anonticket.torstatus import Bootstrap, parse_bootstrap
from anonticket.web.service import SiteService, StartupError
from anonticket.web.site import PrivacySite

from .conftest import reactor, tcp_port

# Cross-checked against tor 0.4.9.11 in test_onion_tor.py (tor answered this ServiceID).
VECTOR_SEED = bytes(range(32))
VECTOR_ADDRESS = "aoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4bqead.onion"
VECTOR_BLOB = (
    "ED25519-V3:OJTupJxYCu+BaTV2K+BJVZ1tFEDe3hLmoSXxhB//jm+p1xhio+V0a1cb49GHsAQQRvUuvYUMfL1f3o7jh"
    "HO2SQ=="
)
FAST = OnionTimeouts(
    connect=10, command=10, bootstrap=50, upload=100, stop=2, backoff_base=1, backoff_cap=8
)


# -- key file -------------------------------------------------------------------------------


def test_key_is_created_0600_once_and_reused(tmp_path: Path) -> None:
    seed = load_or_create_onion_key(tmp_path)
    path = tmp_path / "onion.key"
    assert len(seed) == 32
    assert path.read_bytes() == seed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_onion_key(tmp_path) == seed


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    load_or_create_onion_key(tmp_path)
    (tmp_path / "onion.key").chmod(mode)
    with pytest.raises(DataDirError, match=r"accessible to other users .*chmod 600"):
        load_or_create_onion_key(tmp_path)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_key_of_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "onion.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(DataDirError, match="exactly 32 bytes"):
        load_or_create_onion_key(tmp_path)


def test_key_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"k" * 32)
    target.chmod(0o600)
    (tmp_path / "onion.key").symlink_to(target)
    with pytest.raises(DataDirError, match="cannot read"):
        load_or_create_onion_key(tmp_path)


# -- address and key blob -------------------------------------------------------------------


# The known vector and five arbitrary keys, fixed (random.Random(n)): the same test ids in every
# process, which a parallel run (pytest-xdist) requires.
SEEDS = [VECTOR_SEED, *(random.Random(n).randbytes(32) for n in range(5))]


def test_address_known_vector() -> None:
    assert onion_address(VECTOR_SEED) == VECTOR_ADDRESS
    assert add_onion_key_blob(VECTOR_SEED) == VECTOR_BLOB


@pytest.mark.parametrize("seed", SEEDS, ids=str)
def test_address_structure(seed: bytes) -> None:
    address = onion_address(seed)
    assert address.endswith(".onion")
    label = address.removesuffix(".onion")
    assert len(label) == 56 and label == label.lower()
    raw = base64.b32decode(label.upper())
    pub, checksum, version = raw[:32], raw[32:34], raw[34:]
    assert version == b"\x03"
    assert pub == bytes(nacl.signing.SigningKey(seed).verify_key)
    assert checksum == hashlib.sha3_256(b".onion checksum" + pub + b"\x03").digest()[:2]


@pytest.mark.parametrize("seed", SEEDS[:2], ids=str)
def test_key_blob_is_the_expanded_key_of_the_address(seed: bytes) -> None:
    kind, _, b64 = add_onion_key_blob(seed).partition(":")
    expanded = base64.b64decode(b64)
    assert kind == "ED25519-V3" and len(expanded) == 64
    assert expanded[0] & 7 == 0 and expanded[31] & 0xC0 == 0x40  # clamped scalar
    # The scalar times the base point is the public key inside the address.
    pub = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(expanded[:32])
    assert pub == base64.b32decode(onion_address(seed)[:56].upper())[:32]


def test_key_blob_refuses_wrong_seed_size() -> None:
    with pytest.raises(ValueError):
        add_onion_key_blob(b"short")


# -- the ADD_ONION line ---------------------------------------------------------------------


def test_add_onion_command_with_default_defenses() -> None:
    assert add_onion_command("ED25519-V3:KEY", 80, "unix:/srv/anonticket/public.sock") == (
        "ADD_ONION ED25519-V3:KEY Flags=MaxStreamsCloseCircuit MaxStreams=32 "
        "PoWDefensesEnabled=1 PoWQueueRate=250 PoWQueueBurst=2500 "
        "Port=80,unix:/srv/anonticket/public.sock"
    )


def test_add_onion_command_variants() -> None:
    none = OnionDefenses(pow=False, max_streams=0)
    assert add_onion_command("K", 443, "127.0.0.1:8080", none) == (
        "ADD_ONION K Port=443,127.0.0.1:8080"
    )
    soft = OnionDefenses(
        pow=True,
        pow_queue_rate=10,
        pow_queue_burst=100,
        max_streams=5,
        close_circuit_on_max_streams=False,
    )
    assert add_onion_command("K", 80, "[::1]:81", soft) == (
        "ADD_ONION K MaxStreams=5 PoWDefensesEnabled=1 PoWQueueRate=10 PoWQueueBurst=100 "
        "Port=80,[::1]:81"
    )


@pytest.mark.parametrize(
    ("port", "target"),
    [
        (80, "unix:/a path/with space"),
        (80, "unix:relative.sock"),
        (80, "unix:/x,Port=22"),
        (80, "10.0.0.1:80"),
        (80, "127.0.0.1:80 Flags=Detach"),
        (0, "127.0.0.1:80"),
        (65536, "127.0.0.1:80"),
    ],
)
def test_add_onion_command_refuses_what_could_not_be_one_port_line(port: int, target: str) -> None:
    with pytest.raises(ValueError):
        add_onion_command("K", port, target)


def test_defenses_are_range_checked() -> None:
    with pytest.raises(ValueError):
        OnionDefenses(max_streams=70000)
    with pytest.raises(ValueError):
        OnionDefenses(pow_queue_rate=-1)
    with pytest.raises(ValueError):
        OnionDefenses(pow_queue_rate=300, pow_queue_burst=10)


def test_tor_output_forwards_warnings_only(logs: Callable[[str], list[str]]) -> None:
    out = TorOutput()
    out.write(b"Nov 28 09:25:40.922 [notice] Bootstrapped 5% (conn): Con")
    out.write(b"necting\nNov 28 09:25:41.000 [warn] Something odd\n")
    out.write(b"Nov 28 09:25:42.000 [err] Reading config failed\n[warn] caf\xc3")
    out.write(b"\xa9\n[warn] half")  # a character split between two reads
    assert [line.split(" {")[0] for line in logs("tor: ")] == [
        "tor: Something odd",
        "tor: Reading config failed",
        "tor: caf\u00e9",
    ]
    assert all('"log_namespace": "anonticket.onion"' in line for line in logs("tor: "))


def test_parse_service_id() -> None:
    assert parse_service_id("ServiceID=abc\nOK") == "abc"
    assert parse_service_id("ServiceID=abc") == "abc"
    with pytest.raises(OnionError, match="no ServiceID"):
        parse_service_id("OK")


def test_descriptor_watch_follows_one_service() -> None:
    proto = FakeControlProtocol([])
    watch = DescriptorWatch("ours")
    proto.add_event_listener("HS_DESC", watch)
    fire = proto.events["HS_DESC"]
    fire("UPLOAD ours UNKNOWN $AAAA~hsdir0 descid HSDIR_INDEX=x")
    fire("UPLOAD ours UNKNOWN $BBBB~hsdir1 descid HSDIR_INDEX=y")
    fire("FAILED ours UNKNOWN $AAAA~hsdir0 REASON=UPLOAD_REJECTED")
    fire("UPLOADED other UNKNOWN $CCCC~hsdir2")
    assert (watch.attempts, watch.failures, watch.uploaded.called) == (2, 1, False)
    fire("UPLOADED ours UNKNOWN $BBBB~hsdir1")
    fire("UPLOADED ours UNKNOWN $DDDD~hsdir3")  # later uploads change nothing
    assert watch.uploaded.called


# -- the service against a fake tor ---------------------------------------------------------


class FakeControl(FakeControlProtocol):  # type: ignore[misc]
    """txtorcon's fake protocol plus what OnionService uses: scripted answers per command,
    when_disconnected(), quit() and a hang-up."""

    def __init__(self, service_id: str, **answers: Any) -> None:
        super().__init__([])
        self.script: dict[str, Any] = {
            "ADD_ONION": f"ServiceID={service_id}\nOK",
            **answers,
        }
        self.sent: list[str] = []
        self.connected = True
        self._waiting: list[defer.Deferred[None]] = []
        self.transport = SimpleNamespace(loseConnection=self.hang_up)
        self.tor_proven = True  # as after SAFECOOKIE (tests/test_tor_impostor.py checks that)

    def queue_command(self, cmd: str | bytes) -> defer.Deferred[Any]:
        text = cmd.decode() if isinstance(cmd, bytes) else cmd
        self.sent.append(text)
        answer = self.script.get(text.split()[0], "OK")
        if isinstance(answer, defer.Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def get_info(self, key: str) -> defer.Deferred[Any]:
        # Bootstrapped unless a test scripts tor's answer (it is asked as a GETINFO).
        answer = self.script.get("GETINFO", 'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"')
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed({key: answer})

    def bootstrap_event(self, text: str) -> None:
        self.events["STATUS_CLIENT"](text)

    def when_disconnected(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.connected:
            self._waiting.append(d)
        else:
            d.errback(TorDisconnectError("Tor connection terminated", None))
        return d

    def quit(self) -> defer.Deferred[Any]:
        d = self.queue_command("QUIT")
        self.hang_up()
        return d

    def hang_up(self) -> None:
        if self.connected:
            self.connected = False
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.errback(TorDisconnectError("Tor connection terminated", None))

    def upload(self, service_id: str) -> None:
        self.events["HS_DESC"](f"UPLOADED {service_id} UNKNOWN $AAAA~hsdir")

    def verbs(self) -> list[str]:
        return [c.split()[0] for c in self.sent]


class Ok(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"ok"


class FakeProcess:
    """The process transport of a tor that ends as soon as it gets a signal."""

    pid = 4242

    def __init__(self, protocol: TorProcess) -> None:
        self.protocol = protocol
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        if self.protocol.exit is not None:
            raise ProcessExitedAlready()
        self.signals.append(name)
        self.protocol.processEnded(Failure(ProcessTerminated(signal=15)))

    def closeStdin(self) -> None:
        pass


class Harness:
    """An OnionService on a real loopback listener, with tor faked and time on a Clock."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_dir = tmp_path
        self.seed = load_or_create_onion_key(tmp_path)
        self.address = onion_address(self.seed)
        self.service_id = self.address.removesuffix(".onion")
        self.clock = Clock()
        self.metrics = Metrics()
        self.connects: list[float] = []
        # What each connect attempt gets: a FakeControl, an exception, or a pending Deferred.
        self.tors: list[Any] = []
        self.policies: list[CookiePolicy] = []
        monkeypatch.setattr(torcontrol, "connect_authenticated", self._connect)
        # A launched tor: recorded, and it never gets anywhere (it only ends when signalled).
        self.launches: list[TorLaunch] = []
        self.spawned: list[TorProcess] = []
        monkeypatch.setattr(tor_process, "spawn_tor", self._spawn)

    def _connect(self, endpoint: Any, policy: CookiePolicy) -> defer.Deferred[Any]:
        self.connects.append(self.clock.seconds())
        self.policies.append(policy)
        outcome = self.tors.pop(0) if self.tors else defer.Deferred()
        if isinstance(outcome, defer.Deferred):
            return outcome
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        return defer.succeed(outcome)

    def _spawn(self, reactor: Any, launch: TorLaunch) -> TorProcess:
        self.launches.append(launch)
        tor = TorProcess()
        tor.makeConnection(FakeProcess(tor))
        self.spawned.append(tor)
        return tor

    def control(self, **answers: Any) -> FakeControl:
        return FakeControl(self.service_id, **answers)

    def service(
        self,
        *,
        tor_control: str | None = "unix:/nonexistent/control",
        tor_binary: str | None = "/usr/sbin/tor",  # not run: spawn_tor is faked
        **kw: Any,
    ) -> Any:
        site = PrivacySite(Ok(), name="public", metrics=self.metrics, clock=reactor)
        return OnionService(
            reactor,
            data_dir=self.data_dir,
            site=site,
            metrics=self.metrics,
            tor_control=tor_control,
            timeouts=FAST,
            tor_binary=tor_binary,
            clock=self.clock,
            **kw,
        )

    @property
    def tor_signals(self) -> list[str]:
        signals: list[str] = []
        for tor in self.spawned:
            assert isinstance(tor.transport, FakeProcess)  # what _spawn connected it to
            signals += tor.transport.signals
        return signals

    def state(self) -> str:
        for metric in self.metrics.registry.collect():
            if metric.name == "anonticket_onion_state":
                for sample in metric.samples:
                    if sample.value == 1:
                        return str(sample.labels["anonticket_onion_state"])
        raise AssertionError("no onion state")


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(tmp_path, monkeypatch)


@pytest.fixture
def logs(caplog_events: list[str]) -> Iterator[Callable[[str], list[str]]]:
    yield lambda text: [e for e in caplog_events if text in e]


async def until(condition: Callable[[], bool], seconds: float = 5) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not met in time")


def _port(service: OnionService) -> int:
    assert service.site_service is not None
    return tcp_port(service.site_service.port)


@pytest_twisted.ensureDeferred
async def test_start_does_not_wait_for_tor_and_other_sites_serve(
    harness: Harness, http: Any
) -> None:
    pending: defer.Deferred[Any] = defer.Deferred()
    harness.tors = [pending]
    internal_site = PrivacySite(Ok(), name="internal", metrics=harness.metrics, clock=reactor)
    root = MultiService()
    svc = harness.service()
    svc.setServiceParent(root)
    internal = SiteService(reactor, "internal", "tcp:0:interface=127.0.0.1", internal_site)
    internal.setServiceParent(root)
    root.startService()  # returns although tor never answers
    assert harness.state() == "starting" and len(harness.connects) == 1
    assert internal.port is not None
    response = await http.get(f"http://127.0.0.1:{tcp_port(internal.port)}/", timeout=5)
    assert response.code == 200
    # The onion's own listener is up too (loopback TCP, since tor is attached).
    port = _port(svc)
    response = await http.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert await response.content() == b"ok"
    await root.stopService()
    assert pending.called  # the connection attempt was cancelled
    assert harness.state() == "disabled"
    with pytest.raises(ConnectionRefusedError):
        await http.get(f"http://127.0.0.1:{port}/", timeout=5)


@pytest_twisted.ensureDeferred
async def test_publish_then_published_then_stop_removes_it(
    harness: Harness, logs: Callable[[str], list[str]], http: Any
) -> None:
    tor = harness.control()
    harness.tors = [tor]
    svc = harness.service()
    svc.startService()
    port = _port(svc)
    assert tor.sent == [
        f"ADD_ONION {add_onion_key_blob(harness.seed)} Flags=MaxStreamsCloseCircuit "
        "MaxStreams=32 PoWDefensesEnabled=1 PoWQueueRate=250 PoWQueueBurst=2500 "
        f"Port=80,127.0.0.1:{port}"
    ]
    assert harness.state() == "publishing"
    hostname = harness.data_dir / "onion_hostname"
    assert hostname.read_text() == harness.address + "\n"
    assert stat.S_IMODE(hostname.stat().st_mode) == 0o644
    assert len(logs(harness.address)) == 1
    tor.upload("someone-else")
    assert harness.state() == "publishing"
    tor.upload(harness.service_id)
    assert harness.state() == "published"
    await svc.stopService()
    assert tor.sent[1:] == [f"DEL_ONION {harness.service_id}", "QUIT"]
    assert not tor.connected
    assert harness.state() == "disabled"
    # One log namespace for the whole onion service, whichever module logs.
    lines = logs("onion service")
    assert len(lines) >= 4 and logs("onion service removed from tor")
    assert all('"log_namespace": "anonticket.onion"' in line for line in lines)
    with pytest.raises(ConnectionRefusedError):
        await http.get(f"http://127.0.0.1:{port}/", timeout=5)


def _bootstrap_samples(metrics: Metrics) -> list[float]:
    return [
        sample.value
        for metric in metrics.registry.collect()
        if metric.name == "anonticket_tor_bootstrap_percent"
        for sample in metric.samples
    ]


@pytest_twisted.ensureDeferred
async def test_a_tor_that_cannot_reach_the_network_is_bootstrapping_not_publishing(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    tor = harness.control(GETINFO='NOTICE BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting"')
    harness.tors = [tor]
    svc = harness.service()
    assert _bootstrap_samples(harness.metrics) == []  # no tor yet: unknown, not 0
    svc.startService()
    assert harness.state() == "bootstrapping" and tor.verbs() == ["ADD_ONION"]
    assert _bootstrap_samples(harness.metrics) == [5]
    tor.bootstrap_event(
        'WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting to a relay" '
        'WARNING="Connection refused" REASON=CONNECTREFUSED COUNT=3 RECOMMENDATION=warn'
    )
    tor.bootstrap_event("NOTICE CIRCUIT_ESTABLISHED")  # another client status: ignored
    assert svc.health() == {
        "state": "bootstrapping",
        "bootstrap_percent": 5,
        "bootstrap_summary": "Connecting to a relay",
        "problem": "Connection refused (CONNECTREFUSED)",
    }
    assert logs("tor bootstrap problem: Connection refused (CONNECTREFUSED)")
    tor.upload(harness.service_id)  # tor can upload only once bootstrapped; the upload wins
    assert harness.state() == "published"
    await svc.stopService()
    assert _bootstrap_samples(harness.metrics) == []


@pytest_twisted.ensureDeferred
async def test_bootstrap_done_moves_to_publishing_and_is_logged_once(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    tor = harness.control(GETINFO='NOTICE BOOTSTRAP PROGRESS=75 TAG=ap_conn SUMMARY="Almost"')
    harness.tors = [tor]
    svc = harness.service()
    svc.startService()
    assert harness.state() == "bootstrapping"
    assert svc.health()["problem"] is None
    tor.bootstrap_event('NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"')
    tor.bootstrap_event('NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"')
    assert harness.state() == "publishing"
    assert _bootstrap_samples(harness.metrics) == [100]
    assert len(logs("tor bootstrapped")) == 1
    tor.upload(harness.service_id)
    assert harness.state() == "published"
    await svc.stopService()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"',
            Bootstrap(100, "done", "Done"),
        ),
        (
            r'WARN BOOTSTRAP PROGRESS=10 TAG=conn_done SUMMARY="a \"quoted\" word" '
            'WARNING="No route to host" REASON=NOROUTE HOSTADDR=192.0.2.1:443',
            Bootstrap(10, "conn_done", 'a "quoted" word', "No route to host (NOROUTE)"),
        ),
        (
            "WARN BOOTSTRAP PROGRESS=3 TAG=x",
            Bootstrap(3, "x", "", "tor reported a bootstrap problem"),
        ),
        ('NOTICE BOOTSTRAP PROGRESS=1 SUMMARY="bell\x07"', Bootstrap(1, "", "bell?")),
        ("NOTICE CIRCUIT_ESTABLISHED", None),
        ("NOTICE BOOTSTRAP PROGRESS=101 TAG=done", None),
        ("NOTICE BOOTSTRAP PROGRESS=x", None),
        ("NOTICE BOOTSTRAP", None),
        ("", None),
    ],
)
def test_bootstrap_reports_are_parsed_as_tor_writes_them(
    text: str, expected: Bootstrap | None
) -> None:
    assert parse_bootstrap(text) == expected


def test_tors_words_are_bounded() -> None:
    parsed = parse_bootstrap(f'NOTICE BOOTSTRAP PROGRESS=1 SUMMARY="{"x" * 5000}"')
    assert parsed is not None and len(parsed.summary) == 200


@pytest_twisted.ensureDeferred
async def test_upload_timeout_logs_and_keeps_the_service(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    tor = harness.control()
    harness.tors = [tor]
    svc = harness.service()
    svc.startService()
    harness.clock.advance(FAST.upload - 1)
    assert not logs("no descriptor uploaded")
    tor.events["HS_DESC"](f"UPLOAD {harness.service_id} UNKNOWN $AAAA~hsdir")
    tor.events["HS_DESC"](f"FAILED {harness.service_id} UNKNOWN $AAAA~hsdir REASON=X")
    harness.clock.advance(1)
    [line] = logs("no descriptor uploaded after 100s")
    assert "1 uploads started, 1 failed" in line
    assert harness.state() == "publishing" and tor.verbs() == ["ADD_ONION"]
    tor.upload(harness.service_id)  # a late upload still counts
    assert harness.state() == "published"
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_recreated_after_the_control_connection_drops(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    first, second = harness.control(), harness.control()
    harness.tors = [first, second]
    svc = harness.service()
    svc.startService()
    first.upload(harness.service_id)
    assert harness.state() == "published"
    first.hang_up()
    assert harness.state() == "failed" and logs("lost the control connection")
    assert len(harness.connects) == 1
    harness.clock.advance(FAST.backoff_base)  # first retry comes within the base delay
    assert len(harness.connects) == 2
    assert second.verbs() == ["ADD_ONION"] and harness.state() == "publishing"
    assert logs("re-created") and len(logs(harness.address)) == 1  # address logged once
    second.upload(harness.service_id)
    assert harness.state() == "published"
    first.upload(harness.service_id)  # a stale session's events change nothing
    await svc.stopService()
    assert second.verbs()[-2:] == ["DEL_ONION", "QUIT"] and first.verbs() == ["ADD_ONION"]


@pytest_twisted.ensureDeferred
async def test_connect_failures_back_off_exponentially_capped(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    harness.tors = [ConnectionRefusedError("nope")] * 6 + [harness.control()]
    svc = harness.service()
    svc.startService()
    assert harness.state() == "failed"
    for _ in range(600):
        harness.clock.advance(0.1)
    assert harness.state() == "publishing"
    gaps = [b - a for a, b in zip(harness.connects, harness.connects[1:], strict=False)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert len(gaps) == 6
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        assert ceiling / 2 - 0.1 <= gap <= ceiling + 0.1  # jittered, never above the cap
    assert len(logs("could not connect to tor: Connection was refused")) == 6
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_add_onion_timeout_hangs_up_and_retries(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    stuck = harness.control(ADD_ONION=defer.Deferred())
    harness.tors = [stuck, harness.control()]
    svc = harness.service()
    svc.startService()
    assert harness.state() == "publishing"  # tor is bootstrapped; ADD_ONION is in flight
    harness.clock.advance(FAST.command)
    assert logs("could not create the onion service: ADD_ONION failed: timed out")
    assert harness.state() == "failed" and stuck.verbs() == ["ADD_ONION", "QUIT"]
    harness.clock.advance(FAST.backoff_base)
    assert harness.state() == "publishing"
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_errors_never_log_the_key(harness: Harness, caplog_events: list[str]) -> None:
    blob = add_onion_key_blob(harness.seed)
    dropped = TorDisconnectError(
        f"Tor unexpectedly disconnected while running: ADD_ONION {blob}", None
    )
    harness.tors = [harness.control(ADD_ONION=dropped)]
    svc = harness.service()
    svc.startService()
    await svc.stopService()
    text = "\n".join(caplog_events)
    assert "ED25519-V3:[scrubbed]" in text
    assert blob.split(":")[1] not in text and blob.split(":")[1][:20] not in text


@pytest_twisted.ensureDeferred
async def test_tor_errors_and_a_foreign_service_id_are_retried(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    harness.tors = [
        harness.control(ADD_ONION=TorProtocolError(550, "Onion address collision")),
        harness.control(ADD_ONION="ServiceID=" + "a" * 56 + "\nOK"),
    ]
    svc = harness.service()
    svc.startService()
    assert logs("ADD_ONION failed: 550 Onion address collision")
    harness.clock.advance(FAST.backoff_cap)
    assert logs(f"not {harness.address}") and harness.state() == "failed"
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_when_del_onion_hangs(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    tor = harness.control(DEL_ONION=defer.Deferred())
    harness.tors = [tor]
    svc = harness.service()
    svc.startService()
    stopping = svc.stopService()
    await until(lambda: "DEL_ONION" in tor.verbs())  # after the site has stopped
    harness.clock.advance(FAST.stop)
    await stopping
    assert logs("DEL_ONION failed: timed out") and not tor.connected


@pytest_twisted.ensureDeferred
async def test_add_onion_only_over_a_connection_proven_to_be_tor(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    unproven, proven = harness.control(), harness.control()
    unproven.tor_proven = False
    harness.tors = [unproven, proven]
    svc = harness.service()
    svc.startService()
    assert unproven.verbs() == ["QUIT"]  # no ADD_ONION, so no key
    assert logs("the control port has not proven it is tor; ADD_ONION not sent")
    harness.clock.advance(FAST.backoff_base)
    assert proven.verbs() == ["ADD_ONION"] and harness.state() == "publishing"
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_attached_cookie_policy(harness: Harness) -> None:
    svc = harness.service(tor_control="unix:/run/tor-instances/a/control")
    svc.startService()
    [policy] = harness.policies
    assert policy.data_dir == harness.data_dir.absolute() and policy.own_cookie is None
    assert policy.allowed == (
        *DEFAULT_COOKIE_FILES,
        Path("/run/tor-instances/a/control.authcookie"),
        Path("/run/tor-instances/a/control_auth_cookie"),
    )
    await svc.stopService()
    svc = harness.service(tor_control="tcp:127.0.0.1:9051", tor_cookie_files=[Path("/c/k")])
    svc.startService()
    assert harness.policies[1].allowed == (Path("/c/k"),)
    await svc.stopService()


# -- the local listener ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_launch_mode_listens_on_a_private_unix_socket(harness: Harness) -> None:
    options = {
        "DisableNetwork": "1",
        "DirAuthority": ["a 127.0.0.1:1 AA", "b 127.0.0.1:2 BB"],
        "SOCKSPort": "9050",  # ours, in another spelling: left out, not a second port
        "cookieauthentication": "0",
        "ControlSocket": "/tmp/elsewhere",
    }
    svc = harness.service(tor_control=None, tor_options=options)
    sock = harness.data_dir / "public.sock"
    sock_probe = socket.socket(socket.AF_UNIX)
    sock_probe.bind(str(sock))  # a stale socket from a crashed daemon: nobody listens
    sock_probe.close()
    svc.startService()
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert svc._target == f"unix:{sock}"
    [launch] = harness.launches
    tor_dir = harness.data_dir / "tor"
    assert stat.S_IMODE(tor_dir.stat().st_mode) == 0o700
    # The operator's options (a list repeats one), then ours, which replace theirs.
    # fmt: off
    assert launch.arguments(31337) == [
        "/usr/sbin/tor", "-f", "/dev/null", "--ignore-missing-torrc",
        "DisableNetwork", "1",
        "DirAuthority", "a 127.0.0.1:1 AA", "DirAuthority", "b 127.0.0.1:2 BB",
        "DataDirectory", str(tor_dir),
        "ControlPort", f"unix:{tor_dir / 'control'}",
        "CookieAuthentication", "1",
        "CookieAuthFile", str(tor_dir / "control_auth_cookie"),
        "SocksPort", "0",
        "__OwningControllerProcess", "31337",
    ]
    # fmt: on
    await svc.stopService()
    assert not sock.exists()
    assert harness.tor_signals == ["TERM"]  # and it was stopped


@pytest_twisted.ensureDeferred
async def test_launched_tor_is_owned_before_the_onion_and_stopped_after_it(
    harness: Harness, logs: Callable[[str], list[str]]
) -> None:
    tor = harness.control()
    harness.tors = [tor]
    svc = harness.service(tor_control=None)
    svc.startService()
    assert harness.state() == "publishing"
    [policy] = harness.policies  # its own cookie only, as any tor must prove it knows it
    assert policy.allowed == (harness.data_dir / "tor" / "control_auth_cookie",)
    assert policy.own_cookie == policy.allowed[0]
    assert tor.verbs() == ["TAKEOWNERSHIP", "RESETCONF", "ADD_ONION"]
    assert tor.sent[1] == "RESETCONF __OwningControllerProcess"
    assert logs("launching tor (DataDirectory") and logs("control connection in")
    await svc.stopService()
    assert tor.verbs()[3:] == ["DEL_ONION", "QUIT"] and harness.tor_signals == ["TERM"]
    assert logs("tor exited (signal 15)") and not logs("killing it")


@pytest_twisted.ensureDeferred
async def test_no_tor_binary_is_one_line_and_retried(
    harness: Harness, logs: Callable[[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onion_service, "find_tor", lambda: None)
    svc = harness.service(tor_control=None, tor_binary=None)
    svc.startService()
    assert harness.state() == "failed" and not harness.launches
    assert logs("could not launch tor: tor binary could not be found (searched PATH, /usr/sbin")
    harness.clock.advance(FAST.backoff_base)
    assert len(logs("tor binary could not be found")) == 2
    await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_long_data_dir_falls_back_to_loopback_and_a_short_control_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    h = Harness(deep, monkeypatch)
    svc = h.service(tor_control=None)
    svc.startService()
    assert svc._target.startswith("127.0.0.1:")
    control = str(h.launches[0].control_socket)
    assert len(control) < 100 and Path(control).parent.stat().st_mode & 0o077 == 0
    await svc.stopService()
    assert not Path(control).parent.exists()


def test_a_file_in_the_way_or_a_live_socket_stops_start_up(harness: Harness) -> None:
    sock = harness.data_dir / "public.sock"
    sock.write_text("not a socket")
    with pytest.raises(StartupError, match="is not a socket"):
        harness.service(tor_control=None).startService()
    sock.unlink()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sock))
    live.listen(1)
    try:
        with pytest.raises(StartupError, match="another process listens"):
            harness.service(tor_control=None).startService()
    finally:
        live.close()


def test_start_up_errors_are_one_line(harness: Harness) -> None:
    with pytest.raises(StartupError, match="--tor-control: bad endpoint"):
        harness.service(tor_control="bogus:thing").startService()
    (harness.data_dir / "onion.key").chmod(0o644)
    with pytest.raises(DataDirError, match="chmod 600"):
        harness.service().startService()


@pytest_twisted.ensureDeferred
async def test_a_busy_local_port_stops_start_up(harness: Harness) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        svc = harness.service(local=f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1")
        with pytest.raises(StartupError, match="--public: cannot listen"):
            svc.startService()
        assert not svc.running and not harness.connects
    finally:
        busy.close()


def test_a_non_loopback_local_listener_is_refused(harness: Harness) -> None:
    svc = harness.service(local="tcp:0:interface=0.0.0.0")
    with pytest.raises(StartupError, match=r"on 127\.0\.0\.1"):
        svc.startService()


@pytest_twisted.ensureDeferred
async def test_a_tor_that_ignores_sigterm_is_killed(
    tmp_path: Path, logs: Callable[[str], list[str]]
) -> None:
    pid_file = tmp_path / "pid"
    fake_tor = tmp_path / "fake-tor"
    fake_tor.write_text(
        f"#!{sys.executable}\n"
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('[notice] Opening Control listener on nowhere', flush=True)\n"
        "time.sleep(30)\n"
    )
    fake_tor.chmod(0o700)
    metrics = Metrics()
    svc = OnionService(
        reactor,
        data_dir=tmp_path / "data",
        site=PrivacySite(Ok(), name="public", metrics=metrics, clock=reactor),
        metrics=metrics,
        tor_binary=str(fake_tor),
        timeouts=OnionTimeouts(connect=0.5, stop=0.5, backoff_base=30, backoff_cap=30),
    )
    svc.startService()
    try:
        await until(lambda: bool(logs("next try in")))  # its control port never came up
        assert logs("could not launch tor: timed out") and logs("killing it")
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    finally:
        await svc.stopService()


# -- the admin command ----------------------------------------------------------------------


def test_print_address_never_makes_a_key_unasked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(SystemExit, match=r"^anonticket-onion-address: no onion key in .*--create"):
        print_address_main(["--data-dir", str(data_dir)])
    assert not data_dir.exists()  # neither the key nor the directory was made
    with pytest.raises(SystemExit, match="does not exist: create it as the daemon's user"):
        print_address_main(["--data-dir", str(data_dir), "--create"])
    data_dir.mkdir(mode=0o700)
    print_address_main(["--data-dir", str(data_dir), "--create"])
    out, err = capsys.readouterr()
    address = out.strip()
    assert address == onion_address((data_dir / "onion.key").read_bytes())
    assert "created a new onion key" in err
    monkeypatch.setenv("ANONTICKET_DATA_DIR", f"  {data_dir}  ")
    print_address_main([])
    assert capsys.readouterr() == (address + "\n", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a key for another user")
def test_a_key_made_by_root_belongs_to_the_data_directorys_owner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, 65534, 65534)  # the daemon's user (nobody here)
    print_address_main(["--data-dir", str(data_dir), "--create"])
    info = os.stat(data_dir / "onion.key")
    assert (info.st_uid, info.st_gid) == (65534, 65534)
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_print_address_bad_key_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "onion.key").write_bytes(b"x" * 32)
    (tmp_path / "onion.key").chmod(0o644)
    with pytest.raises(SystemExit, match=r"^anonticket-onion-address: .*chmod 600"):
        print_address_main(["--data-dir", str(tmp_path)])


def test_module_exports() -> None:
    assert set(onion.__all__) <= set(dir(onion))
