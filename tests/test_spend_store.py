"""Spends in the store: exactly once across nodes, the ledger, and forgetting old keys; on
SQLite and on PostgreSQL."""

from __future__ import annotations

import random

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock

from anonticket.domain import PaymentId
from anonticket.store import Store
from anonticket.store.housekeeping import PURGE_INTERVAL, PurgeService
from anonticket.store.records import (
    KeyInUse,
    KeyReused,
    LedgerKind,
    Overloaded,
    Redeemed,
    SpendAnswer,
    SpendOutcome,
    SpendRequest,
)

from . import test_store
from .conftest import transfer
from .test_store import another

PID = PaymentId.parse("0123456789abcdef")
store = test_store.store  # the fixture: every test here runs on SQLite and on PostgreSQL


async def funded(store: Store, amount: int):
    await store.record_transfers([transfer(PID.raw, 1, amount=amount)], now=1)
    result = await store.redeem(PID, 2)
    assert isinstance(result, Redeemed)
    return result.token


@pytest_twisted.ensureDeferred
async def test_two_nodes_racing_with_the_same_keys_apply_each_key_once(store):
    """Every key is sent to both nodes at once: each is applied at most once, and both nodes
    give the same answer for it (one made, one replayed or told it is in use)."""
    token = await funded(store, 10_000)
    node2 = another(store)
    try:
        # Warm both nodes' token answers: the spends must evict them (here at once, there
        # within a sync).
        for node in (store, node2):
            warm = await node.token_status(token)
            assert warm is not None and warm.balance == 10_000
        rng = random.Random(7)
        amounts = [rng.randint(1, 700) for _ in range(40)]
        calls = []
        for i, amount in enumerate(amounts):
            request = SpendRequest(token, amount, f"order {i}", f"key-{i}".encode())
            calls += [store.spend(request, 10), node2.spend(request, 10)]
        results = await gatherResults(calls)
        made = {}
        for i, amount in enumerate(amounts):
            pair = results[2 * i : 2 * i + 2]
            answers = [r for r in pair if isinstance(r, SpendAnswer)]
            assert answers and all(isinstance(r, SpendAnswer | KeyInUse) for r in pair), pair
            fresh = [a for a in answers if not a.replayed]
            assert len(fresh) <= 1, pair
            if len(answers) == 2:
                # The replay is the first answer, field for field.
                assert answers[0].outcome == answers[1].outcome
                assert (answers[0].spend_id, answers[0].version, answers[0].balance) == (
                    answers[1].spend_id,
                    answers[1].version,
                    answers[1].balance,
                )
            if answers[0].outcome == SpendOutcome.SPENT:
                made[i] = amount
        record = await store.token_status(token)
        assert record is not None
        assert record.balance == 10_000 - sum(made.values()) >= 0
        assert record.spent == sum(made.values())
        # Asked again later (no race), every key replays, on either node.
        for i, amount in enumerate(amounts):
            request = SpendRequest(token, amount, f"order {i}", f"key-{i}".encode())
            again = await (store if i % 2 else node2).spend(request, 11)
            assert isinstance(again, SpendAnswer) and again.replayed
            assert (again.outcome == SpendOutcome.SPENT) == (i in made)
        entries = await store.ledger(token, 500, None)
        spends = [e for e in entries if e.kind == LedgerKind.SPEND]
        assert sorted(e.amount for e in spends) == sorted(made.values())
        assert len({e.spend_id for e in spends}) == len(spends)
        # The other node's token answer caught up with the balance after its next sync.
        await node2.sync_tokens()
        synced = await node2.token_status(token)
        assert synced is not None and synced.balance == record.balance
        answer = node2.token_answer(token)
        remembered = await answer if isinstance(answer, Deferred) else answer
        assert not isinstance(remembered, Overloaded)  # only refused with admit=True
        assert remembered is not None and remembered.balance == record.balance
    finally:
        node2.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_spends_from_two_nodes_never_overdraw(store):
    token = await funded(store, 1_000)
    node2 = another(store)
    try:
        calls = [
            (store if i % 2 else node2).spend(SpendRequest(token, 30, None, b"b%d" % i), 5)
            for i in range(64)
        ]
        results = await gatherResults(calls)
        spent = [r for r in results if r.outcome == SpendOutcome.SPENT]
        assert len(spent) == 1_000 // 30
        refused = [r for r in results if r.outcome != SpendOutcome.SPENT]
        assert {r.outcome for r in refused} == {SpendOutcome.INSUFFICIENT_BALANCE}
        assert sorted(r.version for r in spent) == list(range(2, 2 + len(spent)))
        assert (await store.token_status(token)).balance == 1_000 % 30
    finally:
        node2.close()


@pytest_twisted.ensureDeferred
async def test_a_key_reused_for_another_request_and_a_key_in_flight(store):
    token = await funded(store, 100)
    first = store.spend(SpendRequest(token, 5, None, b"k"), 3)
    assert isinstance(await store.spend(SpendRequest(token, 5, None, b"k"), 3), KeyInUse)
    assert (await first).outcome == SpendOutcome.SPENT
    for request in (
        SpendRequest(token, 6, None, b"k"),
        SpendRequest(token, 5, "", b"k"),
    ):
        assert isinstance(await store.spend(request, 4), KeyReused)
    assert (await store.token_status(token)).balance == 95


@pytest_twisted.ensureDeferred
async def test_old_keys_are_purged_and_can_then_be_used_again(store):
    token = await funded(store, 100)
    old = await store.spend(SpendRequest(token, 10, None, b"old"), 100)
    new = await store.spend(SpendRequest(token, 10, None, b"new"), 200)
    assert old.outcome == new.outcome == SpendOutcome.SPENT
    assert await store.purge_idempotency(150, 10) == 1
    assert await store.purge_idempotency(150, 10) == 0
    # "new" is still remembered; "old" is a new purchase now.
    assert (await store.spend(SpendRequest(token, 10, None, b"new"), 201)).replayed
    again = await store.spend(SpendRequest(token, 10, None, b"old"), 201)
    assert not again.replayed and again.balance == 70


@pytest_twisted.ensureDeferred
async def test_the_purge_service_runs_on_its_clock_and_survives_a_failure(store):
    token = await funded(store, 100)
    await store.spend(SpendRequest(token, 10, None, b"a"), 0)
    clock = Clock()
    failures = []
    service = PurgeService(store, clock, retention=60, failed=lambda: failures.append(1))
    clock.advance(1_000)
    service.startService()
    closed = store.purge_idempotency

    def broken(before, limit):
        raise RuntimeError("disk full")

    store.purge_idempotency = broken  # fault injection: the store fails once
    clock.advance(PURGE_INTERVAL)
    assert failures == [1] and service.running
    # The run goes on with the delivered events; a later store call is answered after it.
    await store.monitor_state()
    store.purge_idempotency = closed
    clock.advance(PURGE_INTERVAL)
    stopping = service.stopService()
    assert stopping is not None  # the loop runs: its Deferred waits for the purge in flight
    await stopping
    again = await store.spend(SpendRequest(token, 10, None, b"a"), 2_000)
    assert not again.replayed  # the key was forgotten: a new spend
