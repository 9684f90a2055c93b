"""Un-revoking a token, and the revocations an operator undid (migration 10).

A token row holds only its current revocation.  Un-revoking clears it in the transaction that
keeps it in the ``revocations`` table with when and why it was undone, bumps the token's version
and ``changed_seq`` (every node's memory of the token is evicted, as with a revoke) and, with
events on, writes ``token.unrevoked``.  A revoke after that is a new revocation, as the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from anonticket.store.dialect import DatabaseError, Dialect
from anonticket.store.outbox import token_event
from anonticket.store.queries import TOKEN_COLUMNS, token_record
from anonticket.store.records import TokenRecord
from anonticket.store.units import Txn, writes

# Attempts at the compare-and-swap below before giving up: only a concurrent change of the same
# token on PostgreSQL (a top-up, another node's revoke) makes one fail.
_ATTEMPTS: Final = 10


@dataclass(frozen=True, slots=True)
class PastRevocation:
    """A revocation that was undone."""

    id: int
    revoked_at: int
    revoke_reason: str | None
    unrevoked_at: int
    unrevoke_reason: str


@writes
def unrevoke(
    txn: Txn,
    d: Dialect,
    token_tag: bytes,
    reason: str,
    abuse_score: int | None,
    now: int,
    event_token: bytes | None = None,
) -> tuple[TokenRecord, bool, bytes] | None:
    """Undo the token's revocation; a token that is not revoked is returned unchanged.  As
    :func:`anonticket.store.queries.revoke`: the record, whether this call changed it, and the
    token's PID tag (its redeem answer changes); None for an unknown token."""
    d.start_write(txn)
    for _ in range(_ATTEMPTS):
        row = txn.execute(
            d.sql(f"SELECT {TOKEN_COLUMNS}, id, pid_tag FROM tokens WHERE token_tag = ?"),
            (token_tag,),
        ).fetchone()
        if row is None:
            return None
        record, token_row, pid_tag = token_record(row), int(row[-2]), bytes(row[-1])
        if record.revoked_at is None:
            return record, False, pid_tag
        # The revocation read above is the one undone: the update applies only to that version
        # (SQLite's write lock already excludes a change in between; PostgreSQL's row lock makes
        # a concurrent change wait, then this finds another version and reads again).
        changed = txn.execute(
            d.sql(
                "UPDATE tokens SET revoked_at = NULL, revoke_reason = NULL, "
                "abuse_score = coalesce(?, abuse_score), version = version + 1, "
                f"changed_seq = {d.next_token_change} "
                f"WHERE id = ? AND version = ? RETURNING {TOKEN_COLUMNS}"
            ),
            (abuse_score, token_row, record.version),
        ).fetchone()
        if changed is None:
            continue
        txn.execute(
            d.sql(
                "INSERT INTO revocations (token_id, revoked_at, revoke_reason, unrevoked_at, "
                "unrevoke_reason) VALUES (?, ?, ?, ?, ?)"
            ),
            (token_row, record.revoked_at, record.revoke_reason, now, reason),
        )
        after = token_record(changed)
        if event_token is not None:
            token_event(
                txn,
                d,
                token_row,
                event_token,
                "unrevoked",
                now,
                reason=reason,
                balance=after.balance,
                version=after.version,
            )
        return after, True, pid_tag
    raise DatabaseError("the token kept changing while it was being un-revoked")


def revocations(
    txn: Txn, d: Dialect, token_tag: bytes, limit: int, before: int | None
) -> list[PastRevocation] | None:
    """The token's undone revocations newest first, at most ``limit``, with ids below
    ``before`` if given; None for an unknown token."""
    row = txn.execute(d.sql("SELECT id FROM tokens WHERE token_tag = ?"), (token_tag,)).fetchone()
    if row is None:
        return None
    rows = txn.execute(
        d.sql(
            "SELECT id, revoked_at, revoke_reason, unrevoked_at, unrevoke_reason "
            "FROM revocations WHERE token_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
        ),
        (int(row[0]), 2**63 - 1 if before is None else before, limit),
    ).fetchall()
    return [
        PastRevocation(int(i), int(revoked), why, int(unrevoked), str(undone_why))
        for i, revoked, why, unrevoked, undone_why in rows
    ]
