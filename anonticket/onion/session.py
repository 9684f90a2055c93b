"""One control connection to tor (and the tor process, if we launched it): open it, watch it,
close it.  The onion service makes a new session after every failure."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from anonticket import torcontrol
from anonticket.onion import process as tor_process
from anonticket.onion.add_onion import OnionError, tor_error_text
from anonticket.onion.process import TorProcess
from anonticket.onion.sockets import usable_socket_path
from anonticket.torcontrol import CookiePolicy
from anonticket.torstatus import Bootstrap

__all__ = ["TOR_COOKIE", "TOR_DIR", "OnionTimeouts", "Session"]

TOR_DIR: Final = "tor"
# The launched tor's cookie (tor's default name in its DataDirectory, set explicitly anyway).
TOR_COOKIE: Final = "control_auth_cookie"
_CONTROL_RETRY: Final = 0.05

# One namespace for all of the onion service: operators see it in every log line
# (docs/operations.md) and may filter on it.
log = Logger(namespace="anonticket.onion")


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
class Session:
    """One control connection (and the tor process, if we launched it) and what it holds.

    The service keeps it before opening it, so that stopping at any point finds what there is
    to undo.
    """

    clock: IReactorTime
    timeouts: OnionTimeouts
    protocol: Any = None
    process: TorProcess | None = None
    control_dir: Path | None = None  # private temp dir when the data dir path is unusable
    service_id: str | None = None
    connected: bool = False
    bootstrapped: bool = False
    bootstrap: Bootstrap | None = None  # tor's latest bootstrap report
    published: bool = False  # a descriptor was uploaded
    started: float = 0.0
    timers: list[IDelayedCall] = field(default_factory=list)

    # -- open -----------------------------------------------------------------------------

    async def attach(self, endpoint: Any, description: str, policy: CookiePolicy) -> None:
        """Connect to a running tor's control port and authenticate (SAFECOOKIE)."""
        clock = self.clock
        started = clock.seconds()
        log.info("onion service: connecting to tor at {endpoint}", endpoint=description)
        connecting = defer.ensureDeferred(torcontrol.connect_authenticated(endpoint, policy))
        self.protocol = await connecting.addTimeout(self.timeouts.connect, clock)
        self._watch_connection()
        log.info(
            "onion service: connected to tor {version} in {elapsed:.2f}s (SAFECOOKIE)",
            version=getattr(self.protocol, "version", "?"),
            elapsed=clock.seconds() - started,
        )

    async def launch(
        self,
        reactor: Any,
        data_dir: Path,
        tor_binary: str | None,
        tor_options: Mapping[str, str | list[str]],
    ) -> None:
        """Launch a private tor (DataDirectory ``<data-dir>/tor``), connect to its control
        socket as to any tor (it must prove it knows its cookie) and take ownership of it."""
        clock = self.clock
        t = self.timeouts
        started = clock.seconds()
        if tor_binary is None:
            raise OnionError("tor binary could not be found (searched PATH, /usr/sbin, /usr/bin)")
        tor_dir = data_dir / TOR_DIR
        tor_dir.mkdir(mode=0o700, exist_ok=True)
        control_path = tor_dir / "control"
        if not usable_socket_path(control_path):
            self.control_dir = Path(tempfile.mkdtemp(prefix="anonticket-tor-"))
            control_path = self.control_dir / "control"
        cookie = tor_dir / TOR_COOKIE
        settings = tor_process.TorLaunch(tor_binary, tor_dir, control_path, cookie, tor_options)
        log.info("onion service: launching tor (DataDirectory {path})", path=str(tor_dir))
        self.process = tor_process.spawn_tor(reactor, settings)
        policy = CookiePolicy.for_launched(data_dir, cookie)
        opening = defer.ensureDeferred(self._open_control(reactor, control_path, policy))
        self.protocol = await opening.addTimeout(t.connect, clock)
        self._watch_connection()
        # Tie tor to this connection: it exits when we hang up, whatever becomes of us.
        for command in ("TAKEOWNERSHIP", "RESETCONF __OwningControllerProcess"):
            await self.protocol.queue_command(command).addTimeout(t.command, clock)
        log.info(
            "onion service: tor {version} is up, control connection in {elapsed:.2f}s",
            version=getattr(self.protocol, "version", "?"),
            elapsed=clock.seconds() - started,
        )
        self.timers.append(clock.callLater(t.bootstrap, self._bootstrap_late))

    async def _open_control(self, reactor: Any, path: Path, policy: CookiePolicy) -> Any:
        """The authenticated control connection of the tor we launched, once it listens."""
        assert self.process is not None
        endpoint = UNIXClientEndpoint(reactor, str(path))
        while True:
            if self.process.exit is not None:
                raise OnionError(f"tor exited ({self.process.exit}) before its control port was up")
            try:
                return await torcontrol.connect_authenticated(endpoint, policy)
            except ConnectError:
                # Not there yet: tor makes the socket a moment after it starts.
                await deferLater(self.clock, _CONTROL_RETRY)

    def _bootstrap_late(self) -> None:
        if not self.bootstrapped:
            log.warn(
                "tor has not finished bootstrapping after {timeout:.0f}s; it keeps trying "
                "(no network? a firewall? the clock?)",
                timeout=self.timeouts.bootstrap,
            )

    def _watch_connection(self) -> None:
        self.connected = True

        def lost(_: object) -> None:
            self.connected = False

        self.protocol.when_disconnected().addBoth(lost)

    async def until_disconnected(self) -> None:
        def hung_up(failure: Failure) -> Failure | None:
            # txtorcon reports every hang-up as a TorDisconnectError; only a cancel counts.
            return failure if failure.check(defer.CancelledError) else None

        await self.protocol.when_disconnected().addErrback(hung_up)

    # -- close ----------------------------------------------------------------------------

    async def close(self, *, remove: bool) -> None:
        """Undo the session: DEL_ONION (if *remove*), hang up, stop the tor we launched.

        Raises nothing but CancelledError, and can run again after being interrupted.
        """
        clock = self.clock
        t = self.timeouts
        for call in self.timers:
            if call.active():
                call.cancel()
        protocol = self.protocol
        if protocol is not None and self.connected:
            if remove and self.service_id is not None:
                try:
                    command = f"DEL_ONION {self.service_id}"
                    await protocol.queue_command(command).addTimeout(t.stop, clock)
                    log.info("onion service removed from tor")
                except defer.CancelledError:
                    raise
                except Exception as e:
                    # Hanging up below removes it anyway: it is tied to this connection.
                    log.warn("onion service: DEL_ONION failed: {error}", error=tor_error_text(e))
            with contextlib.suppress(Exception):
                await protocol.quit().addTimeout(t.stop, clock)
            if self.connected and protocol.transport is not None:
                protocol.transport.loseConnection()
        if self.process is not None:
            # TAKEOWNERSHIP makes tor exit as we hang up; make sure it is gone.
            await self.process.stop(clock, t.stop)
        if self.control_dir is not None:
            shutil.rmtree(self.control_dir, ignore_errors=True)
