"""SIGKILL a real daemon in the middle of a redeem storm, restart it, check the books balance.

Run on SQLite and on PostgreSQL.  Payments are seeded through the store as the monitor records
them; the storm is many clients redeeming concurrently (each PID several times).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest_twisted

from anonticket.domain import PaymentId
from anonticket.store import Store

from .conftest import reactor, transfer
from .daemonproc import Daemon

PIDS = 120


def _post(url: str, pid: str) -> tuple[int, dict[str, Any]] | None:
    request = urllib.request.Request(
        url, data=json.dumps({"pid": pid}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None  # the daemon died under us: no answer


async def _seed(database_url: str, data_dir, pids: list[PaymentId]) -> dict[str, int]:
    store = Store(reactor, database_url, data_dir)
    store.open()
    amounts = {p.hex: 10**10 + i for i, p in enumerate(pids)}
    try:
        await store.record_transfers(
            [transfer(p.raw, i + 1, amount=amounts[p.hex]) for i, p in enumerate(pids)], now=1
        )
        return amounts
    finally:
        store.close()


def _books(database_url: str, data_dir) -> tuple[Any, ...]:
    sql = (
        "SELECT (SELECT coalesce(sum(balance), 0) FROM tokens), "
        "(SELECT coalesce(sum(amount), 0) FROM payments WHERE status = 2), "
        "(SELECT count(*) FROM payments p WHERE status = 2 AND NOT EXISTS "
        "   (SELECT 1 FROM tokens t WHERE t.pid_tag = p.pid_tag)), "
        "(SELECT count(*) FROM tokens t WHERE NOT EXISTS "
        "   (SELECT 1 FROM payments p WHERE p.pid_tag = t.pid_tag AND p.status = 2))"
    )
    if database_url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(database_url[len("sqlite:///") :])
        try:
            return tuple(conn.execute(sql).fetchone())
        finally:
            conn.close()
    with psycopg.connect(database_url) as conn:
        return tuple(conn.execute(sql).fetchone())


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_redeem_storm_loses_nothing_and_credits_nothing_twice(
    database_url, tmp_path
):
    # The daemon is another process: blocking calls below stall only this test's reactor.
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    rng = random.Random(11)
    pids = [PaymentId(rng.randbytes(8)) for _ in range(PIDS)]
    amounts = await _seed(database_url, data, pids)
    daemon = Daemon(data, "--database", database_url, "--no-monitor").start()
    url = daemon.public_url + "/api/v1/redeem"
    before: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    jobs = [p.hex for p in pids for _ in range(3)]
    rng.shuffle(jobs)

    def storm(pid: str) -> None:
        answer = _post(url, pid)
        if answer is not None and answer[0] == 200:
            with lock:
                before.setdefault(pid, answer[1])
        elif answer is not None:
            raise AssertionError(answer)

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(storm, pid) for pid in jobs]
            # Kill it once a part of the storm has been answered, with the rest in flight.
            deadline = time.monotonic() + 30
            while len(before) < PIDS // 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            daemon.kill()
            for f in futures:
                f.result()
        answered_before = len(before)
        assert 0 < answered_before < PIDS, answered_before  # really mid-storm
        books = _books(database_url, data)
        assert books[0] == books[1] and books[2:] == (0, 0), books

        daemon.start()
        after = {p.hex: _post(url, p.hex) for p in pids}
    finally:
        daemon.stop()
    for pid, answer in after.items():
        assert answer is not None and answer[0] == 200, (pid, answer)
        body = answer[1]
        assert body["balance"] == amounts[pid]
        if pid in before:
            # Whoever got an answer before the crash gets the same token after it.
            assert body["service_token"] == before[pid]["service_token"]
            assert body["status"] == "already_claimed"
    total, claimed, orphans, empty = _books(database_url, data)
    assert total == claimed == sum(amounts.values()) and (orphans, empty) == (0, 0)
    assert "Traceback" not in daemon.log_text()
