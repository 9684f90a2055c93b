"""The public site as a Tor v3 onion service.

The address comes from our own key, not from tor: ``<data-dir>/onion.key`` holds a 32-byte
Ed25519 seed (0600), so the ``.onion`` is known before tor runs (``anonticket-onion-address``)
and stays the same across restarts and across tors.  The service is *ephemeral* (ADD_ONION): it
lives only as long as our control connection, so a dead daemon never leaves an address that
points at nothing, and a lost connection means creating it again.

Tor is launched (the default: the OS's ``tor``, DataDirectory ``<data-dir>/tor``) or attached
to (``--tor-control``).  The site listens where only tor needs to reach it: a unix socket in the
0700 data dir for a tor we launch, ``127.0.0.1`` for an attached tor (a system tor runs as another
user and cannot enter the data dir).

Whatever answers on the control port must prove it is tor (SAFECOOKIE with tor's own cookie
file, never a file of ours) before it gets anything but a nonce, and ADD_ONION, which carries
the private key, goes only over a connection so proven: see :mod:`anonticket.torcontrol`.

DoS defenses, as checked against tor 0.4.9.11 (tests/test_onion_tor.py):

* proof of work (``PoWDefensesEnabled``, ``PoWQueueRate``, ``PoWQueueBurst``) and a cap on
  concurrent streams per rendezvous circuit (``MaxStreams`` + ``Flags=MaxStreamsCloseCircuit``)
  are ADD_ONION keywords, so they apply whichever tor we use;
* the intro-point DoS defense has no ADD_ONION keyword (tor: "Unrecognized keyword argument"),
  and its torrc options are refused without a preceding ``HiddenServiceDir``, so no ephemeral
  service can have it, launched tor or not.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import os
import random
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.signing
import txtorcon
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.error import ConnectError, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, providedBy

from anonticket import torcontrol
from anonticket.keys import DataDirError, fsync_dir, load_or_create_key_file, prepare_data_dir
from anonticket.metrics import Metrics
from anonticket.torcontrol import CookiePolicy
from anonticket.torstatus import Bootstrap, watch_bootstrap
from anonticket.web.http import PrivacySite
from anonticket.web.service import SiteService, StartupError

__all__ = [
    "HOSTNAME_FILE",
    "ONION_KEY_FILE",
    "DescriptorWatch",
    "OnionDefenses",
    "OnionError",
    "OnionService",
    "OnionTimeouts",
    "add_onion_command",
    "add_onion_key_blob",
    "load_or_create_onion_key",
    "onion_address",
    "parse_service_id",
    "print_address_main",
]

ONION_KEY_FILE: Final = "onion.key"
HOSTNAME_FILE: Final = "onion_hostname"
PUBLIC_SOCKET: Final = "public.sock"
TOR_DIR: Final = "tor"
# The launched tor's cookie (tor's default name in its DataDirectory, set explicitly anyway).
TOR_COOKIE: Final = "control_auth_cookie"
SEED_BYTES: Final = 32
_VERSION: Final = b"\x03"
# sun_path holds 108 bytes on Linux (104 on the BSDs) including the NUL; keep a margin.
MAX_SOCKET_PATH: Final = 100
# Paths that go into an ADD_ONION line or an endpoint string as they are: no quoting needed.
_PLAIN_PATH: Final = re.compile(r"/[A-Za-z0-9._/+@~-]+")
_TARGET: Final = re.compile(r"unix:/[A-Za-z0-9._/+@~-]+|127\.0\.0\.1:\d{1,5}|\[::1\]:\d{1,5}")
_KEY_BLOB: Final = re.compile(r"ED25519-V3:\S+")
_CONTROL_RETRY: Final = 0.05

log = Logger()


class OnionError(Exception):
    """A tor step failed; the message is one line and never holds key material."""


# -- the key and the address (pure) ---------------------------------------------------------


def load_or_create_onion_key(data_dir: Path) -> bytes:
    """The 32-byte Ed25519 seed in ``<data-dir>/onion.key``, made (0600, fsynced) if missing."""
    return _load_or_create(data_dir)[0]


def _load_or_create(data_dir: Path) -> tuple[bytes, bool]:
    return load_or_create_key_file(
        data_dir / ONION_KEY_FILE,
        lambda: bytes(nacl.signing.SigningKey.generate()),
        size=SEED_BYTES,
        # Whoever read it can impersonate the onion service; a new one is a new address.
        if_lost="restore it from backup, or move it away to get a new .onion address",
    )


def onion_address(seed: bytes) -> str:
    """The v3 ``.onion`` address of the key made from *seed* (rend-spec-v3, "encoding onion")."""
    pub = bytes(nacl.signing.SigningKey(seed).verify_key)
    checksum = hashlib.sha3_256(b".onion checksum" + pub + _VERSION).digest()[:2]
    return base64.b32encode(pub + checksum + _VERSION).decode("ascii").lower() + ".onion"


def add_onion_key_blob(seed: bytes) -> str:
    """ADD_ONION's ``ED25519-V3:`` key: the expanded secret key (clamped SHA-512 of the seed)."""
    if len(seed) != SEED_BYTES:
        raise ValueError("an Ed25519 seed is 32 bytes")
    h = bytearray(hashlib.sha512(seed).digest())
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return "ED25519-V3:" + base64.b64encode(bytes(h)).decode("ascii")


