"""The tor we launch: its command line, the process, its output in our log, and its end.

Tor is spawned with Twisted's process API; txtorcon only speaks the control protocol to it
(:mod:`.session`).  The options go on tor's command line, after ``-f /dev/null`` so that no
system torrc adds to them: a persistent DataDirectory, a unix control socket and tor's cookie
in it, no SOCKS port, and ``__OwningControllerProcess`` so that tor exits if we die before we
have taken ownership of it on the control connection.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["TorLaunch", "TorOutput", "TorProcess", "find_tor", "spawn_tor"]

_MAX_LINE: Final = 4096

# One namespace for all of the onion service: operators see it in every log line
# (docs/operations.md) and may filter on it.
log = Logger(namespace="anonticket.onion")


def find_tor() -> str | None:
    """The ``tor`` binary: on PATH, or where Debian installs it (/usr/sbin is not on a
    non-root user's PATH)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    return shutil.which("tor", path=search)


@dataclass(frozen=True)
class TorLaunch:
    """What a launched tor is told; the paths are absolute (tor refuses relative ones)."""

    binary: str
    data_directory: Path
    control_socket: Path  # a plain path, short enough for sun_path (see sockets.py)
    cookie_file: Path
    # --tor-config: bridges, a private test network, DisableNetwork...; a list repeats it.
    options: Mapping[str, str | list[str]] = field(default_factory=dict)

    def arguments(self, owner_pid: int) -> list[str]:
        """tor's argv: the operator's options, then ours, which replace any of the same name."""
        ours = [
            "DataDirectory",
            str(self.data_directory),
            "ControlPort",
            f"unix:{self.control_socket}",
            "CookieAuthentication",
            "1",
            # Where we look for it, whatever --tor-config says.
            "CookieAuthFile",
            str(self.cookie_file),
            "SocksPort",
            "0",  # a service, not a client: no SOCKS listener
            "__OwningControllerProcess",
            str(owner_pid),
        ]
        # tor's option names are case-insensitive, and port options given twice add a port
        # (ControlSocket: another control port).
        reserved = {name.lower() for name in [*ours[::2], "ControlSocket"]}
        # No torrc: tor reads /dev/null as a missing one, which the flag makes fine.
        argv = [self.binary, "-f", "/dev/null", "--ignore-missing-torrc"]
        for option, value in self.options.items():
            if option.lower() in reserved:
                continue
            for one in [value] if isinstance(value, str) else value:
                argv += [option, one]
        return argv + ours


class TorOutput:
    """Tor's stdout and stderr, line by line: warnings and errors reach our log (tor never
    prints our key).  Progress comes through tor's bootstrap events instead."""

    def __init__(self) -> None:
        self._pending = b""

    def write(self, data: bytes) -> None:
        *lines, rest = (self._pending + data).split(b"\n")
        self._pending = rest[-_MAX_LINE:]
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if "[warn]" in line or "[err]" in line:
                log.warn("tor: {message}", message=line.split("] ", 1)[-1].strip())


class TorProcess(ProcessProtocol):
    """One tor process: its output to :class:`TorOutput`, its end logged and observable."""

    def __init__(self) -> None:
        self.output = TorOutput()
        self.exit: str | None = None  # "code N" or "signal N" once it has ended
        self._waiting: list[defer.Deferred[None]] = []

    def outReceived(self, data: bytes) -> None:
        self.output.write(data)

    def errReceived(self, data: bytes) -> None:
        self.output.write(data)

    def processEnded(self, reason: Failure) -> None:
        # Any end is an info line, not an error: it is also how a clean stop ends.  Once
        # connected, a tor that dies shows up as a lost control connection as well.
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.exit = f"code {code}" if code is not None else f"signal {signal}"
        log.info("tor exited ({how})", how=self.exit)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def when_ended(self) -> defer.Deferred[None]:
        """A new Deferred that fires once tor has exited; cancelling it leaves tor alone."""
        if self.exit is not None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def signal(self, name: str) -> None:
        if self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess(name)

    async def stop(self, clock: IReactorTime, timeout: float) -> None:
        """SIGTERM, and SIGKILL if tor has not exited within *timeout*; returns once it has
        (or after another *timeout*)."""
        if self.exit is None:
            self.signal("TERM")
        try:
            await self.when_ended().addTimeout(timeout, clock)
            return
        except defer.TimeoutError:
            log.warn("tor did not exit within {timeout}s; killing it", timeout=timeout)
        self.signal("KILL")
        with contextlib.suppress(defer.TimeoutError):
            await self.when_ended().addTimeout(timeout, clock)


def spawn_tor(reactor: Any, launch: TorLaunch) -> TorProcess:
    """Start tor as *launch* says; tor tells of its end through the returned protocol."""
    process = TorProcess()
    transport = reactor.spawnProcess(
        process,
        launch.binary,
        args=launch.arguments(os.getpid()),
        # Nothing of ours in tor's environment; HOME only for tor's "~" expansion.
        env={"HOME": str(launch.data_directory)},
        path=str(launch.data_directory),
    )
    transport.closeStdin()
    return process
