"""The SQL of payments, redeems, tokens and the monitor, as units of store work (units.py).

Spends and the ledger are in spending.py, events in outbox.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from anonticket.domain import PaymentId, derive_service_token
from anonticket.keys import Tagger
from anonticket.store.dialect import Dialect
from anonticket.store.known import KnownTags
from anonticket.store.outbox import token_event
from anonticket.store.records import (
    BelowMinimum,
    LedgerKind,
    MonitorState,
    NotFound,
    PaymentStatus,
    Pending,
    RecordResult,
    Redeemed,
    RedeemResult,
    TokenRecord,
    Transfer,
    status_of,
)
from anonticket.store.units import Txn, writes

_CURSOR = "cursor"
_WALLET_HEIGHT = "wallet_height"
_SWEEP = "sweep"
_TRUSTED_HEIGHT = "trusted_height"


@writes
def redeem(
    txn: Txn,
    d: Dialect,
    tagger: Tagger,
    pid: PaymentId,
    pid_tag: bytes,
    now: int,
    events: bool = False,
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
        d.sql("SELECT status, max(height) FROM payments WHERE pid_tag = ? GROUP BY status"),
        (pid_tag,),
    ).fetchall()
    if not rows:
        return NotFound(), None
    seen = {int(status): int(height) for status, height in rows}
    # Nothing waiting: no pending payment (unclaimed ones are claimed below).  A claimed payment
    # the chain took back changes the token's balance, which evicts the answer (changed_seq).
    settled = PaymentStatus.PENDING not in seen
    claimable = PaymentStatus.UNCLAIMED in seen
    claimed: list[tuple[int, bytes, int, int]] = []  # id, txid, amount, height
    if claimable:
        d.start_write(txn)
        claimed = txn.execute(
            d.sql(
                "UPDATE payments SET status = ?, claimed_at = ? "
                "WHERE pid_tag = ? AND status = ? "
                "RETURNING id, txid, amount, height"
            ),
            (int(PaymentStatus.CLAIMED), now, pid_tag, int(PaymentStatus.UNCLAIMED)),
        ).fetchall()
    if claimed:
        credit = sum(int(amount) for _, _, amount, _ in claimed)
        first_txid = min(claimed, key=lambda row: (row[3], row[1]))[1]
        token = derive_service_token(pid, bytes(first_txid).hex())
        inserted = txn.execute(
            d.sql(
                "INSERT INTO tokens (token_tag, pid_tag, first_txid, balance, issued_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pid_tag) DO NOTHING RETURNING id, balance"
            ),
            (tagger.token_tag(token.raw), pid_tag, bytes(first_txid), credit, now),
        ).fetchone()
        if inserted is not None:
            _credit(txn, d, int(inserted[0]), claimed, now)
            if events:
                token_event(
                    txn,
                    d,
                    int(inserted[0]),
                    token.raw,
                    "issued",
                    now,
                    amount=credit,
                    balance=int(inserted[1]),
                    version=1,
                )
            return Redeemed(token, int(inserted[1]), first_claim=True), _settled_txid(
                settled, first_txid
            )
        # A later payment to an already-redeemed PID: top up the existing token (a revoked one
        # too: the money is recorded, and the answer says the token is revoked).
        row = txn.execute(
            d.sql(
                "UPDATE tokens SET balance = balance + ?, version = version + 1, "
                f"changed_seq = {d.next_token_change} "
                f"WHERE pid_tag = ? RETURNING {_REDEEMED_COLUMNS}, id, version"
            ),
            (credit, pid_tag),
        ).fetchone()
        token_row, version = int(row[-2]), int(row[-1])
        _credit(txn, d, token_row, claimed, now)
        redeemed = _redeemed(pid, row[:-2], topped_up=True)
        if events:
            token_event(
                txn,
                d,
                token_row,
                redeemed.token.raw,
                "credited",
                now,
                amount=credit,
                balance=redeemed.balance,
                version=version,
            )
        return redeemed, _settled_txid(settled, row[0])
    if claimable or PaymentStatus.CLAIMED in seen:
        # Claimed before, or just now by a concurrent redeem: the token exists.
        row = txn.execute(
            d.sql(f"SELECT {_REDEEMED_COLUMNS} FROM tokens WHERE pid_tag = ?"), (pid_tag,)
        ).fetchone()
        if row is not None:
            return _redeemed(pid, row, topped_up=False), _settled_txid(settled, row[0])
    # What is left: pending payments (new ones, or credited ones the chain took back and that
    # the wallet still shows unconfirmed), dust, or nothing redeemable.
    if PaymentStatus.PENDING in seen:
        state = _state(txn, d)
        # Confirmations count from the height the monitor acted on, not a spike it refused.
        height = state.wallet_height if state.trusted_height is None else state.trusted_height
        return Pending(seen[PaymentStatus.PENDING], height), None
    if PaymentStatus.DUST in seen:
        return BelowMinimum(), None
    return NotFound(), None


_REDEEMED_COLUMNS = "first_txid, balance, revoked_at IS NOT NULL, reversed_amount"


def _credit(
    txn: Txn, d: Dialect, token_id: int, claimed: Sequence[Sequence[Any]], now: int
) -> None:
    """One ledger credit per payment a claim took (rows of id, txid, amount, height)."""
    txn.executemany(
        d.sql("INSERT INTO ledger (token_id, kind, amount, payment_id, at) VALUES (?, ?, ?, ?, ?)"),
        [
            (token_id, int(LedgerKind.CREDIT), int(amount), int(payment_id), now)
            for payment_id, _, amount, _ in claimed
            if int(amount) > 0
        ],
    )


def _redeemed(pid: PaymentId, row: Sequence[Any], *, topped_up: bool) -> Redeemed:
    first_txid, balance, revoked, reversed_amount = row
    return Redeemed(
        derive_service_token(pid, bytes(first_txid).hex()),
        int(balance),
        first_claim=False,
        topped_up=topped_up,
        token_status=status_of(int(balance), bool(revoked), int(reversed_amount)),
    )


def _settled_txid(settled: bool, first_txid: Any) -> bytes | None:
    return bytes(first_txid) if settled else None


def token_record(row: Sequence[Any]) -> TokenRecord:
    """A token's record from a row of :data:`TOKEN_COLUMNS`."""
    return TokenRecord(
        balance=int(row[0]),
        issued_at=int(row[1]),
        revoked_at=None if row[2] is None else int(row[2]),
        revoke_reason=row[3],
        abuse_score=int(row[4]),
        reversed=int(row[5]),
        version=int(row[6]),
        spent=int(row[7]),
    )