# -- the ADD_ONION line and tor's answers (pure) --------------------------------------------


@dataclass(frozen=True)
class OnionDefenses:
    """DoS defenses sent with ADD_ONION (all accepted and range-checked by tor 0.4.9.11).

    ``max_streams`` caps *concurrent* streams (HTTP connections) on one rendezvous circuit; a
    client that goes over it loses the circuit (``MaxStreamsCloseCircuit``) and must pay for a
    new one, which PoW makes expensive under attack.  An API client needs a handful; 32 leaves
    room for an integrator's connection pool.  0 means no cap.  The PoW queue values are tor's
    own defaults, spelled out so an operator sees what is in force.
    """

    pow: bool = True
    pow_queue_rate: int = 250
    pow_queue_burst: int = 2500
    max_streams: int = 32
    close_circuit_on_max_streams: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.max_streams <= 65535:
            raise ValueError("max_streams must be 0..65535")
        if not 0 <= self.pow_queue_rate <= self.pow_queue_burst:
            # tor checks this for torrc services but not for ADD_ONION
            raise ValueError("PoW queue rate must be 0..burst")


def add_onion_command(
    key_blob: str, virtual_port: int, target: str, defenses: OnionDefenses = OnionDefenses()
) -> str:
    """The ADD_ONION line for our key, one port and the defenses.  It holds the private key:
    send it, never log it."""
    if not 1 <= virtual_port <= 65535:
        raise ValueError(f"virtual port {virtual_port} is not 1..65535")
    if not _TARGET.fullmatch(target):
        raise ValueError(f"unsupported onion target {target!r}")
    words = ["ADD_ONION", key_blob]
    if defenses.max_streams and defenses.close_circuit_on_max_streams:
        words.append("Flags=MaxStreamsCloseCircuit")
    if defenses.max_streams:
        words.append(f"MaxStreams={defenses.max_streams}")
    if defenses.pow:
        words += [
            "PoWDefensesEnabled=1",
            f"PoWQueueRate={defenses.pow_queue_rate}",
            f"PoWQueueBurst={defenses.pow_queue_burst}",
        ]
    words.append(f"Port={virtual_port},{target}")
    return " ".join(words)


def parse_service_id(reply: object) -> str:
    """The ``ServiceID`` of tor's answer to ADD_ONION (txtorcon hands over the text lines)."""
    for line in str(reply).splitlines():
        key, _, value = line.strip().partition("=")
        if key == "ServiceID" and value:
            return value
    raise OnionError("tor's answer to ADD_ONION holds no ServiceID")


class DescriptorWatch:
    """Follows the HS_DESC events of one service; :attr:`uploaded` fires at the first upload
    an HSDir accepted.  Tor keeps retrying failed uploads and re-uploads on its own."""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        self.uploaded: defer.Deferred[None] = defer.Deferred()
        self.attempts = 0
        self.failures = 0

    def __call__(self, event: str) -> None:
        # "UPLOAD <id> <auth> <hsdir> ...", "UPLOADED <id> ...", "FAILED <id> ... REASON=..."
        fields = event.split()
        if len(fields) < 2 or fields[1] != self.service_id:
            return
        if fields[0] == "UPLOAD":
            self.attempts += 1
        elif fields[0] == "FAILED":
            self.failures += 1
        elif fields[0] == "UPLOADED" and not self.uploaded.called:
            self.uploaded.callback(None)


