"""A short negative cache for unknown PIDs (seed 000: about 500 ms).

Random-PID floods are the cheapest attack on the redeem route; repeating the same unknown PID
within the grace window is answered without a trip to the database thread.  The cache is
bounded (oldest entries go first), and the monitor removes a PID the moment it records a
payment to it, so a paid PID never waits out the window.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from anonticket.domain import PaymentId


class NegativeCache:
    def __init__(self, clock: IReactorTime, ttl: float = 0.5, max_entries: int = 10000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __contains__(self, pid: PaymentId) -> bool:
        expiry = self._expiry.get(pid.raw)
        if expiry is None:
            return False
        if expiry <= self._clock.seconds():
            del self._expiry[pid.raw]
            return False
        return True

    def add(self, pid: PaymentId) -> None:
        if self._ttl <= 0:
            return
        now = self._clock.seconds()
        self._expiry[pid.raw] = now + self._ttl
        self._expiry.move_to_end(pid.raw)
        # Every entry lives for the same ttl, so insertion order is expiry order: drop expired
        # entries from the front, then the oldest while over the bound.
        while self._expiry and (
            len(self._expiry) > self._max or next(iter(self._expiry.values())) <= now
        ):
            self._expiry.popitem(last=False)

    def discard(self, pid: PaymentId) -> None:
        self._expiry.pop(pid.raw, None)

    def __len__(self) -> int:
        return len(self._expiry)
