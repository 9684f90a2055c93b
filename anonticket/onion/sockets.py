"""Where the onion's site listens and the unix sockets around it.

The site listens where only tor needs to reach it: a unix socket in the 0700 data dir for a tor
we launch, ``127.0.0.1`` for an attached tor (a system tor runs as another user and cannot enter
the data dir).  A unix socket path must be short (``sun_path``) and plain enough to go into an
ADD_ONION line or a ControlPort value as it is; a data dir whose paths are not falls back to
loopback TCP for the site and to a private temporary directory for the control socket.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path
from typing import Final

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from anonticket.web.service import StartupError

__all__ = [
    "MAX_SOCKET_PATH",
    "PUBLIC_SOCKET",
    "clear_stale_socket",
    "site_endpoint",
    "target_of",
    "usable_socket_path",
]

PUBLIC_SOCKET: Final = "public.sock"
# sun_path holds 108 bytes on Linux (104 on the BSDs) including the NUL; keep a margin.
MAX_SOCKET_PATH: Final = 100
# Paths that go into an ADD_ONION line, a ControlPort value or an endpoint string as they are:
# no quoting or escaping needed.
_PLAIN_PATH: Final = re.compile(r"/[A-Za-z0-9._/+@~-]+")

# One namespace for all of the onion service: operators see it in every log line
# (docs/operations.md) and may filter on it.
log = Logger(namespace="anonticket.onion")


def usable_socket_path(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH and bool(_PLAIN_PATH.fullmatch(str(path)))


def site_endpoint(data_dir: Path, *, launched: bool) -> str:
    """The server endpoint of the onion's site when the operator names none."""
    if launched:
        path = data_dir / PUBLIC_SOCKET
        if usable_socket_path(path):
            clear_stale_socket(path)
            # lockfile=0: we removed a stale socket ourselves; mode applies after bind,
            # which is safe because the data dir is 0700.
            return f"unix:{path}:mode=600:lockfile=0"
        log.info(
            "onion service: {path} cannot be a unix socket path (too long or unusual "
            "characters); the site listens on 127.0.0.1 instead",
            path=str(path),
        )
    return "tcp:0:interface=127.0.0.1"


def target_of(port: IListeningPort) -> str:
    """ADD_ONION's target for the site's listener: a unix socket or a loopback port."""
    host = port.getHost()
    if isinstance(host, UNIXAddress) and host.name is not None:
        return f"unix:{os.fsdecode(host.name)}"
    if isinstance(host, IPv4Address) and host.host == "127.0.0.1":
        return f"127.0.0.1:{host.port}"
    if isinstance(host, IPv6Address) and host.host == "::1":
        return f"[::1]:{host.port}"
    raise ValueError("the onion's local listener must be a unix socket or on 127.0.0.1/::1")


def clear_stale_socket(path: Path) -> None:
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