def _tor_error_text(error: BaseException) -> str:
    """One line for the log about a failed tor step, with any key material scrubbed
    (txtorcon puts the whole pending command, key included, into its disconnect errors)."""
    if isinstance(error, defer.TimeoutError):
        return "timed out"
    text = (str(error) or type(error).__name__).strip().splitlines()[0][:500]
    return _KEY_BLOB.sub("ED25519-V3:[scrubbed]", text)


# -- the service ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OnionTimeouts:
    """Seconds.  ``connect``: until the control connection is authenticated (for a launched tor,
    counted from the spawn).  ``command``: one control command.  ``bootstrap`` and ``upload``
    only log a line when exceeded: tor keeps trying on its own, and restarting it would only
    start over.  ``stop``: each step of stopping (DEL_ONION, QUIT, tor's exit)."""

    connect: float = 60.0
    command: float = 30.0
    bootstrap: float = 300.0
    upload: float = 300.0
    stop: float = 5.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0


@dataclass(eq=False)
class _Session:
    """One control connection (and the tor process, if we launched it) and what it holds."""

    protocol: Any = None
    process: Any = None  # txtorcon's TorProcessProtocol: .quit(), .transport
    control_dir: Path | None = None  # private temp dir when the data dir path is unusable
    service_id: str | None = None
    connected: bool = False
    bootstrapped: bool = False
    bootstrap: Bootstrap | None = None  # tor's latest bootstrap report
    published: bool = False  # a descriptor was uploaded
    started: float = 0.0
    config: Any = None  # the launched tor's txtorcon TorConfig
    timers: list[IDelayedCall] = field(default_factory=list)


