"""The transactional outbox (SPEC §13): events written in the transaction of the change they
describe, and the SQL the webhook delivery uses to take, settle and list them.

An event names its token by ``token_id`` (SHA-256 of the token's 32 bytes), never by the token,
a PID, a txid or an address: what the outbox holds is no usable secret.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Final

from anonticket.store.dialect import Dialect
from anonticket.store.units import Txn, delete_some, writes


class EventState(IntEnum):
    """Stored as a small integer; the numbers are part of the schema."""

    WAITING = 0
    DELIVERED = 1
    FAILED = 2


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def token_id_of(token: bytes) -> bytes:
    """The id events name a token by: SHA-256 of its 32 bytes."""
    return hashlib.sha256(token).digest()


def _rfc3339(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_event(
    txn: Txn,
    d: Dialect,
    token_row: int,
    token_id: bytes | None,
    kind: str,
    data: dict[str, Any],
    now: int,
) -> None:
    """Write one event (``token.<kind>``) in the caller's transaction, due at once.

    ``token_id`` is None only for a token of an earlier version that no change since has named
    (a reversal found by absence knows only tags): the event says ``null`` then."""
    body = _ENCODER.encode(
        {
            "type": f"token.{kind}",
            "timestamp": _rfc3339(now),
            "data": {"token_id": None if token_id is None else token_id.hex(), **data},
        }
    )
    txn.execute(
        d.sql(
            "INSERT INTO outbox (event_id, token_row, body, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?)"
        ),
        ("msg_" + secrets.token_hex(16), token_row, body, now, now),
    )


def token_event(
    txn: Txn, d: Dialect, token_row: int, token: bytes | None, kind: str, now: int, **data: Any
) -> None:
    """The event of a change of a token, named by the token's id: from ``token`` when the
    change knows it (kept on the token for changes that will not), else as kept."""
    if token is not None:
        token_id: bytes | None = token_id_of(token)
        txn.execute(
            d.sql("UPDATE tokens SET token_id = ? WHERE id = ? AND token_id IS NULL"),
            (token_id, token_row),
        )
    else:
        stored = txn.execute(
            d.sql("SELECT token_id FROM tokens WHERE id = ?"), (token_row,)
        ).fetchone()[0]
        token_id = None if stored is None else bytes(stored)
    add_event(txn, d, token_row, token_id, kind, data, now)


@dataclass(frozen=True, slots=True)
class Due:
    """An event taken for delivery."""

    row: int
    event_id: str
    body: bytes
    attempts: int  # failed attempts so far
    created_at: int


@writes
def take_due(txn: Txn, d: Dialect, now: int, lease: int, limit: int, owner: str) -> list[Due]:
    """Lease at most ``limit`` events that are due: waiting, their retry time come, not leased
    by a node, and the oldest waiting event of their token (a token's events go in order, one
    at a time); the longest due first.  The order is the index's (outbox_due), so the query
    stops after ``limit`` rows found instead of sorting the backlog.  On PostgreSQL rows another
    node is taking right now are skipped."""
    d.start_write(txn)
    rows = txn.execute(
        d.sql(
            "SELECT id, event_id, body, attempts, created_at FROM outbox o "
            "WHERE state = ? AND next_attempt_at <= ? AND leased_until <= ? "
            "AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.token_row = o.token_row "
            "AND e.state = ? AND e.id < o.id) "
            f"ORDER BY next_attempt_at, id LIMIT ?{d.skip_locked}"
        ),
        (int(EventState.WAITING), now, now, int(EventState.WAITING), limit),
    ).fetchall()
    if not rows:
        return []
    marks = ", ".join("?" * len(rows))
    txn.execute(
        d.sql(f"UPDATE outbox SET leased_until = ?, lease_owner = ? WHERE id IN ({marks})"),
        (now + lease, owner, *[int(r[0]) for r in rows]),
    )
    return [
        Due(int(row), str(event_id), str(body).encode("utf-8"), int(attempts), int(created))
        for row, event_id, body, attempts, created in rows
    ]


@writes
def release_leases(txn: Txn, d: Dialect, owner: str) -> int:
    """Give back the leases ``owner`` held (it is starting again: whatever it was delivering
    when it stopped is not being delivered), so they are due at once, not after the lease."""
    d.start_write(txn)
    rows = txn.execute(
        d.sql(
            "UPDATE outbox SET leased_until = 0 WHERE lease_owner = ? AND state = ? "
            "AND leased_until > 0 RETURNING id"
        ),
        (owner, int(EventState.WAITING)),
    ).fetchall()
    return len(rows)


@writes
def settle(
    txn: Txn,
    d: Dialect,
    row: int,
    state: EventState,
    now: int,
    error: str | None,
    retry_at: int | None,
) -> None:
    """Record one attempt: delivered, failed for good, or (``retry_at``) to be tried again.
    Only a waiting event changes: one another node delivered meanwhile stays delivered."""
    d.start_write(txn)
    if retry_at is not None:
        txn.execute(
            d.sql(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, "
                "leased_until = 0, last_error = ? WHERE id = ? AND state = ?"
            ),
            (retry_at, error, row, int(EventState.WAITING)),
        )
        return
    txn.execute(
        d.sql(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, settled_at = ?, "
            "leased_until = 0, last_error = ? WHERE id = ? AND state = ?"
        ),
        (int(state), now, error, row, int(EventState.WAITING)),
    )


@dataclass(frozen=True, slots=True)
class Backlog:
    waiting: int
    oldest: int | None  # created_at of the oldest waiting event
    failed: int


def backlog(txn: Txn, d: Dialect) -> Backlog:
    waiting, oldest = txn.execute(
        d.sql("SELECT count(*), min(created_at) FROM outbox WHERE state = ?"),
        (int(EventState.WAITING),),
    ).fetchone()
    (failed,) = txn.execute(
        d.sql("SELECT count(*) FROM outbox WHERE state = ?"), (int(EventState.FAILED),)
    ).fetchone()
    return Backlog(int(waiting), None if oldest is None else int(oldest), int(failed))


@dataclass(frozen=True, slots=True)
class FailedEvent:
    event_id: str
    type: str
    created_at: int
    attempts: int
    last_error: str | None
    row: int


def failed_events(txn: Txn, d: Dialect, limit: int, after: int | None) -> list[FailedEvent]:
    """Failed events, oldest first, at most ``limit``, with row ids above ``after``."""
    rows = txn.execute(
        d.sql(
            "SELECT id, event_id, body, created_at, attempts, last_error FROM outbox "
            "WHERE state = ? AND id > ? ORDER BY id LIMIT ?"
        ),
        (int(EventState.FAILED), after or 0, limit),
    ).fetchall()
    return [
        FailedEvent(
            str(event_id), str(json.loads(body)["type"]), int(created), int(n), error, int(i)
        )
        for i, event_id, body, created, n, error in rows
    ]


@writes
def retry_failed(txn: Txn, d: Dialect, event_id: str | None, now: int) -> int:
    """Make failed events (one, or every one) due again with a fresh retry schedule."""
    d.start_write(txn)
    where = "state = ?" if event_id is None else "state = ? AND event_id = ?"
    args: tuple[Any, ...] = (int(EventState.FAILED),) + (() if event_id is None else (event_id,))
    rows = txn.execute(
        d.sql(
            "UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ?, leased_until = 0, "
            f"settled_at = NULL WHERE {where} RETURNING id"
        ),
        (int(EventState.WAITING), now, *args),
    ).fetchall()
    return len(rows)


@writes
def purge_delivered(txn: Txn, d: Dialect, before: int, limit: int) -> int:
    """Forget at most ``limit`` events delivered before ``before``; how many went."""
    d.start_write(txn)
    args = (int(EventState.DELIVERED), before)
    return delete_some(txn, d, "outbox", "id", "state = ? AND settled_at < ?", args, limit, "id")
