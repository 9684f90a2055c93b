"""The monitor against a misbehaving wallet (the in-process stand-in, for faults only).

Normal operation is proven against the real monero-wallet-rpc in tests/test_e2e_monero.py.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from anonticket.domain import PaymentId
from anonticket.metrics import Metrics
from anonticket.monitor import BACKOFF_CAP, Monitor, MonitorService
from anonticket.store.records import NotFound, Pending, Redeemed
from anonticket.tap import build

from .conftest import daemon_config, post_json, reactor
from .fakewallet import raw, reply, stall_after_headers, status

PID = "0123456789abcdef"
TXID = "ab" * 32


def entry(**over: Any) -> dict[str, Any]:
    base = {
        "type": "in",
        "txid": TXID,
        "payment_id": PID,
        "amount": 2 * 10**12,
        "height": 100,
        "unlock_time": 0,
        "double_spend_seen": False,
        "subaddr_index": {"major": 0, "minor": 0},
    }
    base.update(over)
    return base


def answers(height: int, transfers: list[dict[str, Any]]) -> list[Any]:
    """One healthy poll: refresh, get_height, get_transfers."""
    return [reply({"blocks_fetched": 0}), reply({"height": height}), reply({"in": transfers})]


class Harness:
    def __init__(self, store: Any, fake: Any, **kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics()
        self.wallet = fake.client(timeout=kw.pop("timeout", 2.0))
        self.monitor = Monitor(
            store,
            self.wallet,
            self.metrics,
            self.clock,
            min_confirmations=10,
            min_amount=10**10,
            start_height=0,
            poll_interval=5,
        )
        self.service = MonitorService(self.monitor, self.clock, random.Random(1))
        self.store = store

    async def tick(self, seconds: float = 5) -> None:
        """Advance the clock past one poll interval and wait for the poll it started."""
        self.clock.advance(seconds)
        if self.service._current is not None:
            await self.service._current

    async def next_attempt(self, fake: Any) -> float:
        """Tick at the poll interval until the monitor asks the wallet again; the time waited."""
        asked, waited = len(fake.wallet.received), 0.0
        while len(fake.wallet.received) == asked:
            assert waited <= BACKOFF_CAP + 5, "the monitor stopped polling"
            await self.tick(5)
            waited += 5
        return waited

    def polls(self, outcome: str) -> float:
        return self.metrics.monitor_polls.labels(outcome)._value.get()


@pytest.fixture
def harness(store, fake):
    h = Harness(store, fake)
    yield h
    if h.service.running:
        h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_healthy_poll_credits_and_moves_the_cursor(harness, fake):
    fake.wallet.script = answers(110, [entry()])
    harness.service.startService()
    await harness.tick(0)
    assert harness.polls("ok") == 1
    state = await harness.store.monitor_state()
    assert (state.cursor, state.wallet_height) == (100, 110)
    sent = fake.wallet.received[2]
    assert sent["method"] == "get_transfers"
    assert sent["params"] == {
        "in": True,
        "pool": True,
        "filter_by_height": True,
        "min_height": 0,
        "max_height": 110,
    }
    assert isinstance(await harness.store.redeem(PaymentId.parse(PID), 1), Redeemed)


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (status(500), "http_error"),
        (raw(b"\x00garbage{"), "bad_response"),
        (reply(error={"code": -13, "message": "No wallet file"}), "rpc_error"),
        (reply({"height": "tall"}), "bad_response"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_failing_wallet_backs_off_and_keeps_the_cursor(harness, fake, fault, outcome):
    await harness.store.record_transfers([], now=1, cursor=90, wallet_height=100)
    fake.wallet.script = [reply({}), fault]
    fake.wallet.default = fault
    harness.service.startService()
    await harness.tick(0)
    assert harness.polls(outcome) == 1
    assert (await harness.store.monitor_state()).cursor == 90
    # Backing off: at least one interval, growing with each failure, never beyond the cap.
    waits = [await harness.next_attempt(fake) for _ in range(10)]
    assert harness.polls(outcome) == 11
    assert all(w >= 5 for w in waits) and max(waits) <= BACKOFF_CAP + 5
    assert sum(waits[5:]) > sum(waits[:5])  # exponential, jittered: later waits are longer
    assert (await harness.store.monitor_state()).cursor == 90
    assert harness.service.running and harness.service._loop.running
    # The wallet comes back: one poll succeeds and the backoff is forgotten.
    fake.wallet.script = answers(110, [entry()])
    fake.wallet.default = reply({})
    await harness.next_attempt(fake)
    assert harness.polls("ok") == 1 and harness.service._failures == 0
    assert (await harness.store.monitor_state()).cursor == 100
    assert await harness.next_attempt(fake) == 5  # back to the poll interval


@pytest_twisted.ensureDeferred
async def test_a_hung_wallet_times_out(store, fake):
    h = Harness(store, fake, timeout=0.3)
    fake.wallet.script = [stall_after_headers]
    h.service.startService()
    try:
        await h.tick(0)
        assert h.polls("timeout") == 1
    finally:
        await h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_garbage_entries_never_fail_a_poll(harness, fake):
    good = entry(txid="cd" * 32, payment_id="00000000000000a1")
    fake.wallet.script = answers(
        110,
        [
            entry(type="block", payment_id="0000000000000000"),
            entry(txid="zz"),
            entry(amount="lots"),
            {"type": "in"},
            entry(payment_id="0" * 16, txid="ef" * 32),
            entry(unlock_time=99, txid="01" * 32),
            good,
            entry(double_spend_seen=True, txid="02" * 32),
        ],
    )
    harness.service.startService()
    await harness.tick(0)
    assert harness.polls("ok") == 1
    assert harness.metrics.monitor_transfers.labels("skipped")._value.get() == 7
    assert harness.metrics.monitor_transfers.labels("credited")._value.get() == 1
    assert isinstance(await harness.store.redeem(PaymentId.parse("00000000000000a1"), 1), Redeemed)
    assert isinstance(await harness.store.redeem(PaymentId.parse(PID), 1), NotFound)


@pytest_twisted.ensureDeferred
async def test_a_transfer_the_wallet_drops_from_the_window_is_flagged_once(harness, fake):
    fake.wallet.script = answers(110, [entry(height=100)]) + answers(111, [])
    harness.service.startService()
    await harness.tick(0)
    await harness.tick(5)
    assert harness.metrics.monitor_flagged._value.get() == 1
    # A flagged, unclaimed payment is not redeemable (it may not exist any more).
    assert isinstance(await harness.store.redeem(PaymentId.parse(PID), 1), Pending)


@pytest_twisted.ensureDeferred
async def test_catch_up_reads_in_bounded_spans(harness, fake):
    fake.wallet.default = reply({"in": []})
    fake.wallet.script = [reply({}), reply({"height": 2500})]
    harness.service.startService()
    await harness.tick(0)
    spans = [
        (r["params"]["min_height"], r["params"]["max_height"])
        for r in fake.wallet.received
        if r["method"] == "get_transfers"
    ]
    assert spans == [(0, 1000), (1000, 2000), (2000, 2500)]
    assert (await harness.store.monitor_state()).cursor == 2490


@pytest_twisted.ensureDeferred
async def test_the_public_site_is_unaffected_by_a_hung_wallet(tmp_path, fake, http):
    fake.wallet.default = stall_after_headers
    config = daemon_config(tmp_path, **{"wallet-rpc": fake.url, "no-monitor": False})
    root = build(config, reactor, Metrics())
    root.startService()
    try:
        public = root.getServiceNamed("public-site").port.getHost().port
        started = reactor.seconds()
        for _ in range(20):
            code, body, _ = await post_json(
                http, f"http://127.0.0.1:{public}/api/v1/redeem", {"pid": PID}
            )
            assert code == 404 and body["code"] == "payment_not_found"
        assert reactor.seconds() - started < 5
        internal = root.getServiceNamed("internal-site").port.getHost().port
        response = await http.get(f"http://127.0.0.1:{internal}/healthz", timeout=10)
        health = json.loads(await response.content())
        assert response.code == 503 and health["monitor"] == "starting"
    finally:
        await root.stopService()