class _Spawner:
    """The reactor as ``txtorcon.launch`` sees it, except that it keeps the tor process.

    launch() hands out its process only once tor has bootstrapped to 100 %, which a tor
    without network never does, while we create the service as soon as the control connection
    is up and must be able to stop that tor at any point.  It also reports tor's end itself:
    txtorcon logs every exit as an error with a traceback, even after a clean stop, which would
    put one into the log at every shutdown.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.protocol: Any = None
        self.ended: defer.Deferred[str] = defer.Deferred()
        alsoProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> Any:
        self.protocol = protocol
        protocol.processEnded = self._process_ended
        return self._reactor.spawnProcess(protocol, *args, **kwargs)

    def _process_ended(self, reason: Failure) -> None:
        self.protocol.cleanup()  # what txtorcon's processEnded does besides logging
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        how = f"code {code}" if code is not None else f"signal {signal}"
        self.ended.callback(how)


class _TorOutput:
    """Tor's stdout/stderr as txtorcon passes them on (str or bytes): warnings reach our log.
    Progress comes through txtorcon's bootstrap events instead."""

    def __init__(self) -> None:
        self._pending = ""

    def write(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        *lines, rest = (self._pending + data).split("\n")
        self._pending = rest[-4096:]
        for line in lines:
            if "[warn]" in line or "[err]" in line:
                log.warn("tor: {message}", message=line.split("] ", 1)[-1].strip())


class OnionService(Service):
    """Publishes the public site as a v3 onion service; see the module docstring.

    ``startService`` loads the key and listens synchronously (a bad key or an unusable socket
    stops start-up with one line); everything involving tor runs afterwards, so the rest of the
    daemon starts whether or not tor is up.  State is in ``metrics.onion_state``.
    """

    name = "onion"

    def __init__(
        self,
        reactor: Any,
        *,
        data_dir: Path,
        site: PrivacySite,
        metrics: Metrics,
        virtual_port: int = 80,
        tor_control: str | None = None,
        timeouts: OnionTimeouts = OnionTimeouts(),
        defenses: OnionDefenses = OnionDefenses(),
        local: str | None = None,
        tor_binary: str | None = None,
        tor_options: Mapping[str, str | list[str]] | None = None,
        tor_cookie_files: Sequence[Path] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        :param tor_control: client endpoint of a running tor's control port (SAFECOOKIE
            authentication); ``None`` launches a private tor.
        :param local: server endpoint for the site instead of the default (the unix socket
            ``<data-dir>/public.sock`` for a launched tor, ``tcp:0:interface=127.0.0.1`` for
            an attached one); a unix socket or a loopback TCP port.
        :param tor_options: extra torrc options for a launched tor (``--tor-config``: bridges,
            a private test network, ``DisableNetwork``); a list value repeats the option.
        :param tor_cookie_files: the only files an attached tor may name as its cookie;
            ``None``: tor's usual places (:data:`torcontrol.DEFAULT_COOKIE_FILES`) and, for a
            ``unix:`` control socket, tor's cookie next to it.  Never a file in *data_dir*.
        :param clock: for timeouts and back-off (tests); defaults to *reactor*.
        """
        if not 1 <= virtual_port <= 65535:
            raise ValueError(f"virtual port {virtual_port} is not 1..65535")
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._data_dir = data_dir.absolute()  # tor refuses relative paths
        self._site = site
        self._metrics = metrics
        self._virtual_port = virtual_port
        self._tor_control = tor_control
        self._timeouts = timeouts
        self._defenses = defenses
        self._local = local
        self._tor_binary = tor_binary
        self._tor_options = dict(tor_options or {})
        self._tor_cookie_files = None if tor_cookie_files is None else list(tor_cookie_files)
        self._cookie_policy: CookiePolicy | None = None
        self._jitter = random.SystemRandom()
        self.address: str | None = None
        self.site_service: SiteService | None = None
        self._service_id = ""
        self._key_blob = ""
        self._target = ""
        self._control_endpoint: Any = None
        self._session: _Session | None = None
        self._loop: defer.Deferred[None] | None = None
        self._announced = False
        self.state = "disabled"

    def _set_state(self, state: str) -> None:
        self.state = state
        self._metrics.onion_state.state(state)

    def _refresh_state(self, session: _Session) -> None:
        """The state a live session is in: tor still bootstrapping (it cannot reach the Tor
        network yet), the service waiting for its first descriptor upload, or published."""
        if self._session is not session or session.protocol is None:
            return
        if session.published:
            self._set_state("published")
        elif session.bootstrap is None or not session.bootstrap.done:
            self._set_state("bootstrapping")
        else:
            self._set_state("publishing")

    def health(self) -> dict[str, Any]:
        """For /healthz: the state, tor's bootstrap progress and what tor last complained of."""
        session = self._session
        bootstrap = None if session is None else session.bootstrap
        return {
            "state": self.state,
            "bootstrap_percent": None if bootstrap is None else bootstrap.percent,
            "bootstrap_summary": None if bootstrap is None else bootstrap.summary,
            "problem": None if bootstrap is None else bootstrap.problem,
        }

    def _tor_reported(self, session: _Session, report: Bootstrap) -> None:
        if self._session is not session:
            return
        before = session.bootstrap
        session.bootstrap = report
        self._metrics.tor_bootstrap_percent.set(report.percent)
        if report.done and (before is None or not before.done):
            session.bootstrapped = True
            log.info(
                "tor bootstrapped ({elapsed:.1f}s after the control connection was made)",
                elapsed=self._clock.seconds() - session.started,
            )
        elif not report.done and (before is None or before.percent != report.percent):
            log.info(
                "tor bootstrap {percent}%: {summary}",
                percent=report.percent,
                summary=report.summary,
            )
        if report.problem and (before is None or before.problem != report.problem):
            log.warn("tor bootstrap problem: {problem}", problem=report.problem)
        self._refresh_state(session)

    # -- start ----------------------------------------------------------------------------

    def startService(self) -> None:
        prepare_data_dir(self._data_dir)
        seed = load_or_create_onion_key(self._data_dir)
        self.address = onion_address(seed)
        self._service_id = self.address.removesuffix(".onion")
        self._key_blob = add_onion_key_blob(seed)
        if self._tor_control is not None:
            try:
                self._control_endpoint = clientFromString(self._reactor, self._tor_control)
            except (ValueError, TypeError, KeyError) as e:
                raise StartupError(
                    f"--tor-control: bad endpoint {self._tor_control!r}: {e}"
                ) from None
            self._cookie_policy = self._attached_policy()
        if self._tor_control is None and self._tor_binary is None:
            # Once, here: txtorcon would run "which tor" in a shell at every launch.  Debian
            # installs tor in /usr/sbin, which is not on a non-root user's PATH.
            search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
            self._tor_binary = shutil.which("tor", path=search)
        site_service = SiteService(
            self._reactor, "public", self._local or self._default_local(), self._site
        )
        site_service.startService()
        assert site_service.port is not None
        try:
            self._target = _target_of(site_service.port)
            add_onion_command(self._key_blob, self._virtual_port, self._target, self._defenses)
        except ValueError as e:
            site_service.stopService()
            raise StartupError(f"--public: {e}") from None
        self.site_service = site_service
        super().startService()
        self._set_state("starting")
        self._loop = defer.ensureDeferred(self._run())
        self._loop.addErrback(self._loop_crashed)

    def _attached_policy(self) -> CookiePolicy:
        socket = None
        if isinstance(self._control_endpoint, UNIXClientEndpoint):
            socket = Path(os.fsdecode(self._control_endpoint._path))
        policy = CookiePolicy.for_attached(
            self._data_dir, cookie_files=self._tor_cookie_files, control_socket=socket
        )
        for path in self._tor_cookie_files or ():
            if not path.is_absolute():
                raise StartupError(f"tor cookie file {path}: not an absolute path")
            if policy.inside_data_dir(path):
                # Our keys are 32 bytes, like a cookie: never offer one as tor's.
                raise StartupError(
                    f"tor cookie file {path}: it is in the data directory {self._data_dir}"
                )
        return policy

    def _default_local(self) -> str:
        if self._tor_control is None:
            path = self._data_dir / PUBLIC_SOCKET
            if _usable_socket_path(path):
                _clear_stale_socket(path)
                # lockfile=0: we removed a stale socket ourselves; mode applies after bind,
                # which is safe because the data dir is 0700.
                return f"unix:{_escape(path)}:mode=600:lockfile=0"
            log.info(
                "onion service: {path} cannot be a unix socket path (too long or unusual "
                "characters); the site listens on 127.0.0.1 instead",
                path=str(path),
            )
        return "tcp:0:interface=127.0.0.1"

    # -- the tor loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        """Get tor, create the service, wait until the connection drops; on any failure clean
        up and try again after a capped, jittered exponential back-off."""
        failures = 0
        while self.running:
            self._set_state("starting")
            step = "launch tor" if self._tor_control is None else "connect to tor"
            try:
                session = await (self._launch() if self._tor_control is None else self._connect())
                step = "read tor's bootstrap status"
                session.started = self._clock.seconds()
                await watch_bootstrap(
                    session.protocol,
                    functools.partial(self._tor_reported, session),
                    self._clock,
                    self._timeouts.command,
                )
                self._refresh_state(session)
                step = "create the onion service"
                await self._publish(session)
                failures = 0
                await self._until_disconnected(session)
                log.warn("onion service: lost the control connection to tor; re-creating")
            except defer.CancelledError:
                return
            except Exception as e:
                log.error(
                    "onion service: could not {step}: {error}", step=step, error=_tor_error_text(e)
                )
            self._set_state("failed")
            try:
                await self._close_session(remove=False)
                if not self.running:
                    return
                delay = self._backoff(failures)
                failures += 1
                log.info("onion service: next try in {delay:.1f}s", delay=delay)
                await deferLater(self._clock, delay)
            except defer.CancelledError:
                return

    def _backoff(self, failures: int) -> float:
        t = self._timeouts
        ceiling = min(t.backoff_cap, t.backoff_base * 2.0 ** min(failures, 30))
        # Jitter keeps several daemons on one system tor from reconnecting in lockstep.
        return ceiling * self._jitter.uniform(0.5, 1.0)

    def _loop_crashed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        self._set_state("failed")
        log.failure("onion service: the tor loop stopped", failure)

    async def _connect(self) -> _Session:
        clock = self._clock
        started = clock.seconds()
        log.info("onion service: connecting to tor at {endpoint}", endpoint=self._tor_control)
        assert self._cookie_policy is not None
        connecting = defer.ensureDeferred(
            torcontrol.connect_authenticated(self._control_endpoint, self._cookie_policy)
        )
        protocol = await connecting.addTimeout(self._timeouts.connect, clock)
        session = self._session = _Session(protocol=protocol)
        self._watch_connection(session)
        log.info(
            "onion service: connected to tor {version} in {elapsed:.2f}s (SAFECOOKIE)",
            version=getattr(protocol, "version", "?"),
            elapsed=clock.seconds() - started,
        )
        return session

    async def _launch(self) -> _Session:
        clock = self._clock
        t = self._timeouts
        started = clock.seconds()
        tor_dir = self._data_dir / TOR_DIR
        tor_dir.mkdir(mode=0o700, exist_ok=True)
        session = self._session = _Session()
        control_path = tor_dir / "control"
        # Tor logs this path on stdout, which txtorcon decodes as ASCII: keep it plain too.
        if not _usable_socket_path(control_path):
            session.control_dir = Path(tempfile.mkdtemp(prefix="anonticket-tor-"))
            control_path = session.control_dir / "control"
        ready: defer.Deferred[Any] = defer.Deferred()
        deadline = clock.seconds() + t.connect
        cookie = tor_dir / TOR_COOKIE
        policy = CookiePolicy.for_launched(self._data_dir, cookie)

        def connection_creator() -> defer.Deferred[Any]:
            return defer.ensureDeferred(
                self._connect_control(control_path, deadline, policy, ready)
            )

        def launch_failed(failure: Failure) -> None:
            if not ready.called:  # no tor binary, or tor would not start
                ready.errback(failure)

        def exited(how: str) -> None:
            # Once connected, a tor that dies shows up as a lost control connection as well.
            log.info("tor exited ({how})", how=how)
            if not ready.called:
                ready.errback(OnionError(f"tor exited ({how}) before its control port was up"))

        config = session.config = txtorcon.TorConfig()
        for option, value in self._tor_options.items():
            setattr(config, option, value)
        # Where we look for it, whatever --tor-config says (launch() turns cookies on).
        config.CookieAuthFile = str(cookie)
        spawner = _Spawner(self._reactor)
        output = _TorOutput()
        log.info("onion service: launching tor (DataDirectory {path})", path=str(tor_dir))
        launching = txtorcon.launch(
            spawner,
            data_directory=str(tor_dir),
            control_port=f"unix:{control_path}",
            socks_port=0,  # a service, not a client: no SOCKS listener
            stdout=output,
            stderr=output,
            kill_on_stderr=False,
            tor_binary=self._tor_binary,
            connection_creator=connection_creator,
            _tor_config=config,  # the only way to pass extra torrc options at launch
        )
        session.process = spawner.protocol
        spawner.ended.addCallback(exited)
        # Bootstrap progress is read from tor's events (watch_bootstrap), as for an attached tor.
        launching.addErrback(launch_failed)
        session.protocol = await ready.addTimeout(t.connect, clock)
        self._watch_connection(session)
        log.info(
            "onion service: tor {version} is up, control connection in {elapsed:.2f}s",
            version=getattr(session.protocol, "version", "?"),
            elapsed=clock.seconds() - started,
        )
        session.timers.append(clock.callLater(t.bootstrap, _bootstrap_late, session, t.bootstrap))
        return session

    async def _connect_control(
        self, path: Path, deadline: float, policy: CookiePolicy, ready: defer.Deferred[Any]
    ) -> Any:
        """Connect to the launched tor and authenticate (as to any tor: it must prove it
        knows its cookie); report to *ready*, return the protocol to txtorcon."""
        # txtorcon connects once tor *logs* that it opens the control socket, which can be
        # before the socket exists, and it never tries again (txtorcon #349): retry until then.
        endpoint = UNIXClientEndpoint(self._reactor, str(path))
        while True:
            try:
                protocol = await endpoint.connect(torcontrol.VerifiedControlFactory(policy))
                break
            except ConnectError:
                if self._clock.seconds() >= deadline:
                    raise
                await deferLater(self._clock, _CONTROL_RETRY)
        try:
            await torcontrol.when_authenticated(protocol)
        except Exception as e:
            if not ready.called:
                ready.errback(Failure(e))
            # Not back to txtorcon, which would log it with a traceback and wait for another
            # "Opening Control listener" line; the loop reports it and stops this tor.
            never: defer.Deferred[Any] = defer.Deferred()
            return await never
        if not ready.called:
            ready.callback(protocol)
        return protocol

    def _watch_connection(self, session: _Session) -> None:
        session.connected = True

        def lost(_: object) -> None:
            session.connected = False

        session.protocol.when_disconnected().addBoth(lost)

    async def _publish(self, session: _Session) -> None:
        clock = self._clock
        t = self._timeouts
        protocol = session.protocol
        if not torcontrol.proven(protocol):
            # The command below carries our private key: only for a control port that proved
            # it is tor (torcontrol); nothing else should ever get here.
            raise OnionError("the control port has not proven it is tor; ADD_ONION not sent")
        watch = DescriptorWatch(self._service_id)
        started = clock.seconds()
        # Listen first: with a warm tor the first upload can follow ADD_ONION within a second.
        listening = defer.maybeDeferred(protocol.add_event_listener, "HS_DESC", watch)
        await listening.addTimeout(t.command, clock)
        command = add_onion_command(
            self._key_blob, self._virtual_port, self._target, self._defenses
        )
        try:
            reply = await protocol.queue_command(command).addTimeout(t.command, clock)
        except defer.CancelledError:
            raise
        except Exception as e:
            raise OnionError(f"ADD_ONION failed: {_tor_error_text(e)}") from None
        session.service_id = parse_service_id(reply)
        if session.service_id != self._service_id:
            raise OnionError(f"tor created {session.service_id}.onion, not {self.address}")
        elapsed = clock.seconds() - started
        assert self.address is not None
        _write_public_file(self._data_dir / HOSTNAME_FILE, self.address + "\n")
        self._refresh_state(session)
        if not self._announced:
            self._announced = True
            log.info(
                "onion service {address} created in {elapsed:.4f}s (port {port}); "
                "waiting for tor to upload its descriptor",
                address=self.address,
                elapsed=elapsed,
                port=self._virtual_port,
            )
        else:
            log.info("onion service re-created in {elapsed:.4f}s", elapsed=elapsed)

        def uploaded(_: object) -> None:
            if self._session is session:
                session.published = True
                self._refresh_state(session)
                log.info(
                    "onion service published: descriptor uploaded {elapsed:.1f}s after creation",
                    elapsed=clock.seconds() - started,
                )

        def late() -> None:
            if self._session is session and not watch.uploaded.called:
                log.warn(
                    "onion service: no descriptor uploaded after {timeout:.0f}s "
                    "({attempts} uploads started, {failures} failed); tor keeps trying",
                    timeout=t.upload,
                    attempts=watch.attempts,
                    failures=watch.failures,
                )

        watch.uploaded.addCallback(uploaded)
        session.timers.append(clock.callLater(t.upload, late))

    async def _until_disconnected(self, session: _Session) -> None:
        def hung_up(failure: Failure) -> Failure | None:
            # txtorcon reports every hang-up as a TorDisconnectError; only a cancel counts.
            return failure if failure.check(defer.CancelledError) else None

        await session.protocol.when_disconnected().addErrback(hung_up)

    async def _close_session(self, *, remove: bool) -> None:
        """Undo the session: DEL_ONION (if *remove*), hang up, stop the tor we launched.

        Raises nothing but CancelledError, and can run again after being interrupted: the
        session is forgotten only at the end.
        """
        session = self._session
        if session is None:
            return
        clock = self._clock
        t = self._timeouts
        for call in session.timers:
            if call.active():
                call.cancel()
        protocol = session.protocol
        if session.config is not None and session.connected:
            # txtorcon reads the launched tor's whole config (a GETCONF per option) right after
            # connecting, in a Deferred nobody can handle: hanging up in the middle of it logs
            # an "Unhandled Error".  Let it finish first (it takes well under a second).
            setup = session.config.post_bootstrap
            if not setup.called:
                waiting: defer.Deferred[Any] = defer.Deferred()

                def settled(result: object) -> object:
                    waiting.callback(None)
                    return result

                setup.addBoth(settled)
                with contextlib.suppress(Exception):
                    await waiting.addTimeout(t.stop, clock)
        if protocol is not None and session.connected:
            if remove and session.service_id is not None:
                try:
                    command = f"DEL_ONION {session.service_id}"
                    await protocol.queue_command(command).addTimeout(t.stop, clock)
                    log.info("onion service removed from tor")
                except defer.CancelledError:
                    raise
                except Exception as e:
                    # Hanging up below removes it anyway: it is tied to this connection.
                    log.warn("onion service: DEL_ONION failed: {error}", error=_tor_error_text(e))
            with contextlib.suppress(Exception):
                await protocol.quit().addTimeout(t.stop, clock)
            if session.connected and protocol.transport is not None:
                protocol.transport.loseConnection()
        if session.process is not None:
            await self._stop_tor(session.process)
        if session.control_dir is not None:
            shutil.rmtree(session.control_dir, ignore_errors=True)
        if self._session is session:
            self._session = None
            self._metrics.tor_bootstrap_percent.clear()  # unknown without a tor

    async def _stop_tor(self, process: Any) -> None:
        # TAKEOWNERSHIP makes tor exit when we hang up; SIGTERM it anyway and make sure it is
        # gone (txtorcon's quit() fires once the process has exited).
        t = self._timeouts
        try:
            await process.quit().addTimeout(t.stop, self._clock)
            return
        except defer.TimeoutError:
            log.warn("tor did not exit within {timeout}s; killing it", timeout=t.stop)
        with contextlib.suppress(ProcessExitedAlready):
            process.transport.signalProcess("KILL")
        with contextlib.suppress(defer.TimeoutError):
            await process.quit().addTimeout(t.stop, self._clock)

    # -- stop -----------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
            await loop
        # The site first: answers in flight still travel through tor's circuits.
        site_service, self.site_service = self.site_service, None
        if site_service is not None:
            await site_service.stopService()
        await self._close_session(remove=True)
        self._set_state("disabled")
        log.info("onion service stopped")


def _bootstrap_late(session: _Session, timeout: float) -> None:
    if not session.bootstrapped:
        log.warn(
            "tor has not finished bootstrapping after {timeout:.0f}s; it keeps trying "
            "(no network? a firewall? the clock?)",
            timeout=timeout,
        )


def _target_of(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, UNIXAddress) and host.name is not None:
        return f"unix:{os.fsdecode(host.name)}"
    if isinstance(host, IPv4Address) and host.host == "127.0.0.1":
        return f"127.0.0.1:{host.port}"
    if isinstance(host, IPv6Address) and host.host == "::1":
        return f"[::1]:{host.port}"
    raise ValueError("the onion's local listener must be a unix socket or on 127.0.0.1/::1")


def _usable_socket_path(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH and bool(_PLAIN_PATH.fullmatch(str(path)))


def _escape(path: Path) -> str:
    """A path as one field of a Twisted endpoint string."""
    return re.sub(r"([\\:=])", r"\\\1", str(path))


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse anything else at that path."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StartupError(f"--public: cannot use {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"--public: {path} exists and is not a socket; move it away")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except BlockingIOError:
        pass  # someone listens, with a full backlog
    except OSError as e:
        raise StartupError(f"--public: cannot use {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise StartupError(
        f"--public: another process listens on {path}; is anonticket already running "
        "with this data dir?"
    )


def _write_public_file(path: Path, text: str) -> None:
    """Replace *path* atomically (0644): readers never see a half-written address."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# -- admin command --------------------------------------------------------------------------


def print_address_main(argv: Sequence[str] | None = None) -> None:
    """``anonticket-onion-address``: print the .onion address from the data directory's key.

    It never makes a key unasked (an operator checking the address of a restored data
    directory must not get a new one); with ``--create`` it makes a missing one, in an existing
    data directory, owned by that directory's owner, so a key made by root for the daemon's
    user is one the daemon can read."""
    env = os.environ.get("ANONTICKET_DATA_DIR", "").strip()
    parser = argparse.ArgumentParser(
        prog="anonticket-onion-address",
        description="Print the .onion address of the public site from <data-dir>/onion.key. "
        "Tor is not needed. The daemon makes the key at its first start; --create makes it now.",
    )
    parser.add_argument(
        "--data-dir",
        default=env or "./anonticket-data",
        help="data directory (env ANONTICKET_DATA_DIR; default ./anonticket-data)",
    )
    parser.add_argument(
        "--create",
        action="store_true",
        help="make the key if the data directory has none (owned by the directory's owner)",
    )
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir.strip() or "./anonticket-data")
    key = data_dir / ONION_KEY_FILE
    try:
        if not os.path.lexists(key):
            if not args.create:
                raise DataDirError(
                    f"no onion key in {data_dir} yet: the daemon makes it at its first start, "
                    "--create makes it now (or restore onion.key from backup)"
                )
            if not data_dir.is_dir():
                raise DataDirError(
                    f"{data_dir} does not exist: create it as the daemon's user first "
                    "(or start the daemon once)"
                )
        seed, created = _load_or_create(data_dir)
        if created:
            _give_to_directory_owner(key, data_dir)
    except DataDirError as e:
        raise SystemExit(f"anonticket-onion-address: {e}") from None
    if created:
        print(
            f"created a new onion key in {key}; back it up: it is the address",
            file=sys.stderr,
        )
    print(onion_address(seed))


def _give_to_directory_owner(key: Path, data_dir: Path) -> None:
    """Run as root for a daemon that runs as another user: the key must be that user's."""
    owner = data_dir.stat()
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(key, owner.st_uid, owner.st_gid, follow_symlinks=False)
