"""The monitor's money rules, driven by the stand-in wallet on both databases: reorgs onto
chains of any length, reversals and restorations, heights that lie, late reports.

The same rules against two real monerod nodes are in tests/test_reorg_e2e.py; the stand-in
makes each case exact and fast (heights, pool entries and answers are set by hand).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from anonticket.domain import PaymentId
from anonticket.monitor import CATCHUP_SPANS, MAX_SPAN
from anonticket.store import Store
from anonticket.store.records import NotFound, Pending, Redeemed

from .conftest import reactor
from .monitorharness import Chain, Harness, entry, transfers_asked

A = PaymentId.parse("00000000000000a1")
B = PaymentId.parse("00000000000000b2")
XMR = 10**12


@pytest.fixture
def store(database_url: str, tmp_path: Any) -> Iterator[Store]:
    s = Store(reactor, database_url, tmp_path)
    s.open()
    yield s
    s.close()


def pay(pid: PaymentId, txid: int, height: int, amount: int = 2 * XMR, **kw: Any) -> dict[str, Any]:
    return entry(txid=f"{txid:064x}", payment_id=pid.hex, height=height, amount=amount, **kw)


def pooled(e: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """The same transfer as the wallet reports it from the pool."""
    out = {**e, "type": "pool", **kw}
    out.pop("height", None)
    return out


async def started(store: Store, fake: Any, chain: Chain, **kw: Any) -> Harness:
    fake.wallet.default = chain
    h = Harness(store, fake, **kw)
    h.service.startService()
    await h.tick(0)
    return h


def count(h: Harness, name: str, label: str) -> float:
    value: float = getattr(h.metrics, name).labels(label)._value.get()
    return value


@pytest.mark.parametrize("longer_by", [1, 9, 40])
@pytest_twisted.ensureDeferred
async def test_a_double_spend_on_a_longer_chain_is_reversed_whatever_its_length(
    store, fake, longer_by
):
    """N = 2; payments at height 8 are confirmed at 10.  A competing chain that spends their
    inputs elsewhere wins, longer than the old tip by 1, 9 or 40 blocks."""
    claimed, unclaimed = pay(A, 1, 8), pay(B, 2, 8)
    chain = Chain(10, [claimed, unclaimed])
    h = await started(store, fake, chain, min_confirmations=2)
    token = (await store.redeem(A, 1)).token
    assert (await store.token_status(token)).balance == 2 * XMR
    chain.height, chain.transfers = 10 + longer_by, []
    for _ in range(3):
        await h.tick()
    assert h.polls("ok") == 4
    record = await store.token_status(token)
    assert (record.status, record.balance) == ("suspended", 0)
    assert await store.redeem(A, 2) == Redeemed(token, 0, False, token_status="suspended")
    assert isinstance(await store.redeem(B, 2), NotFound)
    assert count(h, "monitor_reversals", "claimed") == 1
    assert count(h, "monitor_reversals", "unclaimed") == 1
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_honest_reorg_ends_exactly_where_it_started(store, fake):
    paid = pay(A, 1, 8)
    chain = Chain(10, [paid])
    h = await started(store, fake, chain, min_confirmations=2)
    token = (await store.redeem(A, 1)).token
    # Reorganised out: back in the pool (not a double spend), then mined again and confirmed.
    chain.height, chain.transfers = 11, [pooled(paid)]
    await h.tick()
    assert (await store.token_status(token)).status == "suspended"
    chain.height, chain.transfers = 12, [{**paid, "height": 12}]
    await h.tick()
    await h.tick()
    assert (await store.token_status(token)).balance == 0  # mined, not confirmed yet
    chain.height = 14
    for _ in range(2):
        await h.tick()
    record = await store.token_status(token)
    assert (record.status, record.balance, record.reversed) == ("active", 2 * XMR, 0)
    assert count(h, "monitor_reversals", "claimed") == 1
    assert count(h, "monitor_restorations", "claimed") == 1
    # Nothing more happens on later polls: credited once.
    for _ in range(3):
        await h.tick()
    assert (await store.token_status(token)).balance == 2 * XMR
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_loser_put_back_in_the_pool_is_reversed(store, fake):
    """After losing a double spend monerod keeps the transaction in its pool with
    double_spend_seen false: credited money there is not money."""
    claimed, unclaimed = pay(A, 1, 8), pay(B, 2, 8)
    chain = Chain(10, [claimed, unclaimed])
    h = await started(store, fake, chain, min_confirmations=2)
    token = (await store.redeem(A, 1)).token
    chain.height = 19
    chain.transfers = [pooled(claimed, double_spend_seen=False), pooled(unclaimed)]
    for _ in range(2):
        await h.tick()
    assert (await store.token_status(token)).status == "suspended"
    assert await store.redeem(B, 2) == Pending(height=0, wallet_height=19)
    # The pool drops it for good: the unclaimed one is gone, the claimed one stays reversed.
    chain.transfers = []
    await h.tick()
    assert isinstance(await store.redeem(B, 3), NotFound)
    assert (await store.token_status(token)).status == "suspended"
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_one_height_spike_credits_nothing_early_and_strands_nothing(store, fake):
    early = pay(A, 1, 95)  # 5 confirmations at 100, N = 10
    chain = Chain(100, [early])
    h = await started(store, fake, chain)
    chain.heights = [20_000]  # one wrong answer
    await h.tick()
    assert isinstance(await store.redeem(A, 1), Pending)  # not credited by the lie
    state = await store.monitor_state()
    assert state.cursor == 90
    assert "not trusted" in (h.service.height_note() or "")
    assert count(h, "monitor_height_refusals", "jump") == 1
    await h.tick()
    assert h.service.height_note() is None
    assert (await store.monitor_state()).cursor == 90
    # A payment mined after the spike, below it, is credited as usual.
    chain.height, chain.transfers = 112, [early, pay(B, 2, 101)]
    for _ in range(2):
        await h.tick()
    assert (await store.redeem(A, 2)).balance == 2 * XMR
    assert (await store.redeem(B, 2)).balance == 2 * XMR
    assert (await store.monitor_state()).cursor == 102
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_absurd_height_costs_a_bounded_poll_and_is_undone_by_the_truth(store, fake):
    chain = Chain(100)
    h = await started(store, fake, chain)
    chain.heights = [2**62, 2**62]  # believed on the second poll: the cursor runs ahead
    for _ in range(2):
        asked = len(transfers_asked(fake))
        await h.tick()
        assert len(transfers_asked(fake)) - asked <= CATCHUP_SPANS + 2
    assert h.polls("ok") == 3
    # The truth again: the cursor comes back, and a payment made now is credited.
    chain.height, chain.transfers = 120, [pay(A, 1, 105)]
    for _ in range(2):
        await h.tick()
    assert (await store.monitor_state()).cursor == 110
    assert (await store.redeem(A, 1)).balance == 2 * XMR
    assert count(h, "monitor_height_refusals", "backwards") >= 1
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_height_that_goes_backwards_rewinds_the_cursor_and_reads_again(store, fake):
    chain = Chain(300)
    h = await started(store, fake, chain)
    assert (await store.monitor_state()).cursor == 290
    chain.height = 50  # a rescan, or a wallet restored from its seed
    await h.tick()
    assert (await store.monitor_state()).cursor == 40
    assert "went back" in (h.service.height_note() or "")
    # It scans again and this time reports a transfer at 60 it had missed.
    chain.height, chain.transfers = 300, [pay(A, 1, 60)]
    for _ in range(2):
        await h.tick()
    assert (await store.redeem(A, 1)).balance == 2 * XMR
    assert (await store.monitor_state()).cursor == 290
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_transfer_reported_late_below_the_window_is_found_by_the_sweep(store, fake):
    chain = Chain(5000)
    h = await started(store, fake, chain, start_height=1000)
    assert (await store.monitor_state()).cursor == 4990
    # A replaced wallet now reports a transfer far below the window for the first time.
    chain.transfers = [pay(A, 1, 1500)]
    bound = math.ceil((5000 - 20 - 999) / MAX_SPAN) + 1  # one round of the sweep
    polls = 0
    while isinstance(await store.redeem(A, 1), NotFound):
        polls += 1
        assert polls <= bound, "the sweep did not find the late transfer in one round"
        await h.tick()
    assert (await store.redeem(A, 2)).balance == 2 * XMR
    # The sweep never reads below --start-height, nor above the window.
    assert all(999 <= lo < hi <= 4980 for lo, hi, pool in transfers_asked(fake) if not pool)
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_answer_over_the_entry_limit_is_read_again_in_halves(store, fake):
    payers = [PaymentId(bytes([0, 0, 0, 0, 0, 0, 1, i])) for i in range(4)]
    chain = Chain(200, [pay(p, i + 1, 30 + 10 * i) for i, p in enumerate(payers)])
    h = await started(store, fake, chain, wallet={"max_entries": 3})
    assert h.polls("ok") == 1
    for p in payers:
        assert (await store.redeem(p, 1)).balance == 2 * XMR
    # The catch-up span (0, 180] held 4 entries: read again as (0, 90], then its halves.
    assert transfers_asked(fake)[:4] == [
        (0, 180, False),
        (0, 90, False),
        (0, 45, False),
        (45, 90, False),
    ]
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_one_block_over_the_entry_limit_fails_the_poll_clearly(store, fake):
    payers = [PaymentId(bytes([0, 0, 0, 0, 0, 0, 2, i])) for i in range(4)]
    chain = Chain(200, [pay(p, i + 1, 100) for i, p in enumerate(payers)])
    h = await started(store, fake, chain, wallet={"max_entries": 3})
    assert h.polls("too_large") == 1 and h.polls("ok") == 0
    assert (await store.monitor_state()).cursor is None  # nothing skipped past
    h.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_sweep_reads_about_the_same_number_of_entries_a_poll(store, fake):
    """Dense history (3 transfers a block): the sweep's span shrinks until a poll reads about
    SWEEP_ENTRIES of them, so a wallet with a million transfers costs little a poll."""
    dense = [pay(A, i, 1 + i // 3) for i in range(3 * 4000)]
    h = await started(store, fake, Chain(5000, dense))
    for _ in range(2):
        await h.tick()
    sweeps = [(lo, hi) for lo, hi, pool in transfers_asked(fake) if not pool][-3:]
    assert sweeps == [(0, 1000), (1000, 1500), (1500, 1750)]  # 3,000, 1,500, then 750 entries
    h.service.stopService()
