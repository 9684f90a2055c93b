"""Connection caps and the open-file limit: how many descriptors each site may hold.

Every connection costs one file descriptor.  If the sites may take them all, a flood of slow
connections starves everything else that needs one: the other site, the database, the wallet
client, tor's control connection.  So the process raises its soft ``RLIMIT_NOFILE`` to the hard
limit at start, and each site gets a cap that leaves room for the rest:

* :data:`FD_RESERVE` descriptors are never given to a site (database files and pool
  connections, the wallet's HTTP pool, tor's control socket and pipes, log files, epoll, and
  Twisted's EMFILE-recovery descriptor);
* the internal site has its own small cap, :data:`INTERNAL_MAX_CONNECTIONS`, which the public
  site's budget leaves free, so the public site can never take the internal site's descriptors;
* a site may briefly hold :data:`EVICT_SLACK` more connections than its cap: those it has just
  aborted to make room (the reactor closes them on its next turn).
"""

from __future__ import annotations

import resource
from typing import Final

from twisted.logger import Logger

# ~40 are open in a quiet daemon (interpreter, epoll, sqlite's db/-wal/-shm per pool
# connection, tor's pipes); 128 leaves room for a PostgreSQL pool and the wallet's connections.
FD_RESERVE: Final = 128
# Tor connects to the public site over loopback for every stream: the whole onion's load.  At
# the bench's 64 busy connections a daemon is saturated; 1,024 leaves room for many slow Tor
# clients, and each connection costs at most ~25 KiB (16 KiB of headers, a 4 KiB body).
PUBLIC_MAX_CONNECTIONS: Final = 1024
# The service spending tokens (a connection pool per node of it), Prometheus, health checks
# and an operator's curl.
INTERNAL_MAX_CONNECTIONS: Final = 64
EVICT_SLACK: Final = 16
# Below this a site cannot do its job at all; the start-up log says the limit is too low.
MIN_CONNECTIONS: Final = 4
# Where RLIMIT_NOFILE's hard limit is "unlimited", setrlimit refuses it (Linux caps at
# fs.nr_open, 1,048,576 by default): ask for that instead.
_UNLIMITED_TARGET: Final = 1 << 20

log = Logger()


def fd_limit() -> int:
    """The soft open-file limit in force."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard limit; log and return what it is now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn(
                "open-file limit stays at {soft} (could not raise it to {target}: {error})",
                soft=soft,
                target=target,
                error=str(e),
            )
            return soft
        log.info("open-file limit raised from {soft} to {limit}", soft=soft, limit=target)
        return target
    log.info("open-file limit: {limit}", limit=fd_limit())
    return fd_limit()


def site_cap(name: str, wanted: int, limit: int) -> int:
    """The most connections site *name* may hold under open-file limit *limit*.

    The internal site's own cap is kept out of every other site's budget, so no other site can
    starve it of descriptors.
    """
    others = 0 if name == "internal" else INTERNAL_MAX_CONNECTIONS + EVICT_SLACK
    room = limit - FD_RESERVE - others - EVICT_SLACK
    return max(MIN_CONNECTIONS, min(wanted, room))


def default_cap(name: str) -> int:
    return INTERNAL_MAX_CONNECTIONS if name == "internal" else PUBLIC_MAX_CONNECTIONS
