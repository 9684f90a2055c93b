"""Every SQL statement of anonticket, as functions run in an adbapi pool thread.

Each function receives a DB-API cursor and the dialect, and does one unit of work; the batcher
(batch.py) commits when it returns and rolls back when it raises.  Units that may write are
marked ``@writes`` and begin with the dialect's ``start_write``, so SQLite takes its lock up
front (unless the batch holds it already).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from anonticket.domain import PaymentId, derive_service_token
from anonticket.keys import Tagger
from anonticket.store.dialect import Dialect
from anonticket.store.known import KnownTags
from anonticket.store.records import (
    BelowMinimum,
    MonitorState,
    NotFound,
    PaymentStatus,
    Pending,
    RecordResult,
    Redeemed,
    RedeemResult,
    TokenRecord,
    Transfer,
)

Txn = Any  # adbapi.Transaction: a DB-API cursor
F = TypeVar("F", bound=Callable[..., Any])


def writes(fn: F) -> F:
    """Mark an operation that may write: a batch holding one runs in a write transaction."""
    fn.writes = True  # type: ignore[attr-defined]
    return fn


_CURSOR = "cursor"
_WALLET_HEIGHT = "wallet_height"


@writes
def redeem(
    txn: Txn, d: Dialect, tagger: Tagger, pid: PaymentId, pid_tag: bytes, now: int
) -> tuple[RedeemResult, bytes | None]:
    """Claim every confirmed, unclaimed payment of ``pid`` (whose tag the caller has computed)
    and credit it to the PID's token.

    The claim is decided by the rows the UPDATE returns, never by a prior SELECT or by
    ``rowcount``: under any concurrency exactly one transaction gets each row.

    With the result comes the token's first txid when the answer is *settled*: the PID has no
    pending payment and nothing unclaimed left, so the answer stays the same until a new
    payment to it is recorded (the store may give it again without asking).
    """
    # One read first: an unknown PID (the common abusive case) costs one indexed query and never
    # takes the write lock.  A token implies claimed payments, so no payment means no token.
    rows = txn.execute(
        d.sql(
            "SELECT status, flagged_at IS NOT NULL, max(height) FROM payments "
            "WHERE pid_tag = ? GROUP BY status, flagged_at IS NOT NULL"
        ),
        (pid_tag,),
    ).fetchall()
    if not rows:
        return NotFound(), None
    seen = {(int(status), bool(flagged)): int(height) for status, flagged, height in rows}
    # Nothing waiting: no pending payment, none unclaimed that a reorg flagged (the unflagged
    # unclaimed ones are claimed below).
    settled = not any(
        status == PaymentStatus.PENDING or (status == PaymentStatus.UNCLAIMED and flagged)
        for status, flagged in seen
    )
    claimable = (PaymentStatus.UNCLAIMED, False) in seen
    claimed: list[tuple[bytes, int, int]] = []
    if claimable:
        d.start_write(txn)
        claimed = txn.execute(
            d.sql(
                "UPDATE payments SET status = ?, claimed_at = ? "
                "WHERE pid_tag = ? AND status = ? AND flagged_at IS NULL "
                "RETURNING txid, amount, height"
            ),
            (int(PaymentStatus.CLAIMED), now, pid_tag, int(PaymentStatus.UNCLAIMED)),
        ).fetchall()
    if claimed:
        credit = sum(amount for _, amount, _ in claimed)
        first_txid = min(claimed, key=lambda row: (row[2], row[0]))[0]
        token = derive_service_token(pid, bytes(first_txid).hex())
        inserted = txn.execute(
            d.sql(
                "INSERT INTO tokens (token_tag, pid_tag, first_txid, balance, issued_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pid_tag) DO NOTHING RETURNING balance"
            ),
            (tagger.token_tag(token.raw), pid_tag, bytes(first_txid), credit, now),
        ).fetchone()
        if inserted is not None:
            return Redeemed(token, int(inserted[0]), first_claim=True), _settled_txid(
                settled, first_txid
            )
        # A later payment to an already-redeemed PID: top up the existing token.
        row = txn.execute(
            d.sql(
                f"UPDATE tokens SET balance = balance + ?, changed_seq = {d.next_token_change} "
                "WHERE pid_tag = ? RETURNING first_txid, balance"
            ),
            (credit, pid_tag),
        ).fetchone()
        return Redeemed(
            derive_service_token(pid, bytes(row[0]).hex()),
            int(row[1]),
            first_claim=False,
            topped_up=True,
        ), _settled_txid(settled, row[0])
    if claimable or any(status == PaymentStatus.CLAIMED for status, _ in seen):
        # Claimed before, or just now by a concurrent redeem: the token exists.
        row = txn.execute(
            d.sql("SELECT first_txid, balance FROM tokens WHERE pid_tag = ?"), (pid_tag,)
        ).fetchone()
        if row is not None:
            token = derive_service_token(pid, bytes(row[0]).hex())
            return Redeemed(token, int(row[1]), first_claim=False), _settled_txid(settled, row[0])
    # What is left: pending payments, unclaimed ones flagged by a reorg (pending again until
    # the wallet reports them again), dust, or nothing redeemable.
    pending = [h for (status, _), h in seen.items() if status == PaymentStatus.PENDING]
    if pending:
        return Pending(max(pending), _state(txn, d).wallet_height), None
    if (PaymentStatus.UNCLAIMED, True) in seen:
        return Pending(0, _state(txn, d).wallet_height), None
    if any(status == PaymentStatus.DUST for status, _ in seen):
        return BelowMinimum(), None
    return NotFound(), None


def _settled_txid(settled: bool, first_txid: Any) -> bytes | None:
    return bytes(first_txid) if settled else None


def _token_record(row: Sequence[Any]) -> TokenRecord:
    return TokenRecord(
        balance=int(row[0]),
        issued_at=int(row[1]),
        revoked_at=None if row[2] is None else int(row[2]),
        revoke_reason=row[3],
        abuse_score=int(row[4]),
    )


_TOKEN_COLUMNS = "balance, issued_at, revoked_at, revoke_reason, abuse_score"


def token_status(txn: Txn, d: Dialect, token_tag: bytes) -> TokenRecord | None:
    row = txn.execute(
        d.sql(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_tag = ?"), (token_tag,)
    ).fetchone()
    return None if row is None else _token_record(row)


@writes
def revoke(
    txn: Txn,
    d: Dialect,
    token_tag: bytes,
    reason: str | None,
    abuse_score: int | None,
    now: int,
) -> tuple[TokenRecord, bool] | None:
    """Revoke once; a second revoke returns the current record and changes nothing."""
    d.start_write(txn)
    row = txn.execute(
        d.sql(
            "UPDATE tokens SET revoked_at = ?, revoke_reason = ?, "
            f"abuse_score = coalesce(?, abuse_score), changed_seq = {d.next_token_change} "
            f"WHERE token_tag = ? AND revoked_at IS NULL RETURNING {_TOKEN_COLUMNS}"
        ),
        (now, reason, abuse_score, token_tag),
    ).fetchone()
    if row is not None:
        return _token_record(row), True
    record = token_status(txn, d, token_tag)
    return None if record is None else (record, False)


@writes
def record_transfers(
    txn: Txn,
    d: Dialect,
    tagger: Tagger,
    transfers: Sequence[Transfer],
    now: int,
    cursor: int | None,
    wallet_height: int | None,
    recheck_from: int | None,
) -> RecordResult:
    """Store a batch of transfers and, in the same transaction, the monitor's cursor.

    Re-reading a transfer is harmless: the row is keyed by its identity; its height and
    pending/unclaimed status follow the wallet; a claimed, dust or legacy row never changes.

    With ``recheck_from`` the batch is the wallet's complete report of heights above it (and of
    the pool): a row there that the wallet no longer reports is a reorged-out or dropped
    transfer.  A pending one is forgotten; a credited one is flagged, never credited again.
    """
    d.start_write(txn)
    changed: dict[PaymentStatus, int] = {}
    keep = (int(PaymentStatus.PENDING), int(PaymentStatus.UNCLAIMED))
    for t in transfers:
        row = txn.execute(
            d.sql(
                "INSERT INTO payments (txid, subaddr_major, subaddr_minor, pid_tag, amount, "
                "height, status, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (txid, subaddr_major, subaddr_minor) DO UPDATE SET "
                "height = excluded.height, flagged_at = NULL, "
                "status = CASE WHEN payments.status IN (?, ?) AND excluded.status IN (?, ?) "
                "THEN excluded.status ELSE payments.status END "
                # Only real changes return a row, so the counts below are transitions.
                "WHERE payments.height <> excluded.height OR payments.flagged_at IS NOT NULL "
                "OR (payments.status <> excluded.status AND payments.status IN (?, ?) "
                "AND excluded.status IN (?, ?)) "
                "RETURNING status"
            ),
            (
                t.txid,
                t.subaddr_major,
                t.subaddr_minor,
                tagger.pid_tag(t.pid),
                t.amount,
                t.height,
                int(t.status),
                now,
                *keep,
                *keep,
                *keep,
                *keep,
            ),
        ).fetchone()
        if row is not None:
            status = PaymentStatus(int(row[0]))
            changed[status] = changed.get(status, 0) + 1
    flagged = forgotten = 0
    if recheck_from is not None:
        flagged, forgotten = _recheck(txn, d, transfers, recheck_from, now)
    for name, value in ((_CURSOR, cursor), (_WALLET_HEIGHT, wallet_height)):
        if value is not None:
            txn.execute(
                d.sql(
                    "INSERT INTO monitor_state (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                (name, value),
            )
    return RecordResult(changed=changed, flagged=flagged, forgotten=forgotten)


def _recheck(
    txn: Txn, d: Dialect, reported: Sequence[Transfer], above: int, now: int
) -> tuple[int, int]:
    seen = {(t.txid, t.subaddr_major, t.subaddr_minor) for t in reported}
    rows = txn.execute(
        d.sql(
            "SELECT id, txid, subaddr_major, subaddr_minor, status FROM payments "
            "WHERE (height > ? OR height = 0) AND status IN (?, ?, ?) AND flagged_at IS NULL"
        ),
        (
            above,
            int(PaymentStatus.PENDING),
            int(PaymentStatus.UNCLAIMED),
            int(PaymentStatus.CLAIMED),
        ),
    ).fetchall()
    flagged = forgotten = 0
    for row_id, txid, major, minor, status in rows:
        if (bytes(txid), int(major), int(minor)) in seen:
            continue
        if int(status) == PaymentStatus.PENDING:
            txn.execute(d.sql("DELETE FROM payments WHERE id = ?"), (row_id,))
            forgotten += 1
        else:
            txn.execute(d.sql("UPDATE payments SET flagged_at = ? WHERE id = ?"), (now, row_id))
            flagged += 1
    return flagged, forgotten


def _state(txn: Txn, d: Dialect) -> MonitorState:
    rows = dict(txn.execute(d.sql("SELECT name, value FROM monitor_state")).fetchall())
    return MonitorState(cursor=rows.get(_CURSOR), wallet_height=rows.get(_WALLET_HEIGHT))


def monitor_state(txn: Txn, d: Dialect) -> MonitorState:
    return _state(txn, d)


def load_known(cursor: Any, d: Dialect) -> tuple[KnownTags, int]:
    """Every payment's PID tag in a fresh filter sized for twice today's table, and the highest
    row id read.  *cursor* is a pool transaction or a plain connection (at start-up)."""
    count, upto = cursor.execute("SELECT count(*), coalesce(max(id), 0) FROM payments").fetchone()
    known = KnownTags(capacity=2 * int(count))
    rows = cursor.execute(d.sql("SELECT pid_tag FROM payments WHERE id <= ?"), (upto,))
    while batch := rows.fetchmany(10_000):
        for (tag,) in batch:
            known.add(bytes(tag))
    return known, int(upto)


def payment_tags_since(txn: Txn, d: Dialect, after_id: int, limit: int) -> list[tuple[int, bytes]]:
    rows = txn.execute(
        d.sql("SELECT id, pid_tag FROM payments WHERE id > ? ORDER BY id LIMIT ?"),
        (after_id, limit),
    ).fetchall()
    return [(int(row_id), bytes(tag)) for row_id, tag in rows]


def last_token_change(cursor: Any, d: Dialect) -> int:
    """The highest ``tokens.changed_seq``.  *cursor* is a pool transaction or a connection."""
    row = cursor.execute("SELECT coalesce(max(changed_seq), 0) FROM tokens").fetchone()
    return int(row[0])


def token_changes_since(txn: Txn, d: Dialect, after: int, limit: int) -> list[tuple[int, bytes]]:
    """(changed_seq, token_tag) of tokens stamped above ``after``, in order, at most ``limit``."""
    rows = txn.execute(
        d.sql(
            "SELECT changed_seq, token_tag FROM tokens WHERE changed_seq > ? "
            "ORDER BY changed_seq LIMIT ?"
        ),
        (after, limit),
    ).fetchall()
    return [(int(seq), bytes(tag)) for seq, tag in rows]


def ping(txn: Txn, d: Dialect) -> bool:
    return txn.execute("SELECT 1").fetchone() is not None
