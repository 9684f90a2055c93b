"""Events as Standard Webhooks (SPEC §13): every change of a token reaches a receiver that
verifies it with the standard's own library, in order per token, through receiver failures;
on SQLite and on PostgreSQL, and from two nodes of one PostgreSQL."""

from __future__ import annotations

import hashlib
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from anonticket.config import from_options
from anonticket.domain import PaymentId
from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.records import PaymentStatus, Redeemed
from anonticket.webhook.delivery import WebhookService
from anonticket.webhook.signing import load_signer

from .conftest import get_json, post_json, reactor, running_daemon, tcp_port, transfer
from .webhookreceiver import Receiver, verify_ed25519, verify_hmac

PID = "0123456789abcdef"
TXID = 1
AMOUNT = 5_000
FAST = "1,1,1"  # retry schedule for the tests: three retries a second apart, then failed


@asynccontextmanager
async def webhook_daemon(tmp_path, url: str, database: str | None = None, **extra: str):
    options: dict[str, object] = {
        "data-dir": str(tmp_path),
        "public": "tcp:0:interface=127.0.0.1",
        "internal": "tcp:0:interface=127.0.0.1",
        "no-monitor": True,
        "webhook-url": url,
        "webhook-retry-schedule": FAST,
        **extra,
    }
    if database is not None:
        options["database"] = database
    async with running_daemon(from_options(options, environ={}), tmp_path) as daemon:
        yield daemon


async def redeem(daemon, http, pid: str = PID) -> dict[str, Any]:
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": pid})
    assert code == 200 and isinstance(body, dict), body
    return body


