"""One Service per listening site: listen on start, drain and close on stop."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from anonticket.web.http import PrivacySite

DRAIN_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0

log = Logger()


class StartupError(Exception):
    """A service cannot start; the message is one line for the operator."""


class SiteService(Service):
    """Listens on a Twisted endpoint string.

    Unlike StreamServerEndpointService, a listen failure is raised from startService (twistd
    calls it before the reactor runs), so a port in use stops start-up with one clear line
    instead of a daemon that runs but serves nothing.
    """

    def __init__(self, reactor: Any, option: str, description: str, site: PrivacySite) -> None:
        self._reactor = reactor
        self._option = option
        self._description = description
        self.site = site
        self.name = f"{site.name}-site"
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        try:
            endpoint = serverFromString(self._reactor, self._description)
        except (ValueError, TypeError, KeyError) as e:
            raise StartupError(
                f"--{self._option}: bad endpoint {self._description!r}: {e}"
            ) from None
        d = endpoint.listen(self.site)
        outcome: list[object] = []
        d.addBoth(outcome.append)
        if not outcome:
            d.cancel()
            raise StartupError(f"--{self._option}: {self._description!r} did not listen at once")
        result = outcome[0]
        if isinstance(result, Failure):
            raise StartupError(
                f"--{self._option}: cannot listen on {self._description!r}: "
                f"{result.getErrorMessage()}"
            )
        assert IListeningPort.providedBy(result)
        self.port = result
        host = result.getHost()
        log.info("{site} site listening on {address}", site=self.site.name, address=_describe(host))
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return
        # No new connections; let requests in flight finish (bounded), then close the rest.
        yield port.stopListening()
        clock: IReactorTime = self._reactor
        try:
            yield self.site.drained().addTimeout(DRAIN_TIMEOUT, clock)
        except defer.TimeoutError:
            log.warn(
                "{site} site: {count} requests still in flight after {timeout}s; closing",
                site=self.site.name,
                count=self.site.in_flight,
                timeout=DRAIN_TIMEOUT,
            )
        # Close idle keep-alive connections and wait until they are gone: at reactor shutdown
        # the reactor drops every connection at once, unflushed answers included.
        for channel in list(self.site.channels):
            channel.loseConnection()
        try:
            yield self.site.closed().addTimeout(CLOSE_TIMEOUT, clock)
        except defer.TimeoutError:
            for channel in list(self.site.channels):
                channel.forceAbortClient()
        log.info("{site} site stopped", site=self.site.name)


def _describe(host: Any) -> str:
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    name = getattr(host, "name", host)  # a UNIX address: the socket path, as bytes
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
