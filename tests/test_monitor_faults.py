"""The monitor against a misbehaving wallet (the in-process stand-in, for faults only).

Normal operation is proven against the real monero-wallet-rpc in tests/test_e2e_monero.py.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from anonticket.domain import PaymentId
from anonticket.metrics import Metrics
from anonticket.monitor import BACKOFF_CAP
from anonticket.store.records import NotFound, Redeemed
from anonticket.tap import build

from .conftest import daemon_config, post_json, reactor
from .fakewallet import raw, reply, stall_after_headers, status
from .monitorharness import PID, Chain, Harness, entry, transfers_asked


@pytest.fixture
def harness(store, fake):
    h = Harness(store, fake)
    yield h
    if h.service.running:
        h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_healthy_poll_credits_and_moves_the_cursor(harness, fake):
    fake.wallet.default = Chain(110, [entry()])
    harness.service.startService()
    await harness.tick(0)
    assert harness.polls("ok") == 1
    state = await harness.store.monitor_state()
    assert (state.cursor, state.wallet_height) == (100, 110)
    sent = [r for r in fake.wallet.received if r["method"] == "get_transfers"][1]
    assert sent["params"] == {
        "in": True,
        "pool": True,
        "filter_by_height": True,
        "min_height": 90,
        "max_height": 110,
    }
    # Catch-up below the window, the window with the pool, then one span of the sweep.
    assert transfers_asked(fake) == [(0, 90, False), (90, 110, True), (0, 90, False)]
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
    fake.wallet.script = []
    fake.wallet.default = Chain(110, [entry()])
    await harness.next_attempt(fake)
    assert harness.polls("ok") == 1 and harness.service._failures == 0
    # Its rise from 100 to 110 is believed when the next poll sees it too.
    assert (await harness.store.monitor_state()).cursor == 90
    assert await harness.next_attempt(fake) == 5  # back to the poll interval
    assert (await harness.store.monitor_state()).cursor == 100


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
    fake.wallet.default = Chain(
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
async def test_a_transfer_the_wallet_drops_from_the_window_is_reversed_once(harness, fake):
    chain = fake.wallet.default = Chain(110, [entry(height=100)])
    harness.service.startService()
    await harness.tick(0)
    chain.transfers, chain.height = [], 111
    await harness.tick(5)
    await harness.tick(5)
    assert harness.metrics.monitor_reversals.labels("unclaimed")._value.get() == 1
    # A reversed, unclaimed payment the wallet no longer shows at all is gone.
    assert isinstance(await harness.store.redeem(PaymentId.parse(PID), 1), NotFound)


@pytest_twisted.ensureDeferred
async def test_catch_up_reads_in_bounded_spans(harness, fake):
    fake.wallet.default = Chain(2500)
    harness.service.startService()
    await harness.tick(0)
    assert transfers_asked(fake) == [
        (0, 1000, False),
        (1000, 2000, False),
        (2000, 2480, False),
        (2480, 2500, True),
        (0, 1000, False),
    ]
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
