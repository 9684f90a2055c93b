"""What every unit of store work is: a function of a DB-API cursor and the dialect, run in a
pool thread by the batcher (batch.py), which commits when it returns and rolls back when it
raises.  Units that may write are marked ``@writes`` and begin with the dialect's
``start_write``, so SQLite takes its lock up front (unless the batch holds it already)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Txn = Any  # adbapi.Transaction: a DB-API cursor
F = TypeVar("F", bound=Callable[..., Any])


def writes(fn: F) -> F:
    """Mark an operation that may write: a batch holding one runs in a write transaction."""
    fn.writes = True  # type: ignore[attr-defined]
    return fn
