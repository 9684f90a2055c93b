"""Store operations of one reactor turn share one trip to the database thread."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from anonticket.domain import PaymentId
from anonticket.store import DatabaseError
from anonticket.store.records import NotFound, Redeemed
from anonticket.store.units import writes

from .conftest import transfer

PID = PaymentId.parse("0123456789abcdef")


@writes
def failing(cursor, dialect):
    # Like every write of the store: begin, write, then fail half way.
    dialect.start_write(cursor)
    cursor.execute("INSERT INTO monitor_state (name, value) VALUES ('half-done', 1)")
    raise RuntimeError("boom")


def count_state(cursor, dialect):
    return cursor.execute("SELECT count(*) FROM monitor_state").fetchone()[0]


@pytest_twisted.ensureDeferred
async def test_one_trip_for_a_turn_and_each_operation_in_its_own_transaction(store, monkeypatch):
    await store.record_transfers([transfer(PID.raw, 1, amount=5)], now=1)
    trips = []
    pool = store._pool
    original = pool.runWithConnection

    def counted(fn, *a):
        trips.append(len(a[1]))
        return original(fn, *a)

    monkeypatch.setattr(pool, "runWithConnection", counted)
    redeems = [store.redeem(PID, 2) for _ in range(10)]
    boom = store._run(failing)
    after = store._run(count_state)
    results = await gatherResults(redeems)
    assert trips == [12]  # ten redeems, the failure and the count: one trip
    assert sum(r.first_claim for r in results) == 1
    with pytest.raises(RuntimeError):
        await boom
    assert await after == 0  # the failed operation was rolled back, alone
    assert (await store.redeem(PID, 3)).balance == 5  # the claim was committed


@pytest_twisted.ensureDeferred
async def test_on_sqlite_a_batch_that_writes_commits_once(store):
    pids = [PaymentId((i + 1).to_bytes(8, "big")) for i in range(10)]
    await store.record_transfers([transfer(p.raw, i + 1) for i, p in enumerate(pids)], now=1)
    statements: list[str] = []
    await store._pool.runWithConnection(
        lambda conn: conn._connection.set_trace_callback(statements.append)
    )
    results = await gatherResults([store.redeem(p, 2) for p in pids])
    assert all(r.first_claim for r in results)
    assert [s for s in statements if s.split()[0] in ("BEGIN", "COMMIT")] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    # Committed: another connection sees every claim.
    other = sqlite3.connect(store._dialect.path)
    try:
        assert other.execute("SELECT count(*) FROM tokens").fetchone()[0] == 10
    finally:
        other.close()


@pytest_twisted.ensureDeferred
async def test_a_closed_store_fails_queued_operations_instead_of_hanging(store):
    queued = store._run(count_state)
    store.close()
    with pytest.raises(DatabaseError):
        await queued
    store.open()
    assert isinstance(await store.redeem(PaymentId.parse("00000000000000a1"), 1), NotFound)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_caller_does_not_disturb_the_others(store):
    await store.record_transfers([transfer(PID.raw, 1, amount=5)], now=1)
    first = store.redeem(PID, 2)
    second = store.redeem(PID, 2)
    first.cancel()  # the client went away; its claim may still happen
    result = await second
    assert isinstance(result, Redeemed) and result.balance == 5
    first.addErrback(lambda f: None)
