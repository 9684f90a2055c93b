"""Issue #11, item 1: whatever answers on the configured tor control port while tor is not there
must learn nothing: not a byte of ``secret.key``, not the onion key, not a usable credential.

The impostor is a small fake control port (a LineReceiver) on real loopback sockets, TCP and
unix, that answers like tor; the daemon's OnionService connects to it with its real reconnect
loop.  Each scenario checks everything the impostor received.  A last test shows the fake is
faithful: given tor's cookie, it gets the onion service created.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.resource import Resource
from txtorcon.util import hmac_sha256

from anonticket.metrics import Metrics
from anonticket.onion import (
    OnionService,
    OnionTimeouts,
    add_onion_key_blob,
    load_or_create_onion_key,
    onion_address,
)
from anonticket.torcontrol import (
    DEFAULT_COOKIE_FILES,
    ControlAuthError,
    CookiePolicy,
    parse_authchallenge,
    parse_protocolinfo,
    proven,
    safecookie_hashes,
)
from anonticket.web.service import StartupError
from anonticket.web.site import PrivacySite

from .conftest import reactor

QUICK = OnionTimeouts(
    connect=5, command=5, bootstrap=50, upload=100, stop=1, backoff_base=0.05, backoff_cap=0.1
)
SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"


# -- the impostor ---------------------------------------------------------------------------


class ImpostorProtocol(LineOnlyReceiver):
    delimiter = b"\r\n"
    factory: Impostor

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def lineReceived(self, line: bytes) -> None:
        f = self.factory
        f.received.append(line)
        verb, _, rest = line.decode("ascii", "replace").partition(" ")
        if verb == "PROTOCOLINFO":
            auth = f"AUTH METHODS={f.methods}"
            if f.cookie_file is not None:
                auth += f' COOKIEFILE="{f.cookie_file}"'
            self.reply(["PROTOCOLINFO 1", auth, 'VERSION Tor="0.4.9.11"', "OK"])
        elif verb == "AUTHCHALLENGE":
            client_nonce = bytes.fromhex(rest.split()[1])
            server_nonce = os.urandom(32)
            # It can only compute the server hash over the cookie it knows (or believes in).
            known = f.knows_cookie if f.knows_cookie is not None else os.urandom(32)
            f.server_hash_for = (client_nonce, server_nonce)
            server_hash = hmac_sha256(SERVER_KEY, known + client_nonce + server_nonce)
            self.reply(
                [
                    f"AUTHCHALLENGE SERVERHASH={server_hash.hex().upper()} "
                    f"SERVERNONCE={server_nonce.hex().upper()}"
                ]
            )
        elif verb == "GETINFO":
            answers = {
                "version": "0.4.9.11",
                "signal/names": "RELOAD SHUTDOWN DUMP DEBUG HALT NEWNYM",
                "events/names": "CIRC STREAM HS_DESC STATUS_CLIENT",
                # As a bootstrapped tor says it (the service then waits for the upload).
                "status/bootstrap-phase": 'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"',
            }
            if rest in ("config/names", "config/defaults"):
                self.sendLine(f"250+{rest}=".encode())
                self.sendLine(b".")
                self.sendLine(b"250 OK")
            else:
                self.reply([f"{rest}={answers.get(rest, '')}", "OK"])
        elif verb == "ADD_ONION":
            self.reply([f"ServiceID={f.service_id}", "OK"])
        elif verb == "QUIT":
            self.sendLine(b"250 closing connection")
            assert self.transport is not None
            self.transport.loseConnection()
        else:  # AUTHENTICATE, USEFEATURE, SETEVENTS, GETCONF, DEL_ONION...: all fine by it
            self.sendLine(b"250 OK")

    def reply(self, lines: list[str]) -> None:
        for line in lines[:-1]:
            self.sendLine(b"250-" + line.encode())
        self.sendLine(b"250 " + lines[-1].encode())


class Impostor(protocol.ServerFactory[ImpostorProtocol]):
    protocol = ImpostorProtocol

    def __init__(
        self, methods: str, cookie_file: str | None, knows_cookie: bytes | None = None
    ) -> None:
        self.methods = methods
        self.cookie_file = cookie_file
        self.knows_cookie = knows_cookie
        self.service_id = "x" * 56
        self.received: list[bytes] = []
        self.connections = 0
        self.server_hash_for: tuple[bytes, bytes] | None = None
        self.port: Any = None

    def listen_tcp(self) -> str:
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    def listen_unix(self, path: Path) -> str:
        self.port = reactor.listenUNIX(str(path), self)
        return f"unix:{path}"

    def verbs(self) -> set[str]:
        return {line.split(b" ")[0].decode() for line in self.received}


# -- the daemon side ------------------------------------------------------------------------


@dataclass
class Setup:
    base: Path
    data_dir: Path
    tor_dir: Path  # a directory like tor's own: 0700, where a cookie may legitimately be
    secret: bytes  # <data-dir>/secret.key
    seed: bytes  # <data-dir>/onion.key

    def secrets(self) -> list[bytes]:
        blob = add_onion_key_blob(self.seed)
        expanded = base64.b64decode(blob.split(":", 1)[1])
        return [self.secret, self.seed, expanded]


@pytest.fixture
def setup() -> Iterator[Setup]:
    # Short paths: unix socket paths must stay under ~100 bytes.
    base = Path(tempfile.mkdtemp(prefix="imp-", dir="/tmp"))
    data_dir = base / "data"
    data_dir.mkdir(mode=0o700)
    secret = os.urandom(32)
    fd = os.open(data_dir / "secret.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret)
    os.close(fd)
    tor_dir = base / "tor"
    tor_dir.mkdir(mode=0o700)
    yield Setup(base, data_dir, tor_dir, secret, load_or_create_onion_key(data_dir))
    shutil.rmtree(base, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def impostors() -> AsyncIterator[list[Impostor]]:
    running: list[Impostor] = []
    yield running
    for impostor in running:
        if impostor.port is not None:
            await impostor.port.stopListening()


class Ok(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"ok"


def service(setup: Setup, control: str, **kw: Any) -> OnionService:
    metrics = Metrics()
    return OnionService(
        reactor,
        data_dir=setup.data_dir,
        site=PrivacySite(Ok(), name="public", metrics=metrics, clock=reactor),
        metrics=metrics,
        tor_control=control,
        timeouts=QUICK,
        **kw,
    )


def state(svc: OnionService) -> str:
    for metric in svc._metrics.registry.collect():
        if metric.name == "anonticket_onion_state":
            return next(str(s.labels["anonticket_onion_state"]) for s in metric.samples if s.value)
    raise AssertionError("no onion state")


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not met in time")


async def run_against(
    svc: OnionService,
    impostor: Impostor,
    tries: int = 3,
    started: Callable[[], object] = lambda: None,
) -> None:
    """Let the service try *tries* times (it must keep retrying, not crash), then stop it.
    *started* runs right after start-up, before the first connection attempt gets anywhere."""
    svc.startService()
    started()
    try:
        await until(lambda: impostor.connections >= tries and state(svc) == "failed")
        assert svc.running and svc._loop is not None and not svc._loop.called
    finally:
        await svc.stopService()


def encodings(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.b32encode(secret).rstrip(b"="),
        base64.b32encode(secret).lower().rstrip(b"="),
    ]


def assert_learned_nothing(impostor: Impostor, setup: Setup, *, verbs: set[str]) -> None:
    text = b"\r\n".join(impostor.received)
    for secret in setup.secrets():
        for encoded in encodings(secret):
            assert encoded not in text
    assert impostor.verbs() <= verbs, impostor.received
    assert b"ADD_ONION" not in text and b"AUTHENTICATE" not in text


def refusals(caplog_events: list[str]) -> list[str]:
    return [e.split(" {")[0] for e in caplog_events if "could not connect to tor" in e]


def assert_clean_log(caplog_events: list[str], reason: str) -> None:
    lines = refusals(caplog_events)
    assert lines, caplog_events
    assert all(reason in line for line in lines), lines
    text = "\n".join(caplog_events)
    assert "Traceback" not in text and "Unhandled" not in text


# -- (a) cookie authentication offered with secret.key as the "cookie" ----------------------


@pytest.mark.parametrize("methods", ["COOKIE", "HASHEDPASSWORD,COOKIE", "NULL,COOKIE"])
@pytest_twisted.ensureDeferred
async def test_cookie_auth_naming_secret_key_gets_nothing(
    setup: Setup, impostors: list[Impostor], caplog_events: list[str], methods: str
) -> None:
    impostor = Impostor(methods, str(setup.data_dir / "secret.key"))
    impostors.append(impostor)
    svc = service(setup, impostor.listen_tcp())
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    assert_clean_log(caplog_events, "offers no SAFECOOKIE authentication")
    assert not (setup.data_dir / "onion_hostname").exists()


@pytest_twisted.ensureDeferred
async def test_safecookie_naming_secret_key_is_refused_before_any_challenge(
    setup: Setup, impostors: list[Impostor], caplog_events: list[str]
) -> None:
    impostor = Impostor("COOKIE,SAFECOOKIE", str(setup.data_dir / "secret.key"), setup.secret)
    impostors.append(impostor)
    svc = service(setup, impostor.listen_tcp())
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    assert_clean_log(caplog_events, "it is in the daemon's data directory")


# -- (b) SAFECOOKIE from something that cannot prove it knows tor's cookie ------------------


@pytest_twisted.ensureDeferred
async def test_safecookie_with_a_wrong_server_hash_gets_no_authenticate(
    setup: Setup, impostors: list[Impostor], caplog_events: list[str]
) -> None:
    # tor's genuine cookie sits next to the socket, but the impostor cannot read it.
    cookie = setup.tor_dir / "control_auth_cookie"
    cookie.write_bytes(os.urandom(32))
    cookie.chmod(0o600)
    impostor = Impostor("COOKIE,SAFECOOKIE", str(cookie), knows_cookie=os.urandom(32))
    impostors.append(impostor)
    svc = service(setup, impostor.listen_unix(setup.tor_dir / "control"))
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO", "AUTHCHALLENGE"})
    for secret in encodings(cookie.read_bytes()):
        assert secret not in b"".join(impostor.received)
    assert_clean_log(caplog_events, "did not prove it knows tor's cookie (wrong SERVERHASH)")
    assert not any("SERVERHASH=" in e or "wanted" in e for e in refusals(caplog_events))


@pytest.mark.parametrize("transport", ["tcp", "unix-elsewhere"])
@pytest_twisted.ensureDeferred
async def test_safecookie_with_a_cookie_of_its_own_is_refused(
    setup: Setup,
    impostors: list[Impostor],
    caplog_events: list[str],
    transport: str,
) -> None:
    # It makes a cookie of its own and names it: it could answer the challenge perfectly.
    own = setup.base / "impostor"
    own.mkdir(mode=0o700)
    cookie = own / "cookie"
    cookie.write_bytes(os.urandom(32))
    cookie.chmod(0o600)
    impostor = Impostor("SAFECOOKIE", str(cookie), knows_cookie=cookie.read_bytes())
    impostors.append(impostor)
    if transport == "tcp":
        control = impostor.listen_tcp()
    else:  # tor's cookie names are looked for only next to the socket, not anywhere
        control = impostor.listen_unix(setup.tor_dir / "control")
    svc = service(setup, control)
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    assert_clean_log(
        caplog_events, "not tor's cookie (expected one of: /run/tor/control.authcookie"
    )


@pytest_twisted.ensureDeferred
async def test_no_authentication_at_all_is_refused(
    setup: Setup, impostors: list[Impostor], caplog_events: list[str]
) -> None:
    impostor = Impostor("NULL", None)
    impostors.append(impostor)
    svc = service(setup, impostor.listen_tcp())
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    assert_clean_log(caplog_events, "offers no SAFECOOKIE authentication (offers: NULL)")


# -- (c) cookie files that are not tor's cookie ---------------------------------------------


def _link_to_onion_key(setup: Setup, path: Path) -> str:
    path.symlink_to(setup.data_dir / "onion.key")
    return "it is in the daemon's data directory"


def _link_to_secret_key(setup: Setup, path: Path) -> str:
    path.symlink_to(setup.data_dir / "secret.key")
    return "it is in the daemon's data directory"


def _hard_link_to_secret_key(setup: Setup, path: Path) -> str:
    os.link(setup.data_dir / "secret.key", path)
    return "it has 2 names (hard links)"


def _short(setup: Setup, path: Path) -> str:
    path.write_bytes(os.urandom(31))
    path.chmod(0o600)
    return "31 bytes, a tor cookie has 32"


def _long(setup: Setup, path: Path) -> str:
    path.write_bytes(os.urandom(64))
    path.chmod(0o600)
    return "64 bytes, a tor cookie has 32"


def _fifo(setup: Setup, path: Path) -> str:
    os.mkfifo(path, 0o600)
    return "not a regular file"


def _world_writable(setup: Setup, path: Path) -> str:
    path.write_bytes(os.urandom(32))
    path.chmod(0o666)
    return "writable by other users"


COOKIE_FILES: dict[str, Callable[[Setup, Path], str]] = {
    "symlink-to-onion.key": _link_to_onion_key,
    "symlink-to-secret.key": _link_to_secret_key,
    "hard-link-to-secret.key": _hard_link_to_secret_key,
    "31-bytes": _short,
    "64-bytes": _long,
    "fifo": _fifo,
    "world-writable": _world_writable,
}


@pytest.mark.parametrize("methods", ["SAFECOOKIE,COOKIE", "COOKIE"])
@pytest.mark.parametrize("kind", sorted(COOKIE_FILES))
@pytest_twisted.ensureDeferred
async def test_odd_cookie_files_next_to_the_socket_are_refused(
    setup: Setup,
    impostors: list[Impostor],
    caplog_events: list[str],
    kind: str,
    methods: str,
) -> None:
    cookie = setup.tor_dir / "control_auth_cookie"
    reason = COOKIE_FILES[kind](setup, cookie)
    impostor = Impostor(methods, str(cookie), knows_cookie=setup.secret)
    impostors.append(impostor)
    svc = service(setup, impostor.listen_unix(setup.tor_dir / "control"))
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    if "SAFECOOKIE" in methods:
        assert_clean_log(caplog_events, reason)
    else:
        assert_clean_log(caplog_events, "offers no SAFECOOKIE authentication (offers: COOKIE)")


@pytest.mark.parametrize("name", ["onion.key", "secret.key"])
def test_configured_cookie_file_in_the_data_dir_stops_start_up(setup: Setup, name: str) -> None:
    link = setup.tor_dir / "control.authcookie"
    link.symlink_to(setup.data_dir / name)
    for named in (setup.data_dir / name, link):
        svc = service(setup, "tcp:127.0.0.1:9", tor_cookie_files=[named])
        with pytest.raises(StartupError, match=r"^tor cookie file .*: it is in the data directory"):
            svc.startService()
        assert not svc.running
    with pytest.raises(StartupError, match="not an absolute path"):
        service(setup, "tcp:127.0.0.1:9", tor_cookie_files=[Path("cookie")]).startService()


@pytest.mark.parametrize("name", ["onion.key", "secret.key"])
@pytest_twisted.ensureDeferred
async def test_configured_cookie_file_turned_into_a_link_to_our_keys_is_refused(
    setup: Setup, impostors: list[Impostor], caplog_events: list[str], name: str
) -> None:
    # Fine at start-up; by the time the control port names it, it leads to one of our keys.
    configured = setup.tor_dir / "control.authcookie"
    impostor = Impostor("SAFECOOKIE", str(configured), knows_cookie=setup.secret)
    impostors.append(impostor)
    svc = service(setup, impostor.listen_tcp(), tor_cookie_files=[configured])
    await run_against(svc, impostor, started=lambda: configured.symlink_to(setup.data_dir / name))
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    assert_clean_log(caplog_events, "it is in the daemon's data directory")


@pytest_twisted.ensureDeferred
async def test_socket_dir_that_is_a_symlink_into_the_data_dir_is_refused(
    setup: Setup, impostors: list[Impostor], caplog_events: list[str]
) -> None:
    inside = setup.data_dir / "t"
    inside.mkdir(mode=0o700)
    (inside / "control_auth_cookie").write_bytes(os.urandom(32))
    (inside / "control_auth_cookie").chmod(0o600)
    via = setup.base / "via"
    via.symlink_to(inside)
    cookie = inside / "control_auth_cookie"
    impostor = Impostor("SAFECOOKIE", str(via / "control_auth_cookie"), cookie.read_bytes())
    impostors.append(impostor)
    svc = service(setup, impostor.listen_unix(via / "control"))
    await run_against(svc, impostor)
    assert_learned_nothing(impostor, setup, verbs={"PROTOCOLINFO"})
    assert_clean_log(caplog_events, "it is in the daemon's data directory")


# -- the fake is faithful: what knows tor's cookie gets through -----------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp-configured"])
@pytest_twisted.ensureDeferred
async def test_a_control_port_that_proves_the_cookie_gets_the_service(
    setup: Setup, impostors: list[Impostor], transport: str
) -> None:
    cookie = setup.tor_dir / "control_auth_cookie"
    cookie.write_bytes(os.urandom(32))
    cookie.chmod(0o640)  # tor's CookieAuthFileGroupReadable
    genuine = Impostor("COOKIE,SAFECOOKIE", str(cookie), knows_cookie=cookie.read_bytes())
    genuine.service_id = onion_address(setup.seed).removesuffix(".onion")
    impostors.append(genuine)
    if transport == "unix":
        svc = service(setup, genuine.listen_unix(setup.tor_dir / "control"))
    else:
        svc = service(setup, genuine.listen_tcp(), tor_cookie_files=[cookie])
    svc.startService()
    try:
        await until(lambda: state(svc) == "publishing")
        session = svc._session
        assert session is not None and proven(session.protocol)
    finally:
        await svc.stopService()
    lines = [line.decode() for line in genuine.received]
    assert lines[0] == "PROTOCOLINFO 1"
    assert genuine.server_hash_for is not None
    client_nonce, server_nonce = genuine.server_hash_for
    assert lines[1] == f"AUTHCHALLENGE SAFECOOKIE {client_nonce.hex()}"
    client_hash = hmac_sha256(CLIENT_KEY, cookie.read_bytes() + client_nonce + server_nonce)
    assert lines[2] == f"AUTHENTICATE {client_hash.hex()}"
    [add] = [line for line in lines if line.startswith("ADD_ONION ")]
    assert add.split()[1] == add_onion_key_blob(setup.seed)
    assert genuine.connections == 1


# -- the pieces -----------------------------------------------------------------------------


def test_safecookie_hashes_match_txtorcon_and_the_spec() -> None:
    cookie, client, server = os.urandom(32), os.urandom(32), os.urandom(32)
    server_hash, client_hash = safecookie_hashes(cookie, client, server)
    assert server_hash == hmac_sha256(SERVER_KEY, cookie + client + server)
    assert client_hash == hmac.new(CLIENT_KEY, cookie + client + server, hashlib.sha256).digest()
    assert server_hash != client_hash


def test_parse_protocolinfo() -> None:
    reply = (
        "PROTOCOLINFO 1\n"
        'AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/run/tor/control.authcookie"\n'
        'VERSION Tor="0.4.9.11"\nOK'
    )
    assert parse_protocolinfo(reply) == (
        frozenset({"COOKIE", "SAFECOOKIE"}),
        "/run/tor/control.authcookie",
    )
    escaped = r'AUTH METHODS=SAFECOOKIE COOKIEFILE="/a \"b\"\\c\303\251\n"'
    assert parse_protocolinfo(escaped) == (frozenset({"SAFECOOKIE"}), '/a "b"\\cé\n')
    assert parse_protocolinfo("AUTH METHODS=NULL\nOK") == (frozenset({"NULL"}), None)
    with pytest.raises(ControlAuthError, match="no AUTH line"):
        parse_protocolinfo("PROTOCOLINFO 1\nOK")


@pytest.mark.parametrize(
    "reply",
    [
        "AUTHCHALLENGE SERVERHASH=00 SERVERNONCE=00",
        "AUTHCHALLENGE SERVERNONCE=" + "0" * 64 + " SERVERHASH=" + "0" * 64,
        "AUTHCHALLENGE SERVERHASH=" + "g" * 64 + " SERVERNONCE=" + "0" * 64,
        "OK",
    ],
)
def test_parse_authchallenge_refuses_anything_but_tors_answer(reply: str) -> None:
    with pytest.raises(ControlAuthError, match="malformed"):
        parse_authchallenge(reply)
    good = "AUTHCHALLENGE SERVERHASH=" + "ab" * 32 + " SERVERNONCE=" + "CD" * 32
    assert parse_authchallenge(good) == (b"\xab" * 32, b"\xcd" * 32)


def test_policy_reads_tors_cookie_and_nothing_else(setup: Setup) -> None:
    cookie = setup.tor_dir / "control.authcookie"
    value = os.urandom(32)
    cookie.write_bytes(value)
    cookie.chmod(0o640)
    policy = CookiePolicy.for_attached(setup.data_dir, control_socket=setup.tor_dir / "control")
    assert policy.read_cookie(str(cookie)) == value
    assert set(DEFAULT_COOKIE_FILES) <= set(policy.allowed)
    for odd in ("control.authcookie", "/run/tor/control.authcookie\0"):
        with pytest.raises(ControlAuthError, match="not an absolute path"):
            policy.read_cookie(odd)
    with pytest.raises(ControlAuthError, match=r"'/etc/passwd'\): not tor's cookie"):
        policy.read_cookie("/etc/passwd")
    with pytest.raises(ControlAuthError, match=r"\\n"):  # one log line, whatever it names
        policy.read_cookie("/x\ny")
    # Configured cookie files replace the defaults and the socket's neighbours.
    configured = CookiePolicy.for_attached(
        setup.data_dir, cookie_files=[setup.base / "c"], control_socket=setup.tor_dir / "c"
    )
    assert configured.allowed == (setup.base / "c",)
    with pytest.raises(ControlAuthError, match="not tor's cookie"):
        configured.read_cookie(str(cookie))
    # A group-writable directory: someone else could have put the cookie there.
    setup.tor_dir.chmod(0o770)
    with pytest.raises(ControlAuthError, match="writable by other users"):
        policy.read_cookie(str(cookie))


def test_policy_for_launched_tor_allows_its_cookie_in_the_data_dir(setup: Setup) -> None:
    tor_dir = setup.data_dir / "tor"
    tor_dir.mkdir(mode=0o700)
    cookie = tor_dir / "control_auth_cookie"
    cookie.write_bytes(b"c" * 32)
    cookie.chmod(0o600)
    policy = CookiePolicy.for_launched(setup.data_dir, cookie)
    assert policy.read_cookie(str(cookie)) == b"c" * 32
    for name in ("secret.key", "onion.key"):
        with pytest.raises(ControlAuthError, match="in the daemon's data directory"):
            policy.read_cookie(str(setup.data_dir / name))
    with pytest.raises(ControlAuthError, match="in the daemon's data directory"):
        policy.read_cookie(str(tor_dir / ".." / "secret.key"))


def test_policy_refuses_what_it_cannot_open(setup: Setup) -> None:
    cookie = setup.tor_dir / "control_auth_cookie"
    policy = CookiePolicy.for_attached(setup.data_dir, control_socket=setup.tor_dir / "control")
    with pytest.raises(ControlAuthError, match="No such file"):
        policy.read_cookie(str(cookie))
    if os.geteuid() != 0:  # root reads anything
        cookie.write_bytes(b"c" * 32)
        cookie.chmod(0)
        with pytest.raises(ControlAuthError, match="Permission denied"):
            policy.read_cookie(str(cookie))
    assert stat.S_IMODE(setup.tor_dir.stat().st_mode) == 0o700