async def until(condition, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met in time")


def token_id(token_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(token_hex)).hexdigest()


@pytest_twisted.ensureDeferred
async def test_an_event_id_that_cannot_exist_is_404_on_either_database(
    database_url, tmp_path, http
):
    """A NUL byte reached PostgreSQL as a 503 and a store error (an alert) for a client's typo."""
    receiver = Receiver()
    url = receiver.listen()
    try:
        async with webhook_daemon(tmp_path, url, database_url) as daemon:
            failed_url = daemon.internal_url + "/api/v1/webhooks/failed"
            for bad in ("a%00b", "msg_" + "0" * 31 + "%00", "msg_" + "A" * 32, "x" * 500):
                code, body, _ = await post_json(http, f"{failed_url}/{bad}/retry", {})
                assert (code, body["code"]) == (404, "event_not_found"), bad
            code, body, _ = await post_json(http, f"{failed_url}/msg_{'0' * 32}/retry", {})
            assert (code, body["code"]) == (404, "event_not_found")  # well formed, unknown
            errors = daemon.metrics.store_errors.labels("retry_failed_events")._value.get()
            assert errors == 0
    finally:
        await receiver.stop()


@pytest_twisted.ensureDeferred
async def test_every_change_of_a_token_is_an_event_verified_by_the_standard_library(
    database_url, tmp_path, http
):
    receiver = Receiver()
    url = receiver.listen()
    try:
        async with webhook_daemon(tmp_path, url, database_url) as daemon:
            store = daemon.store
            await store.record_transfers([transfer(PID, TXID, amount=AMOUNT)], now=1)
            token = (await redeem(daemon, http))["service_token"]
            await store.record_transfers([transfer(PID, 2, amount=700)], now=2)
            await redeem(daemon, http)  # a top-up
            spend_url = f"{daemon.internal_url}/api/v1/token/{token}/spend"
            code, spent, _ = await post_json(
                http, spend_url, {"amount": 300, "memo": "1 month"}, {"Idempotency-Key": "o-1"}
            )
            assert code == 200
            # A replay is not a new event.
            await post_json(
                http, spend_url, {"amount": 300, "memo": "1 month"}, {"Idempotency-Key": "o-1"}
            )
            # The chain takes the top-up back, then gives it again.
            pooled = transfer(PID, 2, amount=700, height=0, status=PaymentStatus.PENDING)
            await store.record_transfers([pooled], now=3)
            await store.record_transfers([transfer(PID, 2, amount=700, height=150)], now=4)
            revoke = f"{daemon.internal_url}/api/v1/token/{token}/revoke"
            assert (await post_json(http, revoke, {"reason": "abuse"}))[0] == 200
            await receiver.wait_for(6)
            await deferLater(reactor, 0.3, lambda: None)  # nothing more comes
    finally:
        await receiver.stop()
    events = [verify_hmac(tmp_path, d) for d in receiver.deliveries]
    assert [e["type"] for e in events] == [
        "token.issued",
        "token.credited",
        "token.spent",
        "token.reversed",
        "token.restored",
        "token.revoked",
    ]
    assert {e["data"]["token_id"] for e in events} == {token_id(token)}
    data = [e["data"] for e in events]
    assert [(d.get("amount"), d["balance"], d["version"]) for d in data] == [
        (AMOUNT, AMOUNT, 1),
        (700, AMOUNT + 700, 2),
        (300, AMOUNT + 400, 3),
        (700, AMOUNT - 300, 4),
        (700, AMOUNT + 400, 5),
        (None, AMOUNT + 400, 6),
    ]
    assert data[2]["spend_id"] == spent["spend_id"] and data[2]["memo"] == "1 month"
    assert data[5]["reason"] == "abuse"
    assert all(e["timestamp"].endswith("Z") for e in events)
    # Distinct ids, each delivered once (the receiver answered 2xx at once).
    assert len({d.event_id for d in receiver.deliveries}) == 6
    # Nothing that could be used or linked on chain: no token, PID or txid.
    raw = b" ".join(d.body for d in receiver.deliveries).decode()
    for secret in (token, PID, TXID.to_bytes(32, "big").hex(), (2).to_bytes(32, "big").hex()):
        assert secret not in raw


@pytest_twisted.ensureDeferred
async def test_ed25519_signatures_verify_with_the_public_key_written_and_logged(
    tmp_path, http, caplog_events
):
    receiver = Receiver()
    url = receiver.listen()
    try:
        async with webhook_daemon(tmp_path, url, **{"webhook-signing": "ed25519"}) as daemon:
            await daemon.store.record_transfers([transfer(PID, TXID, amount=AMOUNT)], now=1)
            await redeem(daemon, http)
            await receiver.wait_for(1)
    finally:
        await receiver.stop()
    event = verify_ed25519(tmp_path, receiver.deliveries[0])
    assert event["type"] == "token.issued"
    public = (tmp_path / "webhook.pub").read_text().strip()
    assert any(public in line for line in caplog_events)
    assert not (tmp_path / "webhook.secret").exists()
    assert (tmp_path / "webhook.key").stat().st_mode & 0o077 == 0


@pytest_twisted.ensureDeferred
async def test_a_failing_receiver_gets_the_event_again_with_the_same_id(tmp_path, http):
    receiver = Receiver(fail_first=2)
    url = receiver.listen()
    try:
        async with webhook_daemon(tmp_path, url) as daemon:
            await daemon.store.record_transfers([transfer(PID, TXID, amount=AMOUNT)], now=1)
            await redeem(daemon, http)
            await receiver.wait_for(1)
            metrics = daemon.metrics
            delivered = metrics.webhook_deliveries.labels("delivered")
            await until(lambda: delivered._value.get() == 1)  # the answer was read
    finally:
        await receiver.stop()
    assert [d.answered for d in receiver.deliveries] == [500, 500, 204]
    assert len({d.event_id for d in receiver.deliveries}) == 1
    # Each attempt signs its own timestamp; every one verifies.
    for delivery in receiver.deliveries:
        verify_hmac(tmp_path, delivery)
    counts = {
        outcome: metrics.webhook_deliveries.labels(outcome)._value.get()
        for outcome in ("delivered", "retry", "failed")
    }
    assert counts == {"delivered": 1, "retry": 2, "failed": 0}


@pytest_twisted.ensureDeferred
async def test_events_of_one_token_wait_for_the_earlier_ones_and_failed_ones_can_be_retried(
    tmp_path, http
):
    """The receiver is down for longer than the whole schedule: the first event fails, the
    token's later events wait behind it; retried from the internal site, all arrive, in order."""
    receiver = Receiver()
    url = receiver.listen()
    port = tcp_port(receiver.port)
    await receiver.stop()  # down: connections are refused
    async with webhook_daemon(tmp_path, url) as daemon:
        await daemon.store.record_transfers([transfer(PID, TXID, amount=AMOUNT)], now=1)
        token = (await redeem(daemon, http))["service_token"]
        spend_url = f"{daemon.internal_url}/api/v1/token/{token}/spend"
        await post_json(http, spend_url, {"amount": 1}, {"Idempotency-Key": "a"})
        failed_url = f"{daemon.internal_url}/api/v1/webhooks/failed"
        for _ in range(100):
            _, listed, _ = await get_json(http, failed_url)
            if listed["events"]:
                break
            await deferLater(reactor, 0.1, lambda: None)
        # Only the token's first event failed (4 attempts); the spend waited behind it.
        assert [(e["type"], e["attempts"], e["last_error"]) for e in listed["events"]] == [
            ("token.issued", 4, "refused")
        ]
        backlog = await daemon.store.event_backlog()
        assert (backlog.waiting, backlog.failed) == (1, 1) and backlog.oldest is not None
        receiver.listen(port)
        code, body, _ = await post_json(http, f"{failed_url}/retry", {})
        assert (code, body) == (200, {"retried": 1})
        await receiver.wait_for(2)
        code, body, _ = await post_json(http, f"{failed_url}/msg_unknown/retry", {})
        assert (code, body["code"]) == (404, "event_not_found")
        _, listed, _ = await get_json(http, failed_url)
        assert listed == {"events": [], "next": None}
    await receiver.stop()
    assert [d.event["type"] for d in receiver.accepted] == ["token.issued", "token.spent"]


@pytest_twisted.ensureDeferred
async def test_without_a_webhook_url_nothing_is_written_and_the_routes_say_so(daemon, http):
    await daemon.store.record_transfers([transfer(PID, TXID, amount=AMOUNT)], now=1)
    await redeem(daemon, http)
    backlog = await daemon.store.event_backlog()
    assert (backlog.waiting, backlog.failed) == (0, 0)
    code, body, _ = await get_json(http, f"{daemon.internal_url}/api/v1/webhooks/failed")
    assert (code, body["code"]) == (404, "webhooks_disabled")
    assert not (daemon.data_dir / "webhook.secret").exists()


@pytest_twisted.ensureDeferred
async def test_two_nodes_deliver_every_event_of_both(pg_server, tmp_path):
    """Two stores and two deliverers on one PostgreSQL database, each node making changes:
    every event arrives, each token's in order, and (leases) each once while nobody dies."""
    database_url = pg_server.new_database()
    receiver = Receiver()
    url = receiver.listen()
    nodes = []
    services = []
    try:
        for _ in range(2):
            store = Store(reactor, database_url, tmp_path, events=True)
            store.open()
            nodes.append(store)
            service = WebhookService(
                store, reactor, url, lambda: load_signer(tmp_path, "hmac")[0], Metrics(), (1, 1)
            )
            service.startService()
            services.append(service)
        pids = [PaymentId(bytes([i + 1]) * 8) for i in range(20)]
        await nodes[0].record_transfers(
            [transfer(p.raw, i + 1, amount=AMOUNT) for i, p in enumerate(pids)], now=1
        )
        await nodes[1].sync_known()  # the other node learns of the payments
        tokens = await gatherResults(
            [Deferred.fromCoroutine(_redeem(nodes[i % 2], p)) for i, p in enumerate(pids)]
        )
        from anonticket.store.records import SpendRequest

        spends = [
            nodes[(i + 1) % 2].spend(SpendRequest(t, 10, None, b"k%d" % i), 5)
            for i, t in enumerate(tokens)
        ]
        await gatherResults(spends)
        await receiver.wait_for(40)
        await deferLater(reactor, 0.5, lambda: None)
    finally:
        for service in services:
            await service.stopService()
        for store in nodes:
            store.close()
        await receiver.stop()
    events = [verify_hmac(tmp_path, d) for d in receiver.accepted]
    ids = [d.event_id for d in receiver.accepted]
    assert len(set(ids)) == 40 == len(ids)
    by_token: dict[str, list[str]] = {}
    for event in events:
        by_token.setdefault(event["data"]["token_id"], []).append(event["type"])
    assert sorted(by_token) == sorted(hashlib.sha256(t.raw).hexdigest() for t in tokens)
    assert all(types == ["token.issued", "token.spent"] for types in by_token.values())


async def _redeem(store: Store, pid: PaymentId):
    result = await store.redeem(pid, 2)
    assert isinstance(result, Redeemed)
    return result.token


def test_webhook_url_and_schedule_are_checked():
    from anonticket.config import ConfigError

    for bad in ("ftp://x/", "http://", "http://u:p@host/", "http://host/#x", "http://h:99999/"):
        with pytest.raises(ConfigError, match="--webhook-url"):
            from_options({"webhook-url": bad}, environ={})
    for bad in ("0", "5,,6", "1,x", "9" * 7, ",".join(["1"] * 51), "\u0661"):
        with pytest.raises(ConfigError, match="--webhook-retry-schedule"):
            from_options({"webhook-retry-schedule": bad}, environ={})
    with pytest.raises(ConfigError, match="--webhook-signing"):
        from_options({"webhook-signing": "rsa"}, environ={})
    config = from_options({"webhook-retry-schedule": " 5, 60"}, environ={})
    assert config.webhook_retry_schedule == (5, 60)


def test_a_damaged_webhook_key_stops_start_up_with_one_line(tmp_path):
    from anonticket.keys import DataDirError

    (tmp_path / "webhook.secret").write_bytes(b"x" * 50)
    (tmp_path / "webhook.secret").chmod(0o600)
    with pytest.raises(DataDirError, match="whsec_"):
        load_signer(tmp_path, "hmac")


@pytest_twisted.ensureDeferred
async def test_delivered_events_are_purged_and_waiting_ones_kept(database_url, tmp_path):
    from anonticket.store.outbox import EventState

    store = Store(reactor, database_url, tmp_path, events=True)
    store.open()
    try:
        for i, pid in enumerate((PID, "fedcba9876543210")):
            await store.record_transfers([transfer(pid, i + 1, amount=AMOUNT)], now=1)
            await store.redeem(PaymentId.parse(pid), 2)
        due = await store.take_due_events(10, 60, 8, "node")
        assert len(due) == 2
        await store.settle_event(due[0].row, EventState.DELIVERED, 20)
        assert await store.purge_delivered_events(20, 10) == 0  # delivered at 20, not before
        assert await store.purge_delivered_events(21, 10) == 1
        backlog = await store.event_backlog()
        assert (backlog.waiting, backlog.failed) == (1, 0)  # the other one is kept
    finally:
        store.close()
