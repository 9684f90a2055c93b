"""The real thing: plugin discovery and the ``twistd -n anonticket`` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.plugin import getPlugins

from anonticket import __version__
from anonticket.domain import PaymentId
from anonticket.store import Store, migrate
from anonticket.store.dialect import SQLiteDialect

from .conftest import post_json, reactor, transfer

TWISTD = str(Path(sys.executable).parent / "twistd")
PID = "0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plugin_is_discovered_and_makes_a_multiservice(tmp_path):
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "anonticket" in makers
    maker = makers["anonticket"]
    options = maker.options()
    options.parseOptions(
        [
            "--data-dir",
            str(tmp_path),
            "--public",
            "tcp:0:interface=127.0.0.1",
            "--internal",
            "tcp:0:interface=127.0.0.1",
            "--no-monitor",
        ]
    )
    service = maker.makeService(options)
    assert isinstance(service, MultiService)
    assert [s.name for s in service] == ["store", "purge", "public-site", "internal-site"]


def run_twistd(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "anonticket", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=tmp_path,
    )


def test_bad_option_stops_start_up_with_one_line(tmp_path):
    result = run_twistd(
        tmp_path,
        "--no-monitor",
        "--public",
        "tcp:1:interface=127.0.0.1",
        "--min-confirmations",
        "lots",
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["anonticket: --min-confirmations: expected a whole number, got 'lots'"]


def test_non_loopback_internal_is_refused_at_start(tmp_path):
    result = run_twistd(
        tmp_path,
        "--no-monitor",
        "--public",
        "tcp:1:interface=127.0.0.1",
        "--internal",
        "tcp:9180:interface=0.0.0.0",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "anonticket: --internal: interface '0.0.0.0' is not a loopback address"
    ]


def test_port_in_use_stops_start_up_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_twistd(
            tmp_path,
            "--no-monitor",
            "--public",
            f"tcp:{port}:interface=127.0.0.1",
            "--internal",
            f"tcp:{free_port()}:interface=127.0.0.1",
        )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    # Once twistd has started logging, stderr goes to the log: the line is there, exactly once.
    expected = f"anonticket: --public: cannot listen on 'tcp:{port}:interface=127.0.0.1'"
    assert [line for line in output.splitlines() if expected in line] != []
    assert output.count("anonticket: --public") == 1


def test_a_database_newer_than_this_version_stops_start_up_with_one_line(tmp_path):
    """A rollback to an older anonticket without restoring the pre-upgrade backup: the older
    code must not run on tables whose meaning it does not know."""
    args = ["--no-monitor", "--public", f"tcp:{free_port()}:interface=127.0.0.1"]
    args += ["--internal", f"tcp:{free_port()}:interface=127.0.0.1"]
    database = tmp_path / "anonticket.sqlite3"
    dialect = SQLiteDialect(str(database))
    latest = migrate(dialect)
    conn = sqlite3.connect(database)
    conn.execute("UPDATE schema_version SET version = ?", (latest + 1,))
    conn.commit()
    conn.close()
    result = run_twistd(tmp_path, *args)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    expected = (
        f"anonticket: the database is at schema version {latest + 1}, newer than this "
        f"anonticket {__version__} knows ({latest})"
    )
    assert [line for line in output.splitlines() if expected in line] != [], output
    assert output.count("newer than this anonticket") == 1
    conn = sqlite3.connect(database)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(latest + 1,)]
    conn.close()


class Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[object] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


async def wait_for_port(port: int, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.1)):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            await deferLater(reactor, 0.1)
    raise AssertionError(f"nothing listening on {port}")


@pytest_twisted.ensureDeferred
async def test_twistd_serves_and_shuts_down_cleanly_on_sigterm(tmp_path, http):
    # Seed a payment through the store, as the monitor would.
    seed = Store(reactor, f"sqlite:///{tmp_path / 'anonticket.sqlite3'}", tmp_path)
    seed.open()
    await seed.record_transfers([transfer(PID, 3, amount=31337)], now=1)
    seed.close()

    public, internal = free_port(), free_port()
    proto = Collect()
    process = reactor.spawnProcess(
        proto,
        TWISTD,
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "anonticket",
            "--data-dir",
            str(tmp_path),
            "--public",
            f"tcp:{public}:interface=127.0.0.1",
            "--internal",
            f"tcp:{internal}:interface=127.0.0.1",
            "--no-monitor",
        ],
        env=dict(os.environ),
        path=str(tmp_path),
    )
    try:
        await wait_for_port(public)
        await wait_for_port(internal)
        response = await http.get(f"http://127.0.0.1:{internal}/healthz", timeout=10)
        assert response.code == 200

        # Hold SQLite's write lock so the redeem is still in flight when SIGTERM arrives.
        lock = sqlite3.connect(tmp_path / "anonticket.sqlite3", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        redeem = Deferred.fromCoroutine(
            post_json(http, f"http://127.0.0.1:{public}/api/v1/redeem", {"pid": PID})
        )
        await deferLater(reactor, 0.5)
        process.signalProcess("TERM")
        await deferLater(reactor, 0.5)
        lock.execute("COMMIT")
        lock.close()
        code, body, _ = await redeem
        assert code == 200 and body["status"] == "success" and body["balance"] == 31337

        ended = await proto.ended
    finally:
        if process.pid is not None:
            process.signalProcess("KILL")
    # twistd ends a clean SIGTERM shutdown by re-raising the signal on itself.
    assert isinstance(ended, (error.ProcessDone, error.ProcessTerminated))
    assert getattr(ended, "exitCode", None) in (0, None)
    assert getattr(ended, "signal", None) in (None, signal.SIGTERM)
    log = proto.output.decode()
    assert "Traceback" not in log and "Unhandled" not in log
    order = [log.index(s) for s in ("internal site stopped", "public site stopped", "store closed")]
    assert order == sorted(order), log
    assert PID not in log and body["service_token"] not in log
    for port in (public, internal):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{port} still listening"
    assert PaymentId.parse(PID)


def test_tac_file_builds_the_same_service(tmp_path):
    env = {
        **os.environ,
        "ANONTICKET_DATA_DIR": str(tmp_path),
        "ANONTICKET_PUBLIC": "tcp:0:interface=127.0.0.1",
        "ANONTICKET_INTERNAL": "tcp:0:interface=127.0.0.1",
        "ANONTICKET_NO_MONITOR": "1",
    }
    tac = Path(__file__).parent.parent / "tap" / "anonticket.tac"
    script = (
        "from twisted.application.service import IService, loadApplication\n"
        f"app = loadApplication({str(tac)!r}, 'python')\n"
        "root = IService(app)\n"
        "import json; print(json.dumps([s.name for s in list(root)[0]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        "store",
        "purge",
        "public-site",
        "internal-site",
    ]
