"""Answers the public site can give again without the database thread.

The two public calls are mostly repeats: a service checks the same tokens on every use
(``GET /api/v1/token/{token}``), and a client asks for its token again (a redeem of a claimed
PID).  The trip to the pool thread costs more than the rest of such a request, and while the
reactor thread is busy the pool thread waits for the GIL on every SQLite call.  The store keeps
two of these caches, keyed by *tags* (never a PID or a token):

* ``token_answers``: per token tag, its record (:meth:`Store.token_answer`).  A top-up, revoke,
  reversal or restoration through this process evicts the token when its transaction commits;
  every one on any node stamps the token row with the next ``changed_seq``, and the store's sync
  loop evicts the tokens stamped since its last read.
* ``redeem_answers``: per PID tag, the first txid, token status and balance of a PID whose
  every payment is claimed (or never redeemable): its redeem answer changes only with a new
  payment to it or a change of its token.  Recording one here evicts the PID at once; the sync
  loop evicts the PIDs of payment rows other nodes' monitors added and of changed tokens.

For both: an answer read from the database is stored only if nothing was evicted while it was
read (a *ticket* taken before the read), so a read that raced a change never refills the cache
with the old state; and while the sync loop cannot read the changes (database unreachable) the
cache stops answering :data:`FRESH_FOR` seconds after the last sync that did, so no answer is
ever older than that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

V = TypeVar("V")

# Seconds the cache keeps answering after the last successful sync: three sync intervals.
FRESH_FOR: Final = 3.0
# Entries of each kind (--answer-cache): ~290 bytes a token answer, ~180 a redeem answer.
DEFAULT_SIZE: Final = 20_000


class AnswerCache(Generic[V]):
    def __init__(self, clock: IReactorTime, size: int, fresh_for: float = FRESH_FOR) -> None:
        self._clock = clock
        self._size = size
        self._fresh_for = fresh_for
        self._entries: dict[bytes, V] = {}
        self._generation = 0
        self._fresh_until = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tag: bytes) -> V | None:
        """The stored value for ``tag`` if there is one and the cache is in step."""
        if self._clock.seconds() > self._fresh_until:
            return None
        return self._entries.get(tag)

    def ticket(self) -> int:
        """Take before reading an answer from the database; hand to :meth:`put` with it."""
        return self._generation

    def put(self, tag: bytes, value: V, ticket: int) -> None:
        if ticket != self._generation or self._size <= 0:
            return  # something changed while this was read: the answer may be stale already
        entries = self._entries
        if tag not in entries and len(entries) >= self._size:
            # Oldest first (dicts keep insertion order): cheap, and a hot token comes back on
            # its next check.
            del entries[next(iter(entries))]
        entries[tag] = value

    def invalidate(self, tags: Iterable[bytes]) -> None:
        self._generation += 1
        for tag in tags:
            self._entries.pop(tag, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def synced(self, as_of: float) -> None:
        """Every change committed before ``as_of`` (clock seconds) has been applied."""
        self._fresh_until = max(self._fresh_until, as_of + self._fresh_for)

    def unsynced(self) -> None:
        """Stop answering until the next :meth:`synced`."""
        self._fresh_until = float("-inf")
