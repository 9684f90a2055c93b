"""The answers the store gives from memory, and how they are kept in step with the database.

A redeem or token check is answered from the known-PID filter, the unknown-PID cache or the
answer caches when they have it, else from the database (and the answer kept); every change
made here evicts what it touched at once, and :meth:`StoreAnswers.sync_known` and
:meth:`StoreAnswers.sync_tokens` (called every second by the
:class:`~anonticket.store.service.StoreService`) evict what other nodes changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed

from anonticket.domain import PaymentId, ServiceToken, derive_service_token
from anonticket.store import queries
from anonticket.store.changes import NumberedRows
from anonticket.store.known import KnownTags
from anonticket.store.pool import StorePool
from anonticket.store.records import NotFound, Overloaded, Redeemed, RedeemResult, TokenRecord

T = TypeVar("T")

_SYNC_PAGE = 10_000  # payment rows, or token changes, read per sync
_STATUSES = ("active", "revoked", "suspended")  # a token status as one byte of a redeem answer


class StoreAnswers(StorePool):
    """Redeems and token checks, answered from memory when it can."""

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
