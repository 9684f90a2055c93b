"""The store: one adbapi ConnectionPool shared by the public site, the internal site and the
monitor.  Callers get Deferreds of plain records (:mod:`anonticket.store.records`); all SQL is in
:mod:`anonticket.store.queries` and all driver differences in :mod:`anonticket.store.dialect`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from anonticket import __version__
from anonticket.domain import PaymentId, ServiceToken, derive_service_token
from anonticket.keys import Tagger, prepare_data_dir
from anonticket.store import outbox, queries, revocations, spending
from anonticket.store.answercache import DEFAULT_SIZE, AnswerCache
from anonticket.store.batch import Batcher
from anonticket.store.changes import NumberedRows
from anonticket.store.dialect import DatabaseError, Dialect, dialect_for
from anonticket.store.keycheck import open_key
from anonticket.store.known import KnownTags
from anonticket.store.negcache import NegativeCache
from anonticket.store.records import (
    KeyInUse,
    KeyReused,
    LedgerEntry,
    MonitorState,
    NotFound,
    Overloaded,
    RecordResult,
    Redeemed,
    RedeemResult,
    SpendAnswer,
    SpendRequest,
    SpendResult,
    TokenRecord,
    Transfer,
    VersionMismatch,
)

__all__ = ["DatabaseError", "Store", "StoreService"]

T = TypeVar("T")

log = Logger()

_SYNC_PAGE = 10_000  # payment rows, or token changes, read per sync
_STATUSES = ("active", "revoked", "suspended")  # a token status as one byte of a redeem answer


class Store:
    """The typed face of the database.  Open with :meth:`open`, close with :meth:`close`."""

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

    def redeem(self, pid: PaymentId, now: int) -> Deferred[RedeemResult]:
        answer = self.redeem_answer(pid, now)
        assert not isinstance(answer, Overloaded)  # only refused with admit=True
        return answer if isinstance(answer, Deferred) else succeed(answer)

    def redeem_answer(
        self, pid: PaymentId, now: int, *, admit: bool = False
    ) -> RedeemResult | Overloaded | Deferred[RedeemResult]:
        """The redeem's answer now, when memory has it; else a Deferred of the database's; or,
        with ``admit``, :class:`Overloaded` when the database is :meth:`overloaded`."""
        pid_tag = self.tagger.pid_tag(pid.raw)
        if self._known is not None and pid_tag not in self._known:
            # No payment was ever recorded for this PID: no need to ask the database.
            return NotFound()
        if pid_tag in self.unknown:
            self._negative_hit()
            return NotFound()
        settled = self.redeem_answers.get(pid_tag)
        if settled is not None:
            # Every payment of this PID is claimed and none was recorded since: the answer is
            # the token (re-derived, never kept), its status and the balance it had.
            token = derive_service_token(pid, settled[:32].hex())
            balance = int.from_bytes(settled[33:], "big", signed=True)
            return Redeemed(token, balance, False, token_status=_STATUSES[settled[32]])
        if admit and self.overloaded():
            return Overloaded()
        ticket = self.redeem_answers.ticket()
        d = self._run(queries.redeem, self.tagger, pid, pid_tag, now, self.events)

        def done(outcome: tuple[RedeemResult, bytes | None]) -> RedeemResult:
            result, settled_txid = outcome
            if isinstance(result, NotFound) and ticket == self.redeem_answers.ticket():
                # The filter let it through (a false positive): spare the database a repeat,
                # unless a payment was recorded meanwhile (the ticket moved).
                self.unknown.add(pid_tag)
            if isinstance(result, Redeemed):
                if result.first_claim or result.topped_up:
                    self._written()
                if result.topped_up:
                    self.token_answers.invalidate([self.tagger.token_tag(result.token.raw)])
                if settled_txid is not None:
                    status = _STATUSES.index(result.token_status).to_bytes(1, "big")
                    balance = result.balance.to_bytes(16, "big", signed=True)
                    self.redeem_answers.put(pid_tag, settled_txid + status + balance, ticket)
            return result

        return d.addCallback(done)

    def sync_known(self) -> Deferred[None]:
        """Read payment rows other processes (a monitor on another node) added since the last
        call into the filter; rebuild it bigger once it is full."""
        known = self._known
        if known is None or self._pool is None:
            return succeed(None)
        as_of = self._clock.seconds()
        if known.full:
            d = self._run(queries.load_known)

            def rebuilt(result: tuple[KnownTags, int]) -> None:
                self._known, upto = result
                self._payments = NumberedRows(upto)
                # Which PIDs got payments since the last read is not known: forget every answer.
                self.redeem_answers.clear()
                self._redeem_synced("payments", as_of)

            return d.addCallback(rebuilt)
        d2 = self._run(queries.payment_tags_since, self._payments.since, _SYNC_PAGE)

        def evict(tags: list[bytes]) -> None:
            for tag in tags:
                known.add(tag)
                self.unknown.discard(tag)
            self.redeem_answers.invalidate(tags)

        def add(rows: list[tuple[int, bytes]]) -> None:
            _apply(rows, self._payments, evict, lambda: self._redeem_synced("payments", as_of))

        return d2.addCallback(add)

    def _redeem_synced(self, stream: str, as_of: float) -> None:
        """A redeem answer changes with a new payment row (the payments stream) and with a
        change of its token (the token stream): it is in step as of the older of the two."""
        self._redeem_streams[stream] = as_of
        self.redeem_answers.synced(min(self._redeem_streams.values()))

    def sync_tokens(self) -> Deferred[None]:
        """Evict from the answers every token another process (or this one) has changed (a
        top-up, revoke, reversal or restoration) since the last call, and its PID's redeem
        answer; they are given only while these calls succeed."""
        if self._pool is None:
            return succeed(None)
        as_of = self._clock.seconds()
        d = self._run(queries.token_changes_since, self._token_changes.since, _SYNC_PAGE)

        def evict(changed: list[tuple[bytes, bytes]]) -> None:
            self.token_answers.invalidate([tag for tag, _ in changed])
            self.redeem_answers.invalidate([pid for _, pid in changed])

        def synced() -> None:
            self.token_answers.synced(as_of)
            self._redeem_synced("tokens", as_of)

        def apply(rows: list[tuple[int, bytes, bytes]]) -> None:
            pairs = [(seq, (tag, pid)) for seq, tag, pid in rows]
            _apply(pairs, self._token_changes, evict, synced)

        return d.addCallback(apply)

    def token_status(
        self, token: ServiceToken, *, tag: bytes | None = None
    ) -> Deferred[TokenRecord | None]:
        """The token's record; ``tag`` is its tag when the caller has computed it already."""
        if tag is None:
            tag = self.tagger.token_tag(token.raw)
        return self._run(queries.token_status, tag)

    def token_answer(
        self, token: ServiceToken, *, admit: bool = False
    ) -> TokenRecord | Overloaded | Deferred[TokenRecord | None]:
        """The token's record now, when the token answers have it (a token checked recently
        and unchanged since); else a Deferred of the database's (None: unknown), kept for the
        next check; or, with ``admit``, :class:`Overloaded`."""
        tag = self.tagger.token_tag(token.raw)
        cached: TokenRecord | None = self.token_answers.get(tag)
        if cached is not None:
            return cached
        if admit and self.overloaded():
            return Overloaded()
        ticket = self.token_answers.ticket()

        def keep(record: TokenRecord | None) -> TokenRecord | None:
            if record is not None:
                self.token_answers.put(tag, record, ticket)
            return record

        return self._run(queries.token_status, tag).addCallback(keep)

    def revoke(
        self, token: ServiceToken, reason: str | None, abuse_score: int | None, now: int
    ) -> Deferred[tuple[TokenRecord, bool] | None]:
        tag = self.tagger.token_tag(token.raw)
        event_token = token.raw if self.events else None
        d = self._run(queries.revoke, tag, reason, abuse_score, now, event_token)
        return d.addCallback(self._status_changed, tag)

    def unrevoke(
        self, token: ServiceToken, reason: str, abuse_score: int | None, now: int
    ) -> Deferred[tuple[TokenRecord, bool] | None]:
        """Undo the token's revocation (see :func:`revocations.unrevoke`); like :meth:`revoke`,
        the record and whether this call changed it, None for an unknown token."""
        tag = self.tagger.token_tag(token.raw)
        event_token = token.raw if self.events else None
        d = self._run(revocations.unrevoke, tag, reason, abuse_score, now, event_token)
        return d.addCallback(self._status_changed, tag)

    def _status_changed(
        self, result: tuple[TokenRecord, bool, bytes] | None, tag: bytes
    ) -> tuple[TokenRecord, bool] | None:
        """After a revoke or un-revoke of the token ``tag``: its answers evicted if it changed
        (its PID's redeem answer holds its status), the record and whether it changed."""
        if result is None:
            return None
        record, newly, pid_tag = result
        if newly:
            self._written()
            self.token_answers.invalidate([tag])
            self.redeem_answers.invalidate([pid_tag])
        return record, newly

    def past_revocations(
        self, token: ServiceToken, limit: int, before: int | None
    ) -> Deferred[list[revocations.PastRevocation] | None]:
        """The token's undone revocations newest first (None: unknown token)."""
        return self._run(revocations.revocations, self.tagger.token_tag(token.raw), limit, before)

    def spend(self, request: SpendRequest, now: int) -> Deferred[SpendResult]:
        """Make a spend once per Idempotency-Key (see :func:`spending.spend`); a request whose
        key is being answered right now gets :class:`KeyInUse` (a second node's gets the first
        one's answer once it is made)."""
        tagger = self.tagger
        key_tag = tagger.idempotency_tag(request.key)
        if key_tag in self._spending:
            return succeed(KeyInUse())
        token_tag = tagger.token_tag(request.token.raw)
        args = (
            token_tag,
            key_tag,
            tagger.fingerprint(token_tag, request.amount, request.memo, request.extra),
            request.amount,
            request.memo,
            request.if_match,
            now,
            request.token.raw if self.events else None,
        )
        self._spending.add(key_tag)
        d = self._run(spending.spend, *args)

        def raced(failure: Failure) -> Deferred[Any]:
            # Another node stored the key first: asked again, this answers as it did.
            failure.trap(spending.KeyRaced)
            return self._run(spending.spend, *args)

        def done(
            outcome: tuple[SpendAnswer | VersionMismatch | NotFound | None, bytes | None],
        ) -> SpendResult:
            answer, pid_tag = outcome
            if pid_tag is not None:
                self._written()
                self.token_answers.invalidate([token_tag])
                self.redeem_answers.invalidate([pid_tag])
            return KeyReused() if answer is None else answer

        def finished(result: Any) -> Any:
            self._spending.discard(key_tag)
            return result

        answered: Deferred[SpendResult] = d.addErrback(raced).addCallback(done)
        return answered.addBoth(finished)

    def use_pass(self, nonce: bytes, key_id: bytes, period: int, now: int) -> Deferred[bool]:
        """Record a pass as used: True the first time, on any node; False after."""
        tag = self.tagger.pass_tag(nonce, key_id)
        return self._run(spending.use_pass, tag, period, now)

    def purge_used_passes(self, below_period: int, limit: int = 10_000) -> Deferred[int]:
        """Forget used passes of issuer keys older than ``below_period`` (none verifies)."""
        return self._run(spending.purge_used_passes, below_period, limit)

    def ledger(
        self, token: ServiceToken, limit: int, before: int | None
    ) -> Deferred[list[LedgerEntry] | None]:
        """The token's ledger entries newest first (None: unknown token)."""
        return self._run(spending.ledger, self.tagger.token_tag(token.raw), limit, before)

    def purge_idempotency(self, before: int, limit: int = 10_000) -> Deferred[int]:
        """Forget Idempotency-Keys stored before ``before`` (at most ``limit`` a call)."""
        return self._run(spending.purge_idempotency, before, limit)

    def record_transfers(
        self,
        transfers: Sequence[Transfer],
        now: int,
        cursor: int | None = None,
        wallet_height: int | None = None,
        recheck: tuple[int, int] | None = None,
        sweep: int | None = None,
        trusted_height: int | None = None,
    ) -> Deferred[RecordResult]:
        """Record one answer of the wallet (see :func:`queries.record_transfers`)."""
        d = self._run(
            queries.record_transfers,
            self.tagger,
            list(transfers),
            now,
            cursor,
            wallet_height,
            recheck,
            sweep,
            trusted_height,
            self.events,
        )

        def notify(result: RecordResult) -> RecordResult:
            if result.reversed.get("claimed") or result.restored.get("claimed"):
                self._written()
            for tag in result.stale_pids:
                if self._known is not None:
                    self._known.add(tag)
                self.unknown.discard(tag)
            if result.stale_pids:
                self.redeem_answers.invalidate(result.stale_pids)
            if result.stale_tokens:
                self.token_answers.invalidate(result.stale_tokens)
            return result

        d.addCallback(notify)
        return d

    def monitor_state(self) -> Deferred[MonitorState]:
        return self._run(queries.monitor_state)

    def _written(self) -> None:
        if self.events:
            self.event_written()

    # The outbox (see outbox.py), for the webhook delivery and the internal site.

    def take_due_events(
        self, now: int, lease: int, limit: int, owner: str
    ) -> Deferred[list[outbox.Due]]:
        return self._run(outbox.take_due, now, lease, limit, owner)

    def release_event_leases(self, owner: str) -> Deferred[int]:
        return self._run(outbox.release_leases, owner)

    def settle_event(
        self,
        row: int,
        state: outbox.EventState,
        now: int,
        error: str | None = None,
        retry_at: int | None = None,
    ) -> Deferred[None]:
        return self._run(outbox.settle, row, state, now, error, retry_at)

    def event_backlog(self) -> Deferred[outbox.Backlog]:
        return self._run(outbox.backlog)

    def failed_events(self, limit: int, after: int | None) -> Deferred[list[outbox.FailedEvent]]:
        return self._run(outbox.failed_events, limit, after)

    def retry_failed_events(self, event_id: str | None, now: int) -> Deferred[int]:
        """Make one failed event (or, with None, every one) due again; how many."""
        return self._run(outbox.retry_failed, event_id, now)

    def purge_delivered_events(self, before: int, limit: int = 10_000) -> Deferred[int]:
        return self._run(outbox.purge_delivered, before, limit)


