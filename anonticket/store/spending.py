"""The SQL of spends and of the ledger (SPEC §12), run in an adbapi pool thread like
:mod:`anonticket.store.queries`.

A spend is one transaction: look up its Idempotency-Key, read the token, take the amount off
with a compare-and-swap on the token's version, write the ledger entry and remember the answer
under the key.  A crash before the commit loses all of it (the service retries with the same
key and the spend is made then); after it, the key answers the same.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

from anonticket.store.dialect import Dialect
from anonticket.store.outbox import token_event
from anonticket.store.records import (
    LedgerEntry,
    LedgerKind,
    NotFound,
    SpendAnswer,
    SpendOutcome,
    VersionMismatch,
    status_of,
)
from anonticket.store.units import Txn, delete_some, writes

# The compare-and-swap loses only to a change that committed meanwhile; each loss means another
# change went through, so with a bounded number of writers it ends.  This bounds it anyway.
_CAS_TRIES: Final = 1000


class KeyRaced(Exception):
    """Another transaction stored this Idempotency-Key while this one ran (on PostgreSQL, a
    second node with the same key): this one is rolled back and asked again, and replays."""


@writes
def spend(
    txn: Txn,
    d: Dialect,
    token_tag: bytes,
    key_tag: bytes,
    fingerprint: bytes,
    amount: int,
    memo: str | None,
    if_match: int | None,
    now: int,
    event_token: bytes | None = None,
) -> tuple[SpendAnswer | VersionMismatch | NotFound | None, bytes | None]:
    """Spend ``amount`` from the token once per Idempotency-Key.

    Returns the answer and, when the token changed, its PID tag (its redeem answer changes).
    The answer is None when the key was used for another request (another fingerprint).  With
    ``event_token`` (the token, when events are on) a spend made is an event too.

    The token is read, then updated only if its version is still the one read (optimistic
    locking): on SQLite the write lock is held from the start and the swap always holds; on
    PostgreSQL another node may change the token in between, and the swap is tried again on the
    fresh row - the balance check with it, so a spend never takes a balance below zero.
    """
    d.start_write(txn)
    remembered = txn.execute(
        d.sql(
            "SELECT fingerprint, outcome, balance, version, spend_id FROM idempotency "
            "WHERE key_tag = ?"
        ),
        (key_tag,),
    ).fetchone()
    if remembered is not None:
        return _replay(remembered, fingerprint), None
    for _ in range(_CAS_TRIES):
        row = txn.execute(
            d.sql(
                "SELECT id, pid_tag, balance, version, revoked_at IS NOT NULL, reversed_amount "
                "FROM tokens WHERE token_tag = ?"
            ),
            (token_tag,),
        ).fetchone()
        if row is None:
            return NotFound(), None
        token_id, pid_tag = int(row[0]), bytes(row[1])
        balance, version = int(row[2]), int(row[3])
        if if_match is not None and version != if_match:
            return VersionMismatch(version, balance), None
        status = status_of(balance, bool(row[4]), int(row[5]))
        refusal = {
            "revoked": SpendOutcome.TOKEN_REVOKED,
            "suspended": SpendOutcome.TOKEN_SUSPENDED,
        }.get(status)
        if refusal is None and balance < amount:
            refusal = SpendOutcome.INSUFFICIENT_BALANCE
        if refusal is not None:
            answer = SpendAnswer(refusal, balance, version)
            _remember(txn, d, key_tag, fingerprint, answer, now)
            return answer, None
        swapped = txn.execute(
            d.sql(
                "UPDATE tokens SET balance = balance - ?, spent = spent + ?, "
                f"version = version + 1, changed_seq = {d.next_token_change} "
                "WHERE id = ? AND version = ? AND balance >= ? RETURNING balance, version"
            ),
            (amount, amount, token_id, version, amount),
        ).fetchone()
        if swapped is None:
            continue  # changed since it was read (another node): read it again
        spend_id = secrets.token_hex(16)
        txn.execute(
            d.sql(
                "INSERT INTO ledger (token_id, kind, amount, at, spend_id, memo) "
                "VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (token_id, int(LedgerKind.SPEND), amount, now, spend_id, memo),
        )
        answer = SpendAnswer(SpendOutcome.SPENT, int(swapped[0]), int(swapped[1]), spend_id)
        _remember(txn, d, key_tag, fingerprint, answer, now)
        if event_token is not None:
            token_event(
                txn,
                d,
                token_id,
                event_token,
                "spent",
                now,
                amount=amount,
                balance=answer.balance,
                version=answer.version,
                spend_id=spend_id,
                memo=memo,
            )
        return answer, pid_tag
    raise RuntimeError("the token kept changing; the spend was not made")


def _replay(row: Any, fingerprint: bytes) -> SpendAnswer | None:
    stored_fingerprint, outcome, balance, version, spend_id = row
    if bytes(stored_fingerprint) != fingerprint:
        return None
    return SpendAnswer(
        SpendOutcome(int(outcome)), int(balance), int(version), spend_id, replayed=True
    )


def _remember(
    txn: Txn, d: Dialect, key_tag: bytes, fingerprint: bytes, answer: SpendAnswer, now: int
) -> None:
    stored = txn.execute(
        d.sql(
            "INSERT INTO idempotency (key_tag, fingerprint, outcome, balance, version, spend_id, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_tag) DO NOTHING "
            "RETURNING key_tag"
        ),
        (
            key_tag,
            fingerprint,
            int(answer.outcome),
            answer.balance,
            answer.version,
            answer.spend_id,
            now,
        ),
    ).fetchone()
    if stored is None:
        # PostgreSQL: a concurrent transaction (another node) committed the key after this one
        # looked it up.  Raising rolls this one back, spend included; asked again, it replays.
        raise KeyRaced()


@writes
def purge_idempotency(txn: Txn, d: Dialect, before: int, limit: int) -> int:
    """Forget at most ``limit`` Idempotency-Keys stored before ``before``; how many went."""
    d.start_write(txn)
    return delete_some(
        txn, d, "idempotency", "key_tag", "created_at < ?", (before,), limit, "created_at"
    )


def ledger(
    txn: Txn, d: Dialect, token_tag: bytes, limit: int, before: int | None
) -> list[LedgerEntry] | None:
    """The token's entries newest first, at most ``limit``, with ids below ``before`` if given;
    None for an unknown token."""
    row = txn.execute(d.sql("SELECT id FROM tokens WHERE token_tag = ?"), (token_tag,)).fetchone()
    if row is None:
        return None
    rows = txn.execute(
        d.sql(
            "SELECT id, kind, amount, at, spend_id, memo FROM ledger "
            "WHERE token_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
        ),
        (int(row[0]), 2**63 - 1 if before is None else before, limit),
    ).fetchall()
    return [
        LedgerEntry(int(i), LedgerKind(int(kind)), int(amount), int(at), spend_id, memo)
        for i, kind, amount, at, spend_id, memo in rows
    ]


@writes
def use_pass(txn: Txn, d: Dialect, nonce_tag: bytes, period: int, now: int) -> bool:
    """True for the first use of this pass, on any node: the insert decides, not a read."""
    d.start_write(txn)
    row = txn.execute(
        d.sql(
            "INSERT INTO used_passes (nonce_tag, period, used_at) VALUES (?, ?, ?) "
            "ON CONFLICT (nonce_tag) DO NOTHING RETURNING period"
        ),
        (nonce_tag, period, now),
    ).fetchone()
    return row is not None


@writes
def purge_used_passes(txn: Txn, d: Dialect, below_period: int, limit: int) -> int:
    """Forget used passes of keys no pass verifies under any more (periods below this)."""
    d.start_write(txn)
    return delete_some(txn, d, "used_passes", "nonce_tag", "period < ?", (below_period,), limit)
