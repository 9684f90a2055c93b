"""Authenticating to tor's control port without trusting whoever answers there.

A control port is just a socket: while tor is down (restarting, not started yet) any local
process can listen on ``127.0.0.1:9051``, and tor's PROTOCOLINFO names the cookie file the
controller should read.  txtorcon believes that answer: it reads whatever file is named and, for
COOKIE authentication, sends its bytes, so an impostor naming ``<data-dir>/secret.key`` receives
the key, then the onion key in ADD_ONION.  Here the daemon instead:

* reads only tor's own cookie file (:class:`CookiePolicy`): one of the paths the operator
  configured or tor's usual locations, never anything that resolves into the daemon's data
  directory (except the cookie of the tor it launched itself), and only a regular 32-byte file
  with one link, in a directory no one else may write to;
* authenticates only with SAFECOOKIE, whose AUTHCHALLENGE makes the server prove it knows the
  cookie (HMAC over cookie, our nonce and its nonce) before we send anything derived from it.
  COOKIE (the cookie itself, to whoever asks), HASHEDPASSWORD and NULL prove nothing about the
  server and are refused: every tor since 0.2.3 offers SAFECOOKIE wherever it offers COOKIE;
* marks the connection :func:`proven` only after that proof and tor's acceptance, and the onion
  service sends ADD_ONION only on a proven connection.

An impostor thus learns that we connected, ``PROTOCOLINFO 1`` and a random nonce, and nothing
else.  What this cannot stop: someone who can read tor's cookie file (tor's group, root), or who
can both listen where we connect and reach tor's real control port (relaying the challenge); see
docs/tor.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from txtorcon.torcontrolprotocol import Event, TorControlProtocol, TorProtocolError

__all__ = [
    "COOKIE_BYTES",
    "DEFAULT_COOKIE_FILES",
    "SOCKET_DIR_COOKIE_NAMES",
    "ControlAuthError",
    "CookiePolicy",
    "VerifiedControlFactory",
    "VerifiedControlProtocol",
    "connect_authenticated",
    "parse_authchallenge",
    "parse_protocolinfo",
    "proven",
    "safecookie_hashes",
    "when_authenticated",
]

COOKIE_BYTES: Final = 32
NONCE_BYTES: Final = 32
SERVER_TO_CONTROLLER: Final = b"Tor safe cookie authentication server-to-controller hash"
CONTROLLER_TO_SERVER: Final = b"Tor safe cookie authentication controller-to-server hash"
# Where a system tor keeps its control cookie: Debian's tor service (CookieAuthFile in
# /usr/share/tor/tor-service-defaults-torrc, /var/run being a link to /run), and tor's own
# default, <DataDirectory>/control_auth_cookie, with the usual DataDirectory of other systems.
DEFAULT_COOKIE_FILES: Final = (
    Path("/run/tor/control.authcookie"),
    Path("/var/run/tor/control.authcookie"),
    Path("/var/lib/tor/control_auth_cookie"),
)
# Names tor's cookie has next to a unix control socket (Debian's tor@ instances, a tor whose
# DataDirectory holds its socket).
SOCKET_DIR_COOKIE_NAMES: Final = ("control.authcookie", "control_auth_cookie")
_AUTH_LINE: Final = re.compile(r"AUTH METHODS=(\S*)(.*)")
_COOKIEFILE: Final = re.compile(r'\sCOOKIEFILE="((?:[^"\\]|\\.)*)"')
_ESCAPE: Final = re.compile(rb"\\([0-7]{1,3}|.)", re.DOTALL)
_C_ESCAPES: Final = {b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_CHALLENGE: Final = re.compile(
    r"AUTHCHALLENGE SERVERHASH=([0-9A-Fa-f]{64}) SERVERNONCE=([0-9A-Fa-f]{64})"
)
_SHOWN_PATH: Final = 120


class ControlAuthError(Exception):
    """We would not (or could not) authenticate: one line for the log, never a secret."""


# -- what tor says (pure) -------------------------------------------------------------------


def parse_protocolinfo(reply: str) -> tuple[frozenset[str], str | None]:
    """The auth methods and the COOKIEFILE (unquoted) of a PROTOCOLINFO answer, as txtorcon
    hands it over (one line per reply line, status codes stripped)."""
    for line in reply.splitlines():
        m = _AUTH_LINE.fullmatch(line.strip())
        if m is None:
            continue
        methods = frozenset(name for name in m.group(1).split(",") if name)
        cookie = _COOKIEFILE.search(m.group(2))
        return methods, None if cookie is None else _unquote(cookie.group(1))
    raise ControlAuthError("the control port's PROTOCOLINFO answer has no AUTH line: not tor")


def _unquote(text: str) -> str:
    """The content of a control-spec QuotedString (tor escapes odd bytes C-style, in octal)."""

    def one(m: re.Match[bytes]) -> bytes:
        escape = m.group(1)
        if escape[:1].isdigit():
            return bytes([int(escape, 8) & 0xFF])
        return _C_ESCAPES.get(escape, escape)

    raw = _ESCAPE.sub(one, text.encode("utf-8", "surrogateescape"))
    return os.fsdecode(raw)


def parse_authchallenge(reply: str) -> tuple[bytes, bytes]:
    """SERVERHASH and SERVERNONCE of tor's answer to AUTHCHALLENGE."""
    m = _CHALLENGE.fullmatch(reply.strip())
    if m is None:
        raise ControlAuthError("the control port's AUTHCHALLENGE answer is malformed: not tor")
    return bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2))


