"""What every part of the :class:`~anonticket.store.Store` shares: the adbapi pool with its
batcher and admission limit, the key that tags every stored value, the known-PID filter and the
answer caches; opening and closing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger

from anonticket.keys import Tagger, prepare_data_dir
from anonticket.store import queries
from anonticket.store.answercache import DEFAULT_SIZE, AnswerCache
from anonticket.store.batch import Batcher
from anonticket.store.changes import NumberedRows
from anonticket.store.dialect import DatabaseError, Dialect, dialect_for
from anonticket.store.keycheck import open_key
from anonticket.store.known import KnownTags
from anonticket.store.negcache import NegativeCache
from anonticket.store.records import TokenRecord
from anonticket.store.schema import migrate

T = TypeVar("T")

# The namespace these lines had before the store package was split: log filters keep working.
log = Logger(namespace="anonticket.store")


class StorePool:
    """The state of a Store and its life: open with :meth:`open`, close with :meth:`close`."""

    def __init__(
        self,
        reactor: IReactorThreads,
        database: str,
        data_dir: Path,
        answer_cache: int = DEFAULT_SIZE,
        admission_limit: int = 0,
        negative_hit: Callable[[], None] | None = None,
        events: bool = False,
    ) -> None:
        self._reactor = reactor
        self._clock = cast(IReactorTime, reactor)  # the reactor is both
        self._database = database
        self._data_dir = data_dir
        self._dialect: Dialect = dialect_for(database)
        self._pool: adbapi.ConnectionPool | None = None
        self._batcher: Batcher | None = None
        self._tagger: Tagger | None = None
        self._known: KnownTags | None = None
        self._payments = NumberedRows()  # payments.id read into the filter
        self._token_changes = NumberedRows()  # tokens.changed_seq applied to token_answers
        # Answers to repeated token checks and redeems (see answercache.py), kept in step with
        # every payment, top-up and revoke, here and on other nodes.
        self.token_answers: AnswerCache[TokenRecord] = AnswerCache(self._clock, answer_cache)
        # One bytes value per PID (first txid, token status, signed balance): ~180 bytes an
        # entry with its key, against 260 for a tuple.
        self.redeem_answers: AnswerCache[bytes] = AnswerCache(self._clock, answer_cache)
        # Unknown PIDs the known-PID filter let through (a false positive) and the database did
        # not know, for half a second; ``negative_hit`` counts each answer it gives.
        self.unknown = NegativeCache(self._clock)
        self._negative_hit = negative_hit or (lambda: None)
        self._redeem_streams: dict[str, float] = {}  # see _redeem_synced
        self._spending: set[bytes] = set()  # Idempotency-Key tags of spends being answered
        # With --webhook-url, every change writes its event into the outbox in its transaction;
        # ``event_written`` is told after one committed (the delivery goes at once).
        self.events = events
        self.event_written: Callable[[], None] = lambda: None
        # Surge admission: with this many operations waiting on the database, a public request
        # that needs it is refused at once (0: never).  See overloaded().
        self.admission_limit = admission_limit

    @property
    def tagger(self) -> Tagger:
        assert self._tagger is not None, "store is not open"
        return self._tagger

    def open(self) -> None:
        """Prepare the data dir and key, migrate, and start the pool.

        Runs synchronously: twistd calls startService before the reactor runs, and a store that
        cannot open must stop start-up with one clear line, not fail later in a thread.
        """
        self._dialect.check_driver()
        prepare_data_dir(self._data_dir)
        migrate(self._dialect)
        conn = self._dialect.connect()
        try:
            self._tagger = open_key(self._dialect, conn, self._data_dir)
            self._known, known_upto = queries.load_known(conn, self._dialect)
            self._payments = NumberedRows(known_upto)
            self._token_changes = NumberedRows(queries.last_token_change(conn, self._dialect))
        finally:
            conn.close()
        args, kwargs = self._dialect.connect_args()
        self._pool = adbapi.ConnectionPool(
            self._dialect.module,
            *args,
            cp_openfun=self._dialect.on_connect,
            cp_reactor=self._reactor,
            cp_noisy=False,
            **self._dialect.pool_kwargs(),
            **kwargs,
        )
        self._batcher = Batcher(
            self._reactor, self._pool, self._dialect, self._dialect.pool_kwargs()["cp_max"]
        )
        now = self._clock.seconds()
        self.token_answers.synced(now)
        self._redeem_streams = {"payments": now, "tokens": now}
        self.redeem_answers.synced(now)

    def close(self) -> None:
        for cache in (self.token_answers, self.redeem_answers):
            cache.unsynced()
            cache.clear()
        if self._batcher is not None:
            self._batcher.close(DatabaseError("store is closed"))
            self._batcher = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            log.info("store closed")

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._batcher is None:
            return fail(DatabaseError("store is not open"))
        d: Deferred[T] = self._batcher.submit(fn, *args)
        return d

    def overloaded(self) -> bool:
        """True while at least ``admission_limit`` operations wait on the database: a public
        request that would join them is better answered 503 at once than after all of them
        (every waiting request's latency grows with the queue).  Answers from memory never
        ask this."""
        batcher = self._batcher
        limit = self.admission_limit
        return limit > 0 and batcher is not None and batcher.waiting >= limit

    def _written(self) -> None:
        if self.events:
            self.event_written()
