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

from .conftest import reactor, tcp_port, transfer
from .daemonproc import Daemon
from .webhookreceiver import Receiver, verify_hmac

PIDS = 120


def _send(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any] | None:
    """POST JSON; the status, the answer and its headers, or None when no answer came."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers
    except OSError:
        return None  # the daemon died under us: no answer


def _post(url: str, pid: str) -> tuple[int, dict[str, Any]] | None:
    answer = _send(url, {"pid": pid})
    return None if answer is None else answer[:2]


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
    return _rows(database_url, sql)[0]


def _rows(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one query, read with the database's own driver (not the daemon's store)."""
    if database_url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(database_url[len("sqlite:///") :])
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()
    with psycopg.connect(database_url) as pg:
        return [tuple(r) for r in pg.execute(sql).fetchall()]


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


def _spend(url: str, amount: int, key: str) -> tuple[int, dict[str, Any], bool] | None:
    answer = _send(url, {"amount": amount}, {"Idempotency-Key": key})
    if answer is None:
        return None
    code, body, headers = answer
    return code, body, headers.get("Idempotent-Replayed") == "true"


def _ledger_books(database_url: str) -> list[tuple[Any, ...]]:
    """Per token: balance, spent, and what the ledger says they are."""
    sql = (
        "SELECT t.balance, t.spent, "
        "(SELECT coalesce(sum(CASE WHEN kind IN (0, 3) THEN amount ELSE -amount END), 0) "
        "   FROM ledger l WHERE l.token_id = t.id), "
        "(SELECT coalesce(sum(amount), 0) FROM ledger l WHERE l.token_id = t.id AND kind = 1) "
        "FROM tokens t ORDER BY t.id"
    )
    return _rows(database_url, sql)


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_spend_storm_loses_no_acknowledged_spend_and_replays_it(
    database_url, tmp_path
):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    rng = random.Random(12)
    pids = [PaymentId(rng.randbytes(8)) for _ in range(16)]
    amounts = await _seed(database_url, data, pids)
    daemon = Daemon(data, "--database", database_url, "--no-monitor").start()
    tokens = {}
    for p in pids:
        answer = _post(daemon.public_url + "/api/v1/redeem", p.hex)
        assert answer is not None and answer[0] == 200
        tokens[p.hex] = answer[1]["service_token"]
    # Each token: 10 purchases of a sixth of its balance (6 can be made), each sent twice.
    jobs = [(pid, amounts[pid] // 6, f"{pid}-order-{n}") for pid in tokens for n in range(10)] * 2
    rng.shuffle(jobs)
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    lock = threading.Lock()

    def storm(job: tuple[str, int, str]) -> None:
        pid, amount, key = job
        answer = _spend(f"{daemon.internal_url}/api/v1/token/{tokens[pid]}/spend", amount, key)
        if answer is None:
            return
        code, body, _ = answer
        assert code in (200, 409), answer
        if code == 409 and body["code"] == "idempotency_key_in_use":
            return
        with lock:
            if key in first:
                assert first[key] == (code, body), (key, first[key], answer)
            else:
                first[key] = (code, body)

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(storm, job) for job in jobs]
            deadline = time.monotonic() + 30
            while len(first) < len(jobs) // 8 and time.monotonic() < deadline:
                time.sleep(0.002)
            daemon.kill()
            for f in futures:
                f.result()
        assert 0 < len(first) < len(jobs) // 2, len(first)  # really mid-storm
        for balance, spent, ledger_sum, ledger_spent in _ledger_books(database_url):
            assert balance == ledger_sum >= 0 and spent == ledger_spent

        daemon.start()
        after = {}
        for pid, amount, key in sorted(set(jobs)):
            url = f"{daemon.internal_url}/api/v1/token/{tokens[pid]}/spend"
            spent = _spend(url, amount, key)
            assert spent is not None
            after[key] = spent
            if key in first:
                # Acknowledged before the crash: the same answer, replayed.
                assert (spent[0], spent[1]) == first[key] and spent[2], key
        for pid in tokens:
            made = [a[1]["amount"] for k, a in after.items() if k.startswith(pid) and a[0] == 200]
            assert len(made) == 6
            url = f"{daemon.internal_url}/api/v1/token/{tokens[pid]}"
            with urllib.request.urlopen(url, timeout=10) as r:
                view = json.loads(r.read())
            assert view["balance"] == amounts[pid] - sum(made) >= 0
            assert view["spent"] == sum(made)
    finally:
        daemon.stop()
    for balance, spent, ledger_sum, ledger_spent in _ledger_books(database_url):
        assert balance == ledger_sum >= 0 and spent == ledger_spent
    assert "Traceback" not in daemon.log_text()


@pytest_twisted.ensureDeferred
async def test_sigkill_between_the_change_and_the_delivery_the_event_arrives_after_restart(
    database_url, tmp_path
):
    """The receiver is down when the changes are made, the daemon is killed before it could
    deliver them; after a restart (receiver up) every event arrives with the webhook-id it was
    written with, and verifies."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    rng = random.Random(13)
    pids = [PaymentId(rng.randbytes(8)) for _ in range(8)]
    await _seed(database_url, data, pids)
    receiver = Receiver()
    url = receiver.listen()
    port = tcp_port(receiver.port)
    await receiver.stop()  # down: connections refused
    daemon = Daemon(
        data,
        "--database",
        database_url,
        "--no-monitor",
        "--webhook-url",
        url,
        "--webhook-retry-schedule",
        ",".join(["1"] * 20),
    ).start()
    try:
        for p in pids:
            answer = _post(daemon.public_url + "/api/v1/redeem", p.hex)
            assert answer is not None and answer[0] == 200
        daemon.kill()
        written = {row[0] for row in _rows(database_url, "SELECT event_id FROM outbox")}
        waiting = _rows(database_url, "SELECT count(*) FROM outbox WHERE state = 0")[0][0]
        assert len(written) == len(pids) == waiting  # none delivered before the kill
        receiver.listen(port)
        daemon.start()
        await receiver.wait_for(len(pids), timeout=60)
    finally:
        daemon.stop()
        await receiver.stop()
    assert {d.event_id for d in receiver.accepted} == written
    for delivery in receiver.accepted:
        assert verify_hmac(data, delivery)["type"] == "token.issued"
    assert "Traceback" not in daemon.log_text()
