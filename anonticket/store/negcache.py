"""A short negative cache for unknown PIDs (seed 000: about 500 ms), keyed by PID *tag*.

Random-PID floods are the cheapest attack on the redeem route; the known-PID filter answers
most of them, and this cache answers the repeats of the few it lets through by mistake, within
the grace window, without a trip to the database thread.  It is bounded (oldest entries go
first), and the store removes a tag the moment a payment row for it is recorded - here, or read
from another node's monitor by the sync - so a paid PID never waits out the window.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


class NegativeCache:
    def __init__(self, clock: IReactorTime, ttl: float = 0.5, max_entries: int = 10000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __contains__(self, tag: bytes) -> bool:
        expiry = self._expiry.get(tag)
        if expiry is None:
            return False
        if expiry <= self._clock.seconds():
            del self._expiry[tag]
            return False
        return True

    def add(self, tag: bytes) -> None:
        if self._ttl <= 0:
            return
        now = self._clock.seconds()
        self._expiry[tag] = now + self._ttl
        self._expiry.move_to_end(tag)
        # Every entry lives for the same ttl, so insertion order is expiry order: drop expired
        # entries from the front, then the oldest while over the bound.
        while self._expiry and (
            len(self._expiry) > self._max or next(iter(self._expiry.values())) <= now
        ):
            self._expiry.popitem(last=False)

    def discard(self, tag: bytes) -> None:
        self._expiry.pop(tag, None)

    def __len__(self) -> int:
        return len(self._expiry)