def _apply(
    rows: list[tuple[int, T]],
    numbered: NumberedRows,
    evict: Callable[[list[T]], None],
    synced: Callable[[], None],
) -> None:
    """Apply one page of a sync read: evict what the rows not seen before carry and, unless the
    page was full (more to read), mark the answers in step."""
    fresh = numbered.fresh(rows)
    if fresh:
        evict(fresh)
    if len(rows) < _SYNC_PAGE:
        synced()


def migrate(dialect: Dialect) -> int:
    """Bring the schema up to date; each migration once, in order, in its own transaction."""
    try:
        conn = dialect.connect()
    except Exception as e:  # the driver's own error types differ per database
        raise DatabaseError(f"cannot open the database: {e}") from None
    try:
        known = dialect.migrations()
        found = dialect.schema_version(conn)
        if known and found > known[-1][0]:
            # A newer anonticket wrote this database (a rollback without restoring the backup
            # taken before the upgrade): its tables may mean things this version does not know.
            raise DatabaseError(
                f"the database is at schema version {found}, newer than this anonticket "
                f"{__version__} knows ({known[-1][0]}): run the newer version, or restore the "
                "backup taken before the upgrade (docs/admin.md)"
            )
        for version, script in known:
            if dialect.apply_migration(conn, version, script):
                log.info("database migrated to schema version {version}", version=version)
        return dialect.schema_version(conn)
    except DatabaseError:
        raise
    except Exception as e:
        raise DatabaseError(f"cannot migrate the database: {e}") from None
    finally:
        conn.close()


