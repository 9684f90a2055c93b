"""What every unit of store work is: a function of a DB-API cursor and the dialect, run in a
pool thread by the batcher (batch.py), which commits when it returns and rolls back when it
raises.  Units that may write are marked ``@writes`` and begin with the dialect's
``start_write``, so SQLite takes its lock up front (unless the batch holds it already)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Txn = Any  # adbapi.Transaction: a DB-API cursor
F = TypeVar("F", bound=Callable[..., Any])


def delete_some(
    txn: Txn,
    d: Any,
    table: str,
    key: str,
    where: str,
    args: tuple[Any, ...],
    limit: int,
    order: str = "",
) -> int:
    """Delete at most ``limit`` rows of ``table`` matching ``where`` (``order``: which first),
    in the caller's write transaction; how many went.  A bounded batch, so that a purge never
    holds the write lock for long.  Every name and clause is the caller's constant."""
    order_by = f" ORDER BY {order}" if order else ""
    rows = txn.execute(
        d.sql(
            f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where}"
            f"{order_by} LIMIT ?) RETURNING {key}"
        ),
        (*args, limit),
    ).fetchall()
    return len(rows)


def writes(fn: F) -> F:
    """Mark an operation that may write: a batch holding one runs in a write transaction."""
    fn.writes = True  # type: ignore[attr-defined]
    return fn