TOKEN_COLUMNS = (
    "balance, issued_at, revoked_at, revoke_reason, abuse_score, reversed_amount, version, spent"
)


def token_status(txn: Txn, d: Dialect, token_tag: bytes) -> TokenRecord | None:
    row = txn.execute(
        d.sql(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_tag = ?"), (token_tag,)
    ).fetchone()
    return None if row is None else token_record(row)


@writes
def revoke(
    txn: Txn,
    d: Dialect,
    token_tag: bytes,
    reason: str | None,
    abuse_score: int | None,
    now: int,
    event_token: bytes | None = None,
) -> tuple[TokenRecord, bool, bytes] | None:
    """Revoke once; a second revoke returns the current record and changes nothing.  With the
    record: whether this call revoked it, and the token's PID tag (its redeem answer changes).
    With ``event_token`` (the token, when events are on) the revoke is an event too."""
    d.start_write(txn)
    row = txn.execute(
        d.sql(
            "UPDATE tokens SET revoked_at = ?, revoke_reason = ?, version = version + 1, "
            f"abuse_score = coalesce(?, abuse_score), changed_seq = {d.next_token_change} "
            f"WHERE token_tag = ? AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}, id, pid_tag"
        ),
        (now, reason, abuse_score, token_tag),
    ).fetchone()
    if row is not None:
        record = token_record(row)
        if event_token is not None:
            token_event(
                txn,
                d,
                int(row[-2]),
                event_token,
                "revoked",
                now,
                reason=reason,
                balance=record.balance,
                version=record.version,
            )
        return record, True, bytes(row[-1])
    row = txn.execute(
        d.sql(f"SELECT {TOKEN_COLUMNS}, pid_tag FROM tokens WHERE token_tag = ?"), (token_tag,)
    ).fetchone()
    return None if row is None else (token_record(row), False, bytes(row[-1]))


Identity = tuple[bytes, int, int]  # txid, subaddress major, minor


@dataclass(slots=True)
class _Row:
    id: int
    pid_tag: bytes
    amount: int
    height: int
    status: int
    reversed_at: int | None


_ROW_COLUMNS = "id, pid_tag, amount, height, status, reversed_at"
_IN_CHUNK = 500  # identities looked up per statement (well below any bind-parameter limit)


@dataclass(slots=True)
class _Changes:
    """What one batch did, gathered while it runs (becomes a :class:`RecordResult`)."""

    changed: dict[PaymentStatus, int] = field(default_factory=dict)
    reversed: dict[str, int] = field(default_factory=dict)
    restored: dict[str, int] = field(default_factory=dict)
    forgotten: int = 0
    stale_pids: set[bytes] = field(default_factory=set)
    stale_tokens: set[bytes] = field(default_factory=set)
    events: bool = False  # write an event per reversal and restoration (--webhook-url)

    def count(self, counts: dict[Any, int], key: Any) -> None:
        counts[key] = counts.get(key, 0) + 1

    def result(self) -> RecordResult:
        return RecordResult(
            changed=self.changed,
            reversed=self.reversed,
            restored=self.restored,
            forgotten=self.forgotten,
            stale_pids=sorted(self.stale_pids),
            stale_tokens=sorted(self.stale_tokens),
        )


def _more_confirmed(a: Transfer, b: Transfer) -> Transfer:
    """Of two reports of one transfer in one answer, the one that says more (mined over pool)."""
    return (
        a
        if (a.status == PaymentStatus.UNCLAIMED, a.height)
        >= (
            b.status == PaymentStatus.UNCLAIMED,
            b.height,
        )
        else b
    )


@writes
def record_transfers(
    txn: Txn,
    d: Dialect,
    tagger: Tagger,
    transfers: Sequence[Transfer],
    now: int,
    cursor: int | None,
    wallet_height: int | None,
    recheck: tuple[int, int] | None,
    sweep: int | None = None,
    trusted_height: int | None = None,
    events: bool = False,
) -> RecordResult:
    """Store what the wallet reported and, in the same transaction, the monitor's state.

    Each reported transfer's row follows the wallet (rows are keyed by transfer identity, so a
    re-read is harmless): a pending one becomes unclaimed (redeemable) when the wallet reports
    it confirmed; a credited one (unclaimed or claimed) the wallet reports unconfirmed again -
    back in the pool, or mined again with fewer than N confirmations - is *reversed*, and
    *restored* once confirmed again.  Dust and legacy rows never become payable.

    With ``recheck = (lo, hi)`` the batch is the wallet's complete report of heights
    ``lo < h <= hi`` and of the pool: a row there that the wallet no longer reports was
    reorganised out or dropped.  A pending one is forgotten; a credited one is reversed.

    Reversing a claimed transfer takes its amount off the token (the balance may go below zero:
    the token is suspended) with a ledger entry; restoring it puts the amount back, so a
    transfer is never credited twice and an honest reorg ends where it started.  An unclaimed
    one simply stops being redeemable: pending again while the wallet shows it, gone when not.
    """
    d.start_write(txn)
    changes = _Changes(events=events)
    reported: dict[Identity, Transfer] = {}
    for t in transfers:
        key = (t.txid, t.subaddr_major, t.subaddr_minor)
        known = reported.get(key)
        reported[key] = t if known is None else _more_confirmed(known, t)
    existing = _rows_for(txn, d, list(reported))
    for key, t in reported.items():
        row = existing.get(key)
        if row is None:
            pid_tag = tagger.pid_tag(t.pid)
            txn.execute(
                d.sql(
                    "INSERT INTO payments (txid, subaddr_major, subaddr_minor, pid_tag, amount, "
                    "height, status, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (*key, pid_tag, t.amount, t.height, int(t.status), now),
            )
            changes.count(changes.changed, t.status)
            changes.stale_pids.add(pid_tag)
        else:
            _follow(txn, d, row, t, now, changes)
    if recheck is not None:
        lo, hi = recheck
        rows = txn.execute(
            d.sql(
                f"SELECT txid, subaddr_major, subaddr_minor, {_ROW_COLUMNS} FROM payments "
                "WHERE ((height > ? AND height <= ?) OR height = 0) AND status IN (?, ?, ?)"
            ),
            (lo, hi, *_MONEY),
        ).fetchall()
        for txid, major, minor, *columns in rows:
            if (bytes(txid), int(major), int(minor)) not in reported:
                _gone(txn, d, _row(columns), now, changes)
    state = (
        (_CURSOR, cursor),
        (_WALLET_HEIGHT, wallet_height),
        (_TRUSTED_HEIGHT, trusted_height),
        (_SWEEP, sweep),
    )
    for name, value in state:
        if value is not None:
            txn.execute(
                d.sql(
                    "INSERT INTO monitor_state (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                (name, value),
            )
    return changes.result()


_MONEY = (int(PaymentStatus.PENDING), int(PaymentStatus.UNCLAIMED), int(PaymentStatus.CLAIMED))


def _row(columns: Sequence[Any]) -> _Row:
    row_id, pid_tag, amount, height, status, reversed_at = columns
    return _Row(
        int(row_id),
        bytes(pid_tag),
        int(amount),
        int(height),
        int(status),
        None if reversed_at is None else int(reversed_at),
    )


def _rows_for(txn: Txn, d: Dialect, keys: list[Identity]) -> dict[Identity, _Row]:
    found: dict[Identity, _Row] = {}
    wanted = set(keys)
    txids = sorted({key[0] for key in keys})
    for start in range(0, len(txids), _IN_CHUNK):
        chunk = txids[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = txn.execute(
            d.sql(
                f"SELECT txid, subaddr_major, subaddr_minor, {_ROW_COLUMNS} FROM payments "
                f"WHERE txid IN ({marks})"
            ),
            chunk,
        ).fetchall()
        for txid, major, minor, *columns in rows:
            key = (bytes(txid), int(major), int(minor))
            if key in wanted:
                found[key] = _row(columns)
    return found


def _follow(txn: Txn, d: Dialect, row: _Row, t: Transfer, now: int, changes: _Changes) -> None:
    """Bring one stored row in line with the wallet's new report of it.

    A row is money by what is *stored* (its amount and id were judged when it was first seen);
    the report only says whether it is confirmed now.  Its status from the report's amount or
    id is ignored: a wallet has reported a credited transfer back in the pool with amount 0
    (dust, by its amount), which must reverse it, not leave it credited."""
    confirmed = t.is_confirmed
    was_reversed = row.reversed_at is not None
    if row.status == PaymentStatus.DUST and row.amount == 0 < t.amount:
        # First seen as a pool entry the wallet could not value (it reports some with amount
        # 0): judged again, once, by a report that carries the amount.
        txn.execute(
            d.sql("UPDATE payments SET amount = ?, status = ?, height = ? WHERE id = ?"),
            (t.amount, int(t.status), t.height, row.id),
        )
        changes.count(changes.changed, t.status)
        changes.stale_pids.add(row.pid_tag)
        return
    money = row.status in _MONEY
    if money and row.status == PaymentStatus.PENDING and confirmed:
        _set(txn, d, row, status=PaymentStatus.UNCLAIMED, height=t.height, reversed_at=None)
        if not was_reversed:
            changes.count(changes.changed, PaymentStatus.UNCLAIMED)
        else:
            changes.count(changes.restored, "unclaimed")
        changes.stale_pids.add(row.pid_tag)
    elif money and row.status == PaymentStatus.UNCLAIMED and not confirmed:
        _set(txn, d, row, status=PaymentStatus.PENDING, height=t.height, reversed_at=now)
        changes.count(changes.reversed, "unclaimed")
        changes.stale_pids.add(row.pid_tag)
    elif money and row.status == PaymentStatus.CLAIMED and confirmed == was_reversed:
        # Confirmed again after a reversal (restore), or no longer confirmed (reverse).
        _move_claimed(txn, d, row, t.height, now, changes, restore=confirmed, pid=t.pid)
    elif row.height != t.height:
        txn.execute(d.sql("UPDATE payments SET height = ? WHERE id = ?"), (t.height, row.id))


def _gone(txn: Txn, d: Dialect, row: _Row, now: int, changes: _Changes) -> None:
    """A row in the re-checked heights (or the pool) that the wallet no longer reports."""
    if row.status == PaymentStatus.CLAIMED:
        if row.reversed_at is None:
            _move_claimed(txn, d, row, row.height, now, changes, restore=False)
        return
    txn.execute(d.sql("DELETE FROM payments WHERE id = ?"), (row.id,))
    if row.status == PaymentStatus.UNCLAIMED:
        changes.count(changes.reversed, "unclaimed")
    else:
        changes.forgotten += 1
    changes.stale_pids.add(row.pid_tag)


def _set(
    txn: Txn, d: Dialect, row: _Row, *, status: PaymentStatus, height: int, reversed_at: int | None
) -> None:
    txn.execute(
        d.sql("UPDATE payments SET status = ?, height = ?, reversed_at = ? WHERE id = ?"),
        (int(status), height, reversed_at, row.id),
    )


def _move_claimed(
    txn: Txn,
    d: Dialect,
    row: _Row,
    height: int,
    now: int,
    changes: _Changes,
    *,
    restore: bool,
    pid: bytes | None = None,
) -> None:
    """Take a claimed transfer's amount off its token (a reversal) or put it back (a
    restoration), with a ledger entry and a change number that evicts every node's answers;
    and an event, named by the token's id (derived from ``pid``, the PID the wallet reported,
    or stored from an earlier change)."""
    txn.execute(
        d.sql("UPDATE payments SET height = ?, reversed_at = ? WHERE id = ?"),
        (height, None if restore else now, row.id),
    )
    delta = row.amount if restore else -row.amount
    token = txn.execute(
        d.sql(
            "UPDATE tokens SET balance = balance + ?, reversed_amount = reversed_amount - ?, "
            f"version = version + 1, changed_seq = {d.next_token_change} "
            "WHERE pid_tag = ? RETURNING id, token_tag, balance, version, first_txid"
        ),
        (delta, delta, row.pid_tag),
    ).fetchone()
    if token is not None and row.amount > 0:
        kind = LedgerKind.RESTORATION if restore else LedgerKind.REVERSAL
        txn.execute(
            d.sql(
                "INSERT INTO ledger (token_id, kind, amount, payment_id, at) VALUES (?, ?, ?, ?, ?)"
            ),
            (int(token[0]), int(kind), row.amount, row.id, now),
        )
        changes.stale_tokens.add(bytes(token[1]))
        if changes.events:
            raw = None
            if pid is not None and len(pid) == 8:
                raw = derive_service_token(PaymentId(pid), bytes(token[4]).hex()).raw
            kind_name = "restored" if restore else "reversed"
            token_event(
                txn,
                d,
                int(token[0]),
                raw,
                kind_name,
                now,
                amount=row.amount,
                balance=int(token[2]),
                version=int(token[3]),
            )
    changes.count(changes.restored if restore else changes.reversed, "claimed")
    changes.stale_pids.add(row.pid_tag)


def _state(txn: Txn, d: Dialect) -> MonitorState:
    rows = dict(txn.execute(d.sql("SELECT name, value FROM monitor_state")).fetchall())
    return MonitorState(
        cursor=rows.get(_CURSOR),
        wallet_height=rows.get(_WALLET_HEIGHT),
        trusted_height=rows.get(_TRUSTED_HEIGHT),
        sweep=rows.get(_SWEEP),
    )


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


def token_changes_since(
    txn: Txn, d: Dialect, after: int, limit: int
) -> list[tuple[int, bytes, bytes]]:
    """(changed_seq, token_tag, pid_tag) of tokens stamped above ``after``, in order, at most
    ``limit``: a top-up, revoke, reversal or restoration changes both the token's answer and
    its PID's redeem answer."""
    rows = txn.execute(
        d.sql(
            "SELECT changed_seq, token_tag, pid_tag FROM tokens WHERE changed_seq > ? "
            "ORDER BY changed_seq LIMIT ?"
        ),
        (after, limit),
    ).fetchall()
    return [(int(seq), bytes(tag), bytes(pid_tag)) for seq, tag, pid_tag in rows]
