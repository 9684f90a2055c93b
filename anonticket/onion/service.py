"""The onion service: the site's listener, the loop that keeps the onion in tor, its state.

The service is *ephemeral* (ADD_ONION): it lives only as long as our control connection, so a
dead daemon never leaves an address that points at nothing, and a lost connection means
creating it again, on a new session, after a capped, jittered back-off.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from anonticket import torcontrol
from anonticket.keys import prepare_data_dir
from anonticket.metrics import Metrics
from anonticket.onion.add_onion import (
    DescriptorWatch,
    OnionDefenses,
    OnionError,
    add_onion_command,
    parse_service_id,
    tor_error_text,
)
from anonticket.onion.key import (
    add_onion_key_blob,
    load_or_create_onion_key,
    onion_address,
    write_hostname,
)
from anonticket.onion.process import find_tor
from anonticket.onion.session import OnionTimeouts, Session
from anonticket.onion.sockets import site_endpoint, target_of
from anonticket.torcontrol import CookiePolicy
from anonticket.torstatus import Bootstrap, watch_bootstrap
from anonticket.web.service import SiteService, StartupError
from anonticket.web.site import PrivacySite

__all__ = ["OnionService"]

DEFAULT_TIMEOUTS: Final = OnionTimeouts()
DEFAULT_DEFENSES: Final = OnionDefenses()

# One namespace for all of the onion service: operators see it in every log line
# (docs/operations.md) and may filter on it.
log = Logger(namespace="anonticket.onion")


class OnionService(Service):
    """Publishes the public site as a v3 onion service (see :mod:`anonticket.onion`).

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
        timeouts: OnionTimeouts = DEFAULT_TIMEOUTS,
        defenses: OnionDefenses = DEFAULT_DEFENSES,
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
        self._session: Session | None = None
        self._loop: defer.Deferred[None] | None = None
        self._announced = False
        self.state = "disabled"

    # -- state ----------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        self._metrics.onion_state.state(state)

    def _refresh_state(self, session: Session) -> None:
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

    def _tor_reported(self, session: Session, report: Bootstrap) -> None:
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
            self._tor_binary = find_tor()  # once: a missing tor is reported at each try
        local = self._local or site_endpoint(self._data_dir, launched=self._tor_control is None)
        site_service = SiteService(self._reactor, "public", local, self._site)
        site_service.startService()
        assert site_service.port is not None
        try:
            self._target = target_of(site_service.port)
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

    # -- the tor loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        """Get tor, create the service, wait until the connection drops; on any failure clean
        up and try again after a capped, jittered exponential back-off."""
        failures = 0
        while self.running:
            self._set_state("starting")
            step = "launch tor" if self._tor_control is None else "connect to tor"
            try:
                session = self._session = Session(self._clock, self._timeouts)
                if self._tor_control is None:
                    await session.launch(
                        self._reactor, self._data_dir, self._tor_binary, self._tor_options
                    )
                else:
                    assert self._cookie_policy is not None
                    await session.attach(
                        self._control_endpoint, self._tor_control, self._cookie_policy
                    )
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
                await session.until_disconnected()
                log.warn("onion service: lost the control connection to tor; re-creating")
            except defer.CancelledError:
                return
            except Exception as e:
                log.error(
                    "onion service: could not {step}: {error}", step=step, error=tor_error_text(e)
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

    async def _publish(self, session: Session) -> None:
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
            raise OnionError(f"ADD_ONION failed: {tor_error_text(e)}") from None
        session.service_id = parse_service_id(reply)
        if session.service_id != self._service_id:
            raise OnionError(f"tor created {session.service_id}.onion, not {self.address}")
        elapsed = clock.seconds() - started
        assert self.address is not None
        write_hostname(self._data_dir, self.address)
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

    async def _close_session(self, *, remove: bool) -> None:
        """Undo the current session (see :meth:`Session.close`); it is forgotten only at the
        end, so that an interrupted close can run again."""
        session = self._session
        if session is None:
            return
        await session.close(remove=remove)
        if self._session is session:
            self._session = None
            self._metrics.tor_bootstrap_percent.clear()  # unknown without a tor

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
