"""One control connection to tor (and the tor process, if we launched it): open it, watch it,
close it.  The onion service makes a new session after every failure."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import txtorcon
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from anonticket import torcontrol
from anonticket.onion.add_onion import OnionError, tor_error_text
from anonticket.onion.process import Spawner, TorOutput
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
        tor_options: dict[str, str | list[str]],
    ) -> None:
        """Launch a private tor (DataDirectory ``<data-dir>/tor``) and connect to it."""
        clock = self.clock
        t = self.timeouts
        started = clock.seconds()
        tor_dir = data_dir / TOR_DIR
        tor_dir.mkdir(mode=0o700, exist_ok=True)
        control_path = tor_dir / "control"
        # Tor logs this path on stdout, which txtorcon decodes as ASCII: keep it plain too.
        if not usable_socket_path(control_path):
            self.control_dir = Path(tempfile.mkdtemp(prefix="anonticket-tor-"))
            control_path = self.control_dir / "control"
        ready: defer.Deferred[Any] = defer.Deferred()
        deadline = clock.seconds() + t.connect
        cookie = tor_dir / TOR_COOKIE
        policy = CookiePolicy.for_launched(data_dir, cookie)

        def connection_creator() -> defer.Deferred[Any]:
            return defer.ensureDeferred(
                self._connect_control(reactor, control_path, deadline, policy, ready)
            )

        def launch_failed(failure: Failure) -> None:
            if not ready.called:  # no tor binary, or tor would not start
                ready.errback(failure)

        def exited(how: str) -> None:
            # Once connected, a tor that dies shows up as a lost control connection as well.
            log.info("tor exited ({how})", how=how)
            if not ready.called:
                ready.errback(OnionError(f"tor exited ({how}) before its control port was up"))

        config = self.config = txtorcon.TorConfig()
        for option, value in tor_options.items():
            setattr(config, option, value)
        # Where we look for it, whatever --tor-config says (launch() turns cookies on).
        config.CookieAuthFile = str(cookie)
        spawner = Spawner(reactor)
        output = TorOutput()
        log.info("onion service: launching tor (DataDirectory {path})", path=str(tor_dir))
        launching = txtorcon.launch(
            spawner,
            data_directory=str(tor_dir),
            control_port=f"unix:{control_path}",
            socks_port=0,  # a service, not a client: no SOCKS listener
            stdout=output,
            stderr=output,
            kill_on_stderr=False,
            tor_binary=tor_binary,
            connection_creator=connection_creator,
            _tor_config=config,  # the only way to pass extra torrc options at launch
        )
        self.process = spawner.protocol
        spawner.ended.addCallback(exited)
        # Bootstrap progress is read from tor's events (watch_bootstrap), as for an attached tor.
        launching.addErrback(launch_failed)
        self.protocol = await ready.addTimeout(t.connect, clock)
        self._watch_connection()
        log.info(
            "onion service: tor {version} is up, control connection in {elapsed:.2f}s",
            version=getattr(self.protocol, "version", "?"),
            elapsed=clock.seconds() - started,
        )
        self.timers.append(clock.callLater(t.bootstrap, self._bootstrap_late))

    async def _connect_control(
        self,
        reactor: Any,
        path: Path,
        deadline: float,
        policy: CookiePolicy,
        ready: defer.Deferred[Any],
    ) -> Any:
        """Connect to the launched tor and authenticate (as to any tor: it must prove it
        knows its cookie); report to *ready*, return the protocol to txtorcon."""
        # txtorcon connects once tor *logs* that it opens the control socket, which can be
        # before the socket exists, and it never tries again (txtorcon #349): retry until then.
        endpoint = UNIXClientEndpoint(reactor, str(path))
        while True:
            try:
                protocol = await endpoint.connect(torcontrol.VerifiedControlFactory(policy))
                break
            except ConnectError:
                if self.clock.seconds() >= deadline:
                    raise
                await deferLater(self.clock, _CONTROL_RETRY)
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
        if self.config is not None and self.connected:
            # txtorcon reads the launched tor's whole config (a GETCONF per option) right after
            # connecting, in a Deferred nobody can handle: hanging up in the middle of it logs
            # an "Unhandled Error".  Let it finish first (it takes well under a second).
            setup = self.config.post_bootstrap
            if not setup.called:
                waiting: defer.Deferred[Any] = defer.Deferred()

                def settled(result: object) -> object:
                    waiting.callback(None)
                    return result

                setup.addBoth(settled)
                with contextlib.suppress(Exception):
                    await waiting.addTimeout(t.stop, clock)
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
            await self._stop_tor(self.process)
        if self.control_dir is not None:
            shutil.rmtree(self.control_dir, ignore_errors=True)

    async def _stop_tor(self, process: Any) -> None:
        # TAKEOWNERSHIP makes tor exit when we hang up; SIGTERM it anyway and make sure it is
        # gone (txtorcon's quit() fires once the process has exited).
        t = self.timeouts
        try:
            await process.quit().addTimeout(t.stop, self.clock)
            return
        except defer.TimeoutError:
            log.warn("tor did not exit within {timeout}s; killing it", timeout=t.stop)
        with contextlib.suppress(ProcessExitedAlready):
            process.transport.signalProcess("KILL")
        with contextlib.suppress(defer.TimeoutError):
            await process.quit().addTimeout(t.stop, self.clock)
