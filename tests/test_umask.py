"""Everything the daemon creates is owner-only, whatever umask it inherits (issue #11 item 8).

The real ``twistd -n anonticket`` process under umask 000: missing parents of --data-dir, the
data directory, the database and its WAL, secret.key, and unix sockets of both sites.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from .daemonproc import Daemon


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_under_umask_000_every_file_directory_and_socket_is_owner_only(tmp_path):
    top = tmp_path / "a"
    data = top / "b" / "c"
    public, internal = tmp_path / "public.sock", tmp_path / "internal.sock"
    daemon = Daemon(
        data,
        "--no-monitor",
        public=f"unix:{public}",
        internal=f"unix:{internal}",
        umask=0o000,
    )
    daemon.log = tmp_path / "daemon.log"  # beside, not in, the directories under test
    daemon.start(wait=False)
    try:
        deadline = time.monotonic() + 30
        while not (internal.exists() and public.exists() and (data / "secret.key").exists()):
            assert daemon.process is not None and daemon.process.poll() is None, daemon.log_text()
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.05)
        for directory in (top, top / "b", data):
            assert mode(directory) == 0o700, directory
        created = [p for p in data.iterdir() if p.name.startswith(("anonticket", "secret"))]
        assert {p.name for p in created} >= {"anonticket.sqlite3", "secret.key"}
        for path in created:
            assert mode(path) & 0o077 == 0, (path, oct(mode(path)))
        for sock in (public, internal):
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            assert mode(sock) == 0o600, (sock, oct(mode(sock)))
    finally:
        daemon.stop()