class StoreService(Service):
    """Opens the store when started and closes it when stopped (after the sites and monitor);
    meanwhile keeps its filter of known PIDs and its answer caches in step with the database."""

    name = "store"

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        sync_interval: float = 1.0,
        failed: Callable[[str], None] = lambda operation: None,
    ) -> None:
        """``failed(operation)`` counts a refresh that failed (``sync_known``, ``sync_tokens``):
        the metric the store-error alert reads."""
        self.store = store
        self._clock = clock
        self._interval = sync_interval
        self._failed = failed
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[LoopingCall] | None = None

    def startService(self) -> None:
        self.store.open()
        super().startService()
        self._loop = LoopingCall(self._sync)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self._interval, now=False)

    def _sync(self) -> Deferred[list[None]]:
        def failed(failure: Failure, what: str, operation: str) -> None:
            # Never let the loop die: the next tick tries again.
            self._failed(operation)
            log.warn(
                "store: refreshing the {what} failed: {error_type}",
                what=what,
                error_type=failure.type.__name__ if failure.type else "error",
            )

        return gatherResults(
            [
                self.store.sync_known().addErrback(failed, "known-PID filter", "sync_known"),
                self.store.sync_tokens().addErrback(failed, "token answers", "sync_tokens"),
            ]
        )

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], Any, None]:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
            if self._loop_done is not None:
                yield self._loop_done  # a refresh in flight finishes before the pool closes
        self.store.close()