def safecookie_hashes(
    cookie: bytes, client_nonce: bytes, server_nonce: bytes
) -> tuple[bytes, bytes]:
    """``(server hash, client hash)`` of SAFECOOKIE (control-spec, AUTHCHALLENGE): HMAC-SHA256
    keyed with each direction's constant over cookie, client nonce and server nonce."""
    message = cookie + client_nonce + server_nonce
    return (
        hmac.new(SERVER_TO_CONTROLLER, message, hashlib.sha256).digest(),
        hmac.new(CONTROLLER_TO_SERVER, message, hashlib.sha256).digest(),
    )


def _shown(path: str) -> str:
    """A path someone else chose, safe for one log line (no newline, bounded)."""
    return ascii(path[:_SHOWN_PATH])


# -- which cookie we read -------------------------------------------------------------------


@dataclass(frozen=True)
class CookiePolicy:
    """Which file a control port may make us read as tor's cookie.

    :param data_dir: the daemon's data directory: no cookie may resolve into it, it holds our
        secrets (``secret.key`` and ``onion.key`` are 32 bytes, just like a cookie)...
    :param own_cookie: ...except the cookie of the tor we launched (its DataDirectory is
        ``<data-dir>/tor``).
    :param allowed: the cookie files we accept, compared after resolving symlinks.
    """

    data_dir: Path
    allowed: tuple[Path, ...] = DEFAULT_COOKIE_FILES
    own_cookie: Path | None = None

    @classmethod
    def for_attached(
        cls,
        data_dir: Path,
        *,
        cookie_files: Iterable[Path] | None = None,
        control_socket: Path | None = None,
    ) -> CookiePolicy:
        """For a tor the operator runs: the cookie files configured, else tor's usual ones plus
        tor's cookie next to a unix control socket (whoever can write there can also bind the
        socket, so the operator already trusts it as tor)."""
        if cookie_files is not None:
            return cls(data_dir, tuple(Path(p) for p in cookie_files))
        near_socket: tuple[Path, ...] = ()
        if control_socket is not None:
            near_socket = tuple(control_socket.parent / n for n in SOCKET_DIR_COOKIE_NAMES)
        return cls(data_dir, DEFAULT_COOKIE_FILES + near_socket)

    @classmethod
    def for_launched(cls, data_dir: Path, cookie: Path) -> CookiePolicy:
        """For the tor we launched: its own cookie only."""
        return cls(data_dir, (cookie,), own_cookie=cookie)

    def inside_data_dir(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        base = Path(os.path.realpath(self.data_dir))
        return real == base or base in real.parents

    def read_cookie(self, named: str) -> bytes:
        """The 32 bytes of the cookie file a control port *named*, or ControlAuthError."""
        shown = _shown(named)
        refused = f"refused the cookie file the control port named ({shown})"
        if not named.startswith("/") or "\0" in named:
            raise ControlAuthError(f"{refused}: not an absolute path")
        real = os.path.realpath(named)
        own = None if self.own_cookie is None else os.path.realpath(self.own_cookie)
        if self.inside_data_dir(Path(real)) and real != own:
            raise ControlAuthError(f"{refused}: it is in the daemon's data directory")
        if real not in {os.path.realpath(p) for p in self.allowed}:
            expected = ", ".join(str(p) for p in self.allowed)
            raise ControlAuthError(f"{refused}: not tor's cookie (expected one of: {expected})")
        try:
            parent = os.stat(os.path.dirname(real))
            # O_NONBLOCK: a FIFO put there must not hang the reactor; it is refused below.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(real, flags)
        except OSError as e:
            raise ControlAuthError(f"{refused}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            problem = _cookie_problem(info, parent)
            if problem is not None:
                raise ControlAuthError(f"{refused}: {problem}")
            cookie = os.read(fd, COOKIE_BYTES + 1)
        except OSError as e:
            raise ControlAuthError(f"{refused}: {e.strerror}") from None
        finally:
            os.close(fd)
        if len(cookie) != COOKIE_BYTES:
            raise ControlAuthError(f"{refused}: it changed while being read")
        return cookie


def _cookie_problem(info: os.stat_result, parent: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size != COOKIE_BYTES:
        return f"{info.st_size} bytes, a tor cookie has {COOKIE_BYTES}"
    if info.st_nlink != 1:
        # tor writes its cookie afresh (temporary file, rename): a second name means someone
        # linked another file there (one of ours, say).
        return f"it has {info.st_nlink} names (hard links), tor's cookie has one"
    if info.st_mode & 0o022 or parent.st_mode & 0o022:
        # Then someone other than its owner could have written it, and answer the challenge.
        return "it or its directory is writable by other users"
    return None


# -- the protocol ---------------------------------------------------------------------------


class VerifiedControlProtocol(TorControlProtocol):  # type: ignore[misc]
    """txtorcon's control protocol with our authentication and set-up instead of its own (see
    the module docstring), through its public methods only; commands, replies and events are
    txtorcon's.  ``post_bootstrap`` fires as usual once authenticated and set up, or fails
    with :class:`ControlAuthError`, after which the connection is closed."""

    def __init__(self, policy: CookiePolicy, nonce: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__()
        self._policy = policy
        self._nonce = nonce
        self.tor_proven = False

    def connectionMade(self) -> None:
        d = defer.ensureDeferred(self._authenticate())
        d.addCallback(lambda _: defer.ensureDeferred(self._set_up()))
        d.addErrback(self._refuse)

    async def _authenticate(self) -> None:
        try:
            reply = await self.queue_command("PROTOCOLINFO 1")
            methods, cookie_file = parse_protocolinfo(str(reply))
            if "SAFECOOKIE" not in methods:
                offered = ",".join(sorted(methods)) or "none"
                raise ControlAuthError(
                    f"the control port offers no SAFECOOKIE authentication (offers: {offered}); "
                    "anonticket authenticates only to a tor that proves it knows its cookie"
                )
            if cookie_file is None:
                raise ControlAuthError("the control port offers SAFECOOKIE but names no cookie")
            cookie = self._policy.read_cookie(cookie_file)
            client_nonce = self._nonce(NONCE_BYTES)
            reply = await self.queue_command(f"AUTHCHALLENGE SAFECOOKIE {client_nonce.hex()}")
            server_hash, server_nonce = parse_authchallenge(str(reply))
            expected, client_hash = safecookie_hashes(cookie, client_nonce, server_nonce)
            if not hmac.compare_digest(expected, server_hash):
                raise ControlAuthError(
                    "the control port did not prove it knows tor's cookie (wrong SERVERHASH): "
                    "not tor, or tor restarted with a new cookie"
                )
            await self.queue_command(f"AUTHENTICATE {client_hash.hex()}")
        except TorProtocolError as e:
            raise ControlAuthError(f"tor refused to authenticate us: {e}") from None
        except ControlAuthError:
            raise
        except Exception as e:
            # A dropped connection (txtorcon's error names the command) or a garbled answer:
            # either way, not an authenticated tor.
            raise ControlAuthError(
                f"the control connection failed during authentication ({type(e).__name__})"
            ) from None
        self.tor_proven = True

    async def _set_up(self) -> None:
        """What txtorcon's own set-up gives, as far as we use it: tor's version, and the
        event names ``add_event_listener`` accepts (tor's signal names, for ``signal()``, are
        not read: we send none)."""
        self.version = (await self.get_info("version"))["version"]
        names = (await self.get_info("events/names"))["events/names"]
        self.valid_events = {name: Event(name) for name in names.split()}
        await self.queue_command("USEFEATURE EXTENDED_EVENTS")  # no-op since tor 0.2.2
        self.post_bootstrap.callback(self)

    def _refuse(self, failure: Failure) -> None:
        if not self.post_bootstrap.called:
            self.post_bootstrap.errback(failure)
        if self.transport is not None:
            self.transport.loseConnection()


class VerifiedControlFactory(Factory):
    """Builds :class:`VerifiedControlProtocol` connections bound by *policy*."""

    noisy = False  # no "Starting factory" line per control connection

    def __init__(self, policy: CookiePolicy) -> None:
        self._policy = policy

    def buildProtocol(self, addr: IAddress | None) -> VerifiedControlProtocol:
        protocol = VerifiedControlProtocol(self._policy)
        protocol.factory = self
        return protocol


def proven(protocol: object) -> bool:
    """Whether *protocol* is a control connection to something that proved it is tor."""
    return getattr(protocol, "tor_proven", False) is True


def when_authenticated(protocol: Any) -> defer.Deferred[Any]:
    """A new Deferred for *protocol*'s ``post_bootstrap``, firing with the protocol; it can be
    cancelled (a timeout) without touching the original.  A failure is handed to it alone:
    ``post_bootstrap`` then holds None, not a failure nobody handles; on success it keeps its
    result for whoever else waits on it."""
    observed: defer.Deferred[Any] = defer.Deferred()

    def relay(result: object) -> object:
        if not observed.called:
            if isinstance(result, Failure):
                observed.errback(result)
            else:
                observed.callback(protocol)
        return None if isinstance(result, Failure) else result

    protocol.post_bootstrap.addBoth(relay)
    return observed


async def connect_authenticated(endpoint: IStreamClientEndpoint, policy: CookiePolicy) -> Any:
    """Connect to a control port and authenticate as above; the protocol, proven to be tor.
    Cancelling (a timeout) or any failure closes the connection."""
    protocol: Any = await endpoint.connect(VerifiedControlFactory(policy))
    try:
        await when_authenticated(protocol)
    except BaseException:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        raise
    if not proven(protocol):  # cannot happen: post_bootstrap fires only after the proof
        protocol.transport.loseConnection()
        raise ControlAuthError("the control connection is not proven to be tor")
    return protocol
