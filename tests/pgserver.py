"""A throwaway PostgreSQL server for tests: initdb in a temp dir, listening only on a unix socket.

Uses Debian's postgresql binaries (``/usr/lib/postgresql/<v>/bin``); installs nothing.  As root
(CI), the server runs as the ``postgres`` user, because initdb and postgres refuse root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from .children import dies_with_parent


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def available() -> bool:
    return _bindir() is not None


class PostgresServer:
    def __init__(self) -> None:
        bindir = _bindir()
        assert bindir is not None, "PostgreSQL server binaries are not installed"
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir  # short path: unix socket paths are limited to ~100 bytes
        self.port = 5432
        self.process: subprocess.Popen[bytes] | None = None
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._count = 0

    def start(self) -> PostgresServer:
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "anonticket",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            preexec_fn=dies_with_parent(self._user),
            cwd=self.dir,
        )
        self.process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=",
                "-p",
                str(self.port),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "server.log", "wb"),
            preexec_fn=dies_with_parent(self._user),
            cwd=self.dir,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                assert self.process.poll() is None, (self.dir / "server.log").read_text()
                time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not start:\n" + (self.dir / "server.log").read_text())

    def conninfo(self, dbname: str) -> str:
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user=anonticket"

    def url(self, dbname: str) -> str:
        """A postgresql:// URL for anonticket's --database."""
        return f"postgresql://anonticket@/{dbname}?host={self.socket_dir}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its --database URL."""
        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)
