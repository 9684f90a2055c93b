"""The tor process we launch: its output in our log, and its end."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, providedBy

__all__ = ["Spawner", "TorOutput"]

# One namespace for all of the onion service: operators see it in every log line
# (docs/operations.md) and may filter on it.
log = Logger(namespace="anonticket.onion")


class Spawner:
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


class TorOutput:
    """Tor's stdout/stderr as txtorcon passes them on (str or bytes): warnings reach our log.
    Progress comes through tor's bootstrap events instead."""

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
