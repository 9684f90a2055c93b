"""Un-revoking a token (issue #14 item 7): in the store and on the internal site, on SQLite and
on PostgreSQL; the revocation undone is kept with its reason, the version grows, every node's
memory of the token follows, and with events on a token.unrevoked event is written."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from anonticket.domain import PaymentId, derive_service_token
from anonticket.store import Store
from anonticket.store.outbox import EventState, token_id_of
from anonticket.store.records import Redeemed, TokenRecord

from . import test_store
from .conftest import get_json, post_json, reactor, transfer
from .test_store import another

PID = PaymentId.parse("0123456789abcdef")
AMOUNT = 918273645546
store = test_store.store  # the fixture: every store test here runs on SQLite and PostgreSQL


async def issued(store: Store):
    await store.record_transfers([transfer(PID.raw, 1, amount=AMOUNT)], now=1)
    result = await store.redeem(PID, 2)
    assert isinstance(result, Redeemed)
    return result.token


@pytest_twisted.ensureDeferred
async def test_unrevoke_undoes_the_revocation_and_keeps_it_with_its_reason(store):
    token = await issued(store)
    revoked, _ = await store.revoke(token, "chargeback", 7, now=3)
    assert revoked.status == "revoked" and revoked.version == 2
    record, newly = await store.unrevoke(token, "refund settled", None, now=4)
    assert newly and record.status == "active" and record.revoked_at is None
    assert record.revoke_reason is None and record.version == 3
    assert record.abuse_score == 7  # kept unless given: the operator's view of the token
    assert record.balance == AMOUNT
    assert (await store.token_status(token)) == record
    [past] = await store.past_revocations(token, 10, None)
    assert (past.revoked_at, past.revoke_reason) == (3, "chargeback")
    assert (past.unrevoked_at, past.unrevoke_reason) == (4, "refund settled")
    # Again: nothing to undo, nothing changes (a retried request is harmless).
    again, newly = await store.unrevoke(token, "twice", 0, now=5)
    assert not newly and again == record
    assert len(await store.past_revocations(token, 10, None)) == 1


@pytest_twisted.ensureDeferred
async def test_a_token_revoked_again_has_its_whole_history_newest_first(store):
    token = await issued(store)
    for n in range(3):
        await store.revoke(token, f"abuse {n}", None, now=10 * n + 1)
        await store.unrevoke(token, f"appeal {n}", n, now=10 * n + 2)
    revoked, newly = await store.revoke(token, "abuse 3", None, now=31)
    assert newly and revoked.revoke_reason == "abuse 3" and revoked.version == 1 + 7
    assert revoked.abuse_score == 2
    history = await store.past_revocations(token, 10, None)
    assert [(p.revoke_reason, p.unrevoke_reason) for p in history] == [
        ("abuse 2", "appeal 2"),
        ("abuse 1", "appeal 1"),
        ("abuse 0", "appeal 0"),
    ]
    page = await store.past_revocations(token, 2, None)
    rest = await store.past_revocations(token, 2, page[-1].id)
    assert page + rest == history


@pytest_twisted.ensureDeferred
async def test_unknown_and_never_revoked_tokens(store):
    missing = derive_service_token(PaymentId.parse("fedcba9876543210"), "00" * 32)
    assert await store.unrevoke(missing, "why", None, now=3) is None
    assert await store.past_revocations(missing, 10, None) is None
    token = await issued(store)
    record, newly = await store.unrevoke(token, "why", 5, now=3)
    assert not newly and record.version == 1 and record.abuse_score == 0
    assert await store.past_revocations(token, 10, None) == []


@pytest_twisted.ensureDeferred
async def test_concurrent_unrevokes_on_two_nodes_undo_once(store):
    token = await issued(store)
    await store.revoke(token, "abuse", None, now=3)
    node2 = another(store)
    try:
        calls = [
            node.unrevoke(token, f"r{i}", None, now=4) for i in range(10) for node in (store, node2)
        ]
        results = await gatherResults(calls)
        assert sum(newly for _, newly in results) == 1
        assert len(await store.past_revocations(token, 50, None)) == 1
        record = await node2.token_status(token)
        assert record is not None and record.version == 3
    finally:
        node2.close()


@pytest_twisted.ensureDeferred
async def test_another_node_stops_answering_revoked_from_memory(store):
    token = await issued(store)
    node2 = another(store)
    try:
        await store.revoke(token, "abuse", None, now=3)
        await node2.sync_tokens()
        first = node2.token_answer(token)
        remembered = await first if isinstance(first, Deferred) else first
        assert isinstance(remembered, TokenRecord) and remembered.status == "revoked"
        again = node2.token_answer(token)
        assert isinstance(again, TokenRecord) and again.status == "revoked"  # from memory now
        await store.unrevoke(token, "appeal", None, now=4)
        await node2.sync_tokens()
        answer = node2.token_answer(token)
        assert isinstance(answer, Deferred)  # evicted: asked again
        asked = await answer
        assert asked is not None and asked.status == "active"
        # The redeem answer of its PID follows too.
        redeemed = await node2.redeem(PID, 5)
        assert isinstance(redeemed, Redeemed) and redeemed.token_status == "active"
    finally:
        node2.close()


@pytest_twisted.ensureDeferred
async def test_with_events_on_the_unrevoke_is_an_event_in_its_transaction(database_url, tmp_path):
    events = Store(reactor, database_url, tmp_path, events=True)
    events.open()
    try:
        token = await issued(events)
        await events.revoke(token, "abuse", None, now=3)
        await events.unrevoke(token, "appeal", None, now=4)
        await events.unrevoke(token, "again", None, now=5)  # nothing undone: no event
        bodies = []
        while due := await events.take_due_events(10, 60, 8, "node"):
            for event in due:
                bodies.append(json.loads(event.body))
                await events.settle_event(event.row, EventState.DELIVERED, 6)
    finally:
        events.close()
    assert [b["type"] for b in bodies] == ["token.issued", "token.revoked", "token.unrevoked"]
    data = bodies[-1]["data"]
    assert data == {
        "token_id": token_id_of(token.raw).hex(),
        "reason": "appeal",
        "balance": AMOUNT,
        "version": 3,
    }


# ------------------------------------------------------------------ the internal site


async def issue_token(daemon, http) -> str:
    await daemon.store.record_transfers([transfer(PID.raw, 1, amount=AMOUNT)], now=1)
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID.hex})
    assert code == 200
    token = body["service_token"]
    assert isinstance(token, str)
    return token


@pytest_twisted.ensureDeferred
async def test_unrevoke_route_on_both_backends(any_daemon, http):
    daemon = any_daemon
    token = await issue_token(daemon, http)
    base = f"{daemon.internal_url}/api/v1/token/{token}"
    code, revoked, _ = await post_json(http, base + "/revoke", {"reason": "abuse"})
    assert code == 200 and revoked["status"] == "revoked"
    code, body, headers = await post_json(http, base + "/unrevoke", {"reason": "appeal granted"})
    assert code == 200, body
    assert body["status"] == "active" and body["revoked_at"] is None
    assert body["revoke_reason"] is None and body["version"] == revoked["version"] + 1
    assert headers.getRawHeaders("etag") == [f'"{body["version"]}"']
    code, public, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert code == 200 and public["status"] == "active"
    code, past, _ = await get_json(http, base + "/revocations")
    assert code == 200 and past["next"] is None
    [entry] = past["revocations"]
    assert entry["revoke_reason"] == "abuse" and entry["unrevoke_reason"] == "appeal granted"
    assert entry["revoked_at"] == revoked["revoked_at"] and entry["unrevoked_at"].endswith("Z")
    # Once more: nothing to undo, the same answer.
    code, again, _ = await post_json(http, base + "/unrevoke", {"reason": "again"})
    assert code == 200 and again == body
    text = (await (await http.get(daemon.internal_url + "/metrics", timeout=10)).content()).decode()
    assert 'anonticket_token_unrevocations_total{outcome="unrevoked"} 1.0' in text
    assert 'anonticket_token_unrevocations_total{outcome="not_revoked"} 1.0' in text
    assert token not in text


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"reason": None},
        {"reason": ""},
        {"reason": "   "},
        {"reason": 5},
        {"reason": "x" * 1001},
        {"reason": "bell\x07"},
        {"reason": "ok", "abuse_score": "high"},
        [],
    ],
)
@pytest_twisted.ensureDeferred
async def test_unrevoke_needs_a_reason(daemon, http, body):
    token = await issue_token(daemon, http)
    base = f"{daemon.internal_url}/api/v1/token/{token}"
    await post_json(http, base + "/revoke", {"reason": "abuse"})
    code, got, _ = await post_json(http, base + "/unrevoke", body)
    assert code == 400 and got["code"] == "invalid_request"
    _, status, _ = await get_json(http, base)
    assert status["status"] == "revoked"


@pytest_twisted.ensureDeferred
async def test_unrevoke_unknown_and_malformed_tokens(daemon, http):
    cases = (("cd" * 32, 404, "token_not_found"), ("abc", 400, "invalid_token"))
    for token, status, error in cases:
        base = f"{daemon.internal_url}/api/v1/token/{token}"
        code, body, _ = await post_json(http, base + "/unrevoke", {"reason": "x"})
        assert (code, body["code"]) == (status, error)
        code, body, _ = await get_json(http, base + "/revocations")
        assert (code, body["code"]) == (status, error)


@pytest_twisted.ensureDeferred
async def test_unrevoke_is_not_on_the_public_site(daemon, http):
    token = await issue_token(daemon, http)
    code, body, _ = await post_json(
        http, f"{daemon.public_url}/api/v1/token/{token}/unrevoke", {"reason": "x"}
    )
    assert code == 404 and body["code"] == "not_found"
