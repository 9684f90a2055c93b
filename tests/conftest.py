"""Shared fixtures: an opened store, an in-process daemon on real loopback sockets, HTTP helpers.

The reactor is injected into everything under test; it is imported here only to hand it over.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, eventAsJSON, formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import provider

from anonticket.config import from_options
from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.records import PaymentStatus, Transfer
from anonticket.tap import AnonticketService, build
from anonticket.web.service import SiteService

from .fakewallet import fake  # noqa: F401 - the stand-in wallet fixture, for fault tests
from .pgserver import PostgresServer
from .pgserver import available as pg_available

reactor: Any = _reactor


def transfer(
    pid: bytes | str,
    txid: bytes | int,
    amount: int = 10**12,
    height: int = 100,
    status: PaymentStatus = PaymentStatus.UNCLAIMED,
    minor: int = 0,
) -> Transfer:
    if isinstance(pid, str):
        pid = bytes.fromhex(pid)
    if isinstance(txid, int):
        txid = txid.to_bytes(32, "big")
    return Transfer(txid, 0, minor, pid, amount, height, status)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(reactor, f"sqlite:///{tmp_path / 'db.sqlite3'}", tmp_path)
    s.open()
    yield s
    s.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run; each test takes a fresh database."""
    if not pg_available():
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend: tests using it run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.new_database()


@dataclass
class Daemon:
    root: AnonticketService
    store: Store
    metrics: Metrics
    public_url: str
    internal_url: str
    data_dir: Path


def tcp_port(listening: IListeningPort | None) -> int:
    """The port number a listening TCP port is bound to."""
    assert listening is not None
    host = listening.getHost()
    assert isinstance(host, IPv4Address | IPv6Address), host
    return host.port


def _url(service: SiteService) -> str:
    return f"http://127.0.0.1:{tcp_port(service.port)}"


def daemon_config(tmp_path: Path, **extra: str) -> Any:
    options: dict[str, object] = {
        "data-dir": str(tmp_path),
        "public": "tcp:0:interface=127.0.0.1",
        "internal": "tcp:0:interface=127.0.0.1",
        "no-monitor": True,
        **extra,
    }
    return from_options(options, environ={})


@pytest_twisted.async_yield_fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(daemon_config(tmp_path), tmp_path) as d:
        yield d


@pytest_twisted.async_yield_fixture
async def any_daemon(database_url: str, tmp_path: Path) -> AsyncIterator[Daemon]:
    """The in-process daemon on each backend (SQLite and PostgreSQL)."""
    async with running_daemon(daemon_config(tmp_path, database=database_url), tmp_path) as d:
        yield d


@asynccontextmanager
async def running_daemon(config: Any, data_dir: Path) -> AsyncIterator[Daemon]:
    """The daemon built from ``config``, started; stopped when the block ends, however."""
    metrics = Metrics()
    root = build(config, reactor, metrics)
    root.startService()
    store_service = root.getServiceNamed("store")
    try:
        yield Daemon(
            root=root,
            store=store_service.store,
            metrics=metrics,
            public_url=_url(root.getServiceNamed("public-site")),
            internal_url=_url(root.getServiceNamed("internal-site")),
            data_dir=data_dir,
        )
    finally:
        await root.stopService()


@pytest.fixture
def caplog_events() -> Iterator[list[str]]:
    """Every log event of the server side during the test, as the JSON log observer would write
    it (all keys).  The test's own HTTP client (treq) logs its connections; those are left out."""
    captured: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("twisted.web.client"):
            return
        captured.append(formatEvent(event) + " " + eventAsJSON(event))

    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def http() -> AsyncIterator[HTTPClient]:
    """A treq client with its own connection pool, closed after the test."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


async def post_json(
    client: HTTPClient, url: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    # treq's annotation asks for this dict type (invariant), not any mapping of str to str.
    sent: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
    sent.update((headers or {}).items())  # the caller's headers win, Content-Type included
    response = await client.post(url, data=data, headers=sent, timeout=10)
    return response.code, await response.json(), response.headers


async def get_json(client: HTTPClient, url: str) -> tuple[int, Any, Any]:
    response = await client.get(url, timeout=10)
    return response.code, await response.json(), response.headers


__all__ = ["Daemon", "get_json", "post_json", "transfer", "treq"]


# Modules whose tests start real processes (monerod, wallet-rpc, tor, twistd, wrk): with the
# tests on PostgreSQL (a server process) they are marked slow, so that
# `scripts/test -m "not slow"` is a quick loop; the README's command runs everything.
_SLOW_MODULES = frozenset(
    {
        "test_bench_passes",
        "test_bench_smoke",
        "test_bench_webhooks",
        "test_crash",
        "test_demo",
        "test_e2e_monero",
        "test_monero_regtest",
        "test_onion_e2e",
        "test_onion_tor",
        "test_passes_interop",
        "test_reorg_e2e",
        "test_tor_privnet",
        "test_twistd",
        "test_umask",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = (
            item.module.__name__.rsplit(".", 1)[-1]
            if isinstance(item, pytest.Function) and item.module
            else ""
        )
        callspec = getattr(item, "callspec", None)
        on_postgresql = callspec is not None and callspec.params.get("database_url") == (
            "postgresql"
        )
        uses_server = "pg_server" in getattr(item, "fixturenames", ())
        if module in _SLOW_MODULES or on_postgresql or uses_server:
            item.add_marker(pytest.mark.slow)
