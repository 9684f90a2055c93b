"""What the internal site changes on a token: revoke and un-revoke, spends and the ledger,
and the passes a spend buys (used once)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from anonticket.domain import ServiceToken
from anonticket.store import queries, revocations, spending
from anonticket.store.pool import StorePool
from anonticket.store.records import (
    KeyInUse,
    KeyReused,
    LedgerEntry,
    NotFound,
    SpendAnswer,
    SpendRequest,
    SpendResult,
    TokenRecord,
    VersionMismatch,
)


class StoreTokens(StorePool):
    """A token's revocations and spends."""

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
