"""One Service per listening site: listen on start, drain and close on stop.

On start it also checks where the site really listens (the internal site must be on loopback
or a unix socket, whatever the endpoint string seemed to say, unless it is served over mutual
TLS: see :mod:`anonticket.web.mtls`), fits the site's connection cap to the open-file limit, and
keeps client addresses out of what Twisted logs when accepting.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from anonticket import limits
from anonticket.web.mtls import TLSServerEndpoint, TLSSetupError, parse_ssl
from anonticket.web.site import PrivacySite

DRAIN_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0

log = Logger()


class StartupError(Exception):
    """A service cannot start; the message is one line for the operator."""


class SiteService(Service):
    """Listens on a Twisted endpoint string.

    Unlike StreamServerEndpointService, a listen failure is raised from the start methods
    (twistd calls them before the reactor runs), so a port in use stops start-up with one clear
    line instead of a daemon that runs but serves nothing.
    """

    def __init__(
        self,
        reactor: Any,
        option: str,
        description: str,
        site: PrivacySite,
        *,
        require_loopback: bool | None = None,
    ) -> None:
        """:param require_loopback: refuse to run unless the bound address is loopback or a unix
        socket (default: for the internal site, which has no authentication of its own).  An
        ``ssl:`` endpoint with ``caCertsDir`` (mutual TLS: clients must prove a certificate)
        is exempt.
        """
        self._reactor = reactor
        self._option = option
        self._description = description
        self.site = site
        self.name = f"{site.name}-site"
        self.port: IListeningPort | None = None
        if require_loopback is None:
            require_loopback = option == "internal"
        self.require_loopback = require_loopback

    def privilegedStartService(self) -> None:
        """Bind now, before twistd sheds its privileges (a port below 1024 needs them), as
        Twisted's own StreamServerEndpointService does; an ``ssl:`` endpoint's files are read
        now too.  A unix socket waits for :meth:`startService`: made now, under ``--uid`` it
        would be root's (and mode 600 would shut out the daemon's own user), and it may lie in
        the data directory, which the store creates when it starts."""
        super().privilegedStartService()
        endpoint = self._endpoint()
        if not isinstance(endpoint, UNIXServerEndpoint):
            self._listen(endpoint)

    def startService(self) -> None:
        """Bind, unless :meth:`privilegedStartService` did (twistd calls both; a caller that
        starts this service alone, such as the onion's, calls only this one)."""
        if self.port is None:
            self._listen(self._endpoint())
        super().startService()

    def _listen(self, endpoint: IStreamServerEndpoint) -> None:
        """Listen at once or raise :class:`StartupError`; then check and log where."""
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
        host = result.getHost()
        mutual = (
            endpoint if isinstance(endpoint, TLSServerEndpoint) and endpoint.spec.mutual else None
        )
        if self.require_loopback and mutual is None and not _is_local(host):
            # config.py checks the endpoint string, but Twisted takes the *last* of repeated
            # arguments ("interface=127.0.0.1:interface=0.0.0.0"): the bound address decides.
            result.stopListening()
            raise StartupError(
                f"--{self._option}: {self._description!r} listens on {_address_text(host)}, "
                "not on a loopback address or a unix socket; refusing to expose the site"
            )
        self.port = result
        _keep_addresses_out_of_accept_log(result, self.site)
        self.site.listening_on(host)
        if mutual is not None:
            if self.site.guard is not None:
                # Every connection proved a client certificate: see BrowserGuard for why its
                # Host check then has nothing left to protect, and its Origin check still has.
                self.site.guard.clients_authenticated = True
            log.info(
                "{site} site: mutual TLS, client certificates required; CA certificates in "
                "{directory}: {count}",
                site=self.site.name,
                count=mutual.authorities,
                directory=str(mutual.spec.client_cas),
            )
        cap = limits.site_cap(self.site.name, self.site.max_connections, limits.fd_limit())
        if cap < self.site.max_connections:
            log.warn(
                "{site} site: at most {cap} connections (not {wanted}) under the open-file "
                "limit of {limit}",
                site=self.site.name,
                cap=cap,
                wanted=self.site.max_connections,
                limit=limits.fd_limit(),
            )
        self.site.max_connections = cap
        log.info(
            "{site} site listening on {address}, at most {cap} connections",
            site=self.site.name,
            address=_address_text(host),
            cap=cap,
        )

    def _endpoint(self) -> IStreamServerEndpoint:
        try:
            tls = parse_ssl(self._description)
            if tls is not None:
                return TLSServerEndpoint(self._reactor, tls)
            endpoint: IStreamServerEndpoint = serverFromString(self._reactor, self._description)
        except (ValueError, TypeError, KeyError) as e:
            raise StartupError(
                f"--{self._option}: bad endpoint {self._description!r}: {e}"
            ) from None
        except TLSSetupError as e:
            raise StartupError(f"--{self._option}: {e}") from None
        return endpoint

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is None:
            return
        # No new connections; let requests in flight finish (bounded), then close the rest.
        await defer.maybeDeferred(port.stopListening)
        clock: IReactorTime = self._reactor
        try:
            await self.site.drained().addTimeout(DRAIN_TIMEOUT, clock)
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
            await self.site.closed().addTimeout(CLOSE_TIMEOUT, clock)
        except defer.TimeoutError:
            for channel in list(self.site.channels):
                channel.forceAbortClient()
        log.info("{site} site stopped", site=self.site.name)


def _is_local(host: object) -> bool:
    """A unix socket, or a TCP address in 127.0.0.0/8 or ::1 (an IPv4-mapped one included)."""
    if isinstance(host, UNIXAddress):
        return True
    if isinstance(host, IPv4Address | IPv6Address):
        try:
            ip = ipaddress.ip_address(host.host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    return False


@implementer(ILogObserver)
class _AcceptLog:
    """What a listening port logs while accepting, without the clients' addresses.

    Twisted's port logs through its ``_logger`` (in ``doRead``); out of descriptors, it closes
    every waiting connection and logs "EMFILE recovery: Closed socket from <address>" for each
    (issue #11: ~95 client addresses).  Here each kind of event becomes one bounded line naming
    the site, and the closed connections are only counted.
    """

    def __init__(self, site: PrivacySite) -> None:
        self._site = site
        self.closed = 0

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = str(event.get("log_format", ""))
        if "Closed socket" in fmt:
            self.closed += 1
            return
        # acceptError is an errno name ("EMFILE"); nothing else of the event is kept.
        error = event.get("acceptError")
        self._site.log_budget.emit(
            log,
            LogLevel.warn,
            ("accept", self._site.name, fmt),
            "{site} site: trouble accepting connections ({what}); {closed} waiting "
            "connections closed unanswered so far",
            site=self._site.name,
            what=str(error) if isinstance(error, str) else _ACCEPT_EVENTS.get(fmt, "other"),
            closed=self.closed,
        )


_ACCEPT_EVENTS = {
    "EMFILE encountered; releasing reserved file descriptor.": "out of file descriptors",
    "Re-reserving EMFILE recovery file descriptor.": "recovered from EMFILE",
}


def _keep_addresses_out_of_accept_log(port: IListeningPort, site: PrivacySite) -> None:
    logger = getattr(port, "_logger", None)
    if isinstance(logger, Logger):
        # An instance attribute shadows the class's Logger descriptor for this port only.
        port._logger = Logger(  # type: ignore[attr-defined]
            namespace=logger.namespace, observer=_AcceptLog(site)
        )


def _address_text(host: Any) -> str:
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    name = getattr(host, "name", host)  # a UNIX address: the socket path, as bytes
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
