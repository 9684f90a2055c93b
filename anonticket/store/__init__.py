"""The store: one adbapi ConnectionPool shared by the public site, the internal site and the
monitor.  Callers get Deferreds of plain records (:mod:`anonticket.store.records`); all SQL is in
:mod:`anonticket.store.queries` and all driver differences in :mod:`anonticket.store.dialect`.

:class:`Store` is made of one class per job: what it shares and how it opens
(:mod:`~anonticket.store.pool`), the answers from memory and keeping them in step
(:mod:`~anonticket.store.answers`), a token's revocations and spends
(:mod:`~anonticket.store.tokens`), the monitor's records (:mod:`~anonticket.store.ingest`) and
the outbox of events (:mod:`~anonticket.store.events`).
"""

from __future__ import annotations

from anonticket.store.answers import StoreAnswers
from anonticket.store.dialect import DatabaseError
from anonticket.store.events import StoreEvents
from anonticket.store.ingest import StoreIngest
from anonticket.store.schema import migrate
from anonticket.store.service import StoreService
from anonticket.store.tokens import StoreTokens

__all__ = ["DatabaseError", "Store", "StoreService", "migrate"]


class Store(StoreAnswers, StoreTokens, StoreIngest, StoreEvents):
    """The typed face of the database.  Open with :meth:`open`, close with :meth:`close`."""
