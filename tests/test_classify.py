"""How the monitor reads one get_transfers entry (pure function, shapes from the real wallet)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anonticket.monitor import Skip, classify
from anonticket.store.records import PaymentStatus, Transfer

TXID = "6db0d4ee" + "00" * 28
N, MIN = 10, 10_000_000_000


def entry(**over):
    # The shape monero-wallet-rpc 0.18 returns for a confirmed incoming transfer.
    base = {
        "type": "in",
        "txid": TXID,
        "payment_id": "deadbeef00c0ffee",
        "amount": 1_500_000_000_000,
        "amounts": [1_500_000_000_000],
        "height": 100,
        "confirmations": 10,
        "locked": False,
        "unlock_time": 0,
        "fee": 2618400000,
        "double_spend_seen": False,
        "subaddr_index": {"major": 0, "minor": 0},
        "address": "45XFa...",
        "timestamp": 1795850036,
        "note": "",
    }
    base.update(over)
    return base


def recorded(entry: dict[str, object], height: int) -> Transfer:
    """The entry classified at ``height``: a transfer to record, not a skip."""
    t = classify(entry, height, N, MIN)
    assert isinstance(t, Transfer), t
    return t


def test_confirmed_exactly_at_n_confirmations():
    t = classify(entry(height=100), 110, N, MIN)
    assert isinstance(t, Transfer) and t.status == PaymentStatus.UNCLAIMED
    assert (t.txid.hex(), t.pid.hex(), t.amount, t.height) == (
        TXID,
        "deadbeef00c0ffee",
        1_500_000_000_000,
        100,
    )
    assert recorded(entry(height=101), 110).status == PaymentStatus.PENDING


def test_pool_entry_has_no_confirmations_key_and_is_pending_at_height_0():
    pool = entry(type="pool", height=0)
    del pool["confirmations"]
    t = recorded(pool, 110)
    assert t.status == PaymentStatus.PENDING and t.height == 0


def test_subaddress_index_is_part_of_the_identity():
    t = recorded(entry(subaddr_index={"major": 1, "minor": 7}), 200)
    assert (t.subaddr_major, t.subaddr_minor) == (1, 7)


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"type": "block", "payment_id": "0000000000000000"}, "coinbase"),
        ({"type": "out"}, "other_type"),
        ({"payment_id": "0000000000000000"}, "no_payment_id"),
        ({"unlock_time": 500}, "locked"),
        ({"double_spend_seen": True}, "double_spend"),
        ({"txid": "xyz"}, "malformed"),
        ({"txid": "ab" * 31}, "malformed"),
        ({"amount": -1}, "malformed"),
        ({"amount": "5"}, "malformed"),
        ({"amount": True}, "malformed"),
        ({"payment_id": "abc"}, "malformed"),
        ({"payment_id": 5}, "malformed"),
        ({"height": 0}, "malformed"),
        ({"height": 500}, "malformed"),
        ({"subaddr_index": {"major": -1, "minor": 0}}, "malformed"),
    ],
)
def test_never_redeemable_entries_are_skipped_with_a_reason(over, reason):
    outcome = classify(entry(**over), 110, N, MIN)
    assert isinstance(outcome, Skip) and outcome == reason


def test_dust_is_recorded_but_not_redeemable():
    assert recorded(entry(amount=MIN - 1), 200).status == PaymentStatus.DUST
    assert recorded(entry(amount=MIN), 200).status == PaymentStatus.UNCLAIMED


def test_legacy_64_hex_payment_id_is_recorded_as_legacy():
    t = recorded(entry(payment_id="ab" * 32), 200)
    assert t.status == PaymentStatus.LEGACY and t.pid == bytes.fromhex("ab" * 32)
    pool = recorded(entry(type="pool", height=0, payment_id="ab" * 32), 200)
    assert pool.status == PaymentStatus.LEGACY


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(sorted(entry())), json_values, max_size=12))
def test_no_entry_can_raise(garbage):
    outcome = classify(garbage, 110, N, MIN)
    assert isinstance(outcome, (Transfer, Skip))


@given(st.fixed_dictionaries({k: st.just(v) for k, v in entry().items()}), json_values)
def test_one_bad_field_never_raises(good, value):
    for key in good:
        outcome = classify({**good, key: value}, 110, N, MIN)
        assert isinstance(outcome, (Transfer, Skip))
