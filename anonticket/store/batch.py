"""Group the store operations of one reactor turn into one trip to the database thread.

Handing work to a pool thread and getting the answer back (the thread pool's queue, the
reactor's waker, the Deferred glue) costs more than the SQLite work of a redeem or a token
lookup; under load many requests arrive in the same reactor turn.  The batcher collects them,
runs them one after another on one pooled connection, and fires each caller's Deferred with its
own result.  With no load a batch is a single operation, so nothing waits.

Transactions: on PostgreSQL each operation runs in its own (committed, or rolled back on error,
before the next starts).  On SQLite a batch holding a write runs in one write transaction with
one commit: each commit appends every page the operation touched to the WAL (a claim touches
six to eight: the payment, the token and their indexes), and that, with the checkpoints it
brings, was what a first claim cost.  No caller hears anything before the commit, so a crash
loses the whole batch or nothing, never part of it; if any operation fails, the batch is rolled
back and every operation runs again on its own, so one bad operation fails alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

MAX_BATCH: Final = 64  # operations per trip: bounds how long one trip holds the connection

Op = tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]


def _run_batch(
    conn: Any, dialect: Any, ops: list[tuple[Callable[..., Any], tuple[Any, ...]]]
) -> list[Any]:
    if dialect.batch_transaction and len(ops) > 1 and any(_writes(fn) for fn, _ in ops):
        together = _run_together(conn, dialect, ops)
        if together is not None:
            return together
    return [_run_alone(conn, dialect, fn, args) for fn, args in ops]


def _writes(fn: Callable[..., Any]) -> bool:
    return getattr(fn, "writes", False) is True


def _run_together(
    conn: Any, dialect: Any, ops: list[tuple[Callable[..., Any], tuple[Any, ...]]]
) -> list[Any] | None:
    """Every operation in one write transaction and one commit; None if any of them failed
    (then nothing of the batch was committed, and the caller runs each on its own)."""
    cursor = conn.cursor()
    try:
        cursor.execute(dialect.begin_write)
        results = [fn(cursor, dialect, *args) for fn, args in ops]
        conn.commit()
        return results
    except Exception:
        with contextlib.suppress(Exception):
            conn.rollback()
        return None
    finally:
        cursor.close()


def _run_alone(conn: Any, dialect: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """One operation in its own transaction: committed, or rolled back and its failure kept."""
    cursor = conn.cursor()
    try:
        result = fn(cursor, dialect, *args)
        conn.commit()
        return result
    except Exception:
        failure = Failure()
        # A failed rollback means the connection is gone; the next operation says so too.
        with contextlib.suppress(Exception):
            conn.rollback()
        return failure
    finally:
        cursor.close()


class Batcher:
    def __init__(self, reactor: Any, pool: adbapi.ConnectionPool, dialect: Any, trips: int) -> None:
        self._reactor = reactor
        self._pool = pool
        self._dialect = dialect
        self._trips = trips  # trips in flight at once: one per pooled connection
        self._queue: list[Op] = []
        self._in_flight = 0
        self.waiting = 0  # operations submitted and not answered yet (queued or on a trip)
        self._scheduled = False
        self._closed: Exception | None = None

    def close(self, reason: Exception) -> None:
        """Fail what has not left yet; trips in flight finish (the pool joins its threads)."""
        self._closed = reason
        queue, self._queue = self._queue, []
        self.waiting -= len(queue)
        for _, _, d in queue:
            if not d.called:
                d.errback(reason)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self._closed is not None:
            d.errback(self._closed)
            return d
        self._queue.append((fn, args, d))
        self.waiting += 1
        self._kick()
        return d

    def _kick(self) -> None:
        if self._queue and not self._scheduled and self._in_flight < self._trips:
            # At the end of this reactor turn: every request that arrived in it joins.
            self._scheduled = True
            self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._closed is not None or self._in_flight >= self._trips or not self._queue:
            return
        ops, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        self._in_flight += 1
        trip = self._pool.runWithConnection(
            _run_batch, self._dialect, [(fn, args) for fn, args, _ in ops]
        )

        def deliver(results: list[Any] | Failure) -> None:
            self._in_flight -= 1
            self.waiting -= len(ops)
            for i, (_, _, d) in enumerate(ops):
                if d.called:  # cancelled meanwhile (the client went away)
                    continue
                result = results if isinstance(results, Failure) else results[i]
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
            self._kick()

        trip.addBoth(deliver)
