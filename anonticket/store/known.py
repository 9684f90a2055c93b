"""An in-memory Bloom filter of the PID tags that have payments, so that a redeem of an unknown
PID — the cheapest flood an attacker can send — is answered 404 without a trip to the database
thread.

A Bloom filter never forgets an entry (no false "unknown"); a false "maybe known" (under 1 %)
only costs the database query it would have cost anyway.  The store adds every tag it records
and, for nodes whose monitor runs elsewhere, reads new payment rows every second and rebuilds
the filter from the whole table now and then (so it grows with the table and cannot drift).
The tags are keyed BLAKE2b output, uniformly random, so they are used as the hash directly.
"""

from __future__ import annotations

from typing import Final

BITS_PER_ENTRY: Final = 10  # with K hashes: about 0.8 % false positives at capacity
K: Final = 7
MIN_CAPACITY: Final = 100_000


class KnownTags:
    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self.capacity = max(capacity, MIN_CAPACITY)
        self._m = self.capacity * BITS_PER_ENTRY
        self._bits = bytearray((self._m + 7) // 8)
        self.count = 0

    def _positions(self, tag: bytes) -> list[int]:
        h1 = int.from_bytes(tag[:8], "little")
        h2 = int.from_bytes(tag[8:16], "little") | 1
        m = self._m
        return [(h1 + i * h2) % m for i in range(K)]

    def add(self, tag: bytes) -> None:
        """Add a tag; ``count`` grows only when it sets a new bit, so the same tag added again
        (every poll re-reads its window, every sync its overlap) never fills the filter."""
        bits = self._bits
        new = False
        for p in self._positions(tag):
            mask = 1 << (p & 7)
            if not bits[p >> 3] & mask:
                bits[p >> 3] |= mask
                new = True
        if new:
            self.count += 1

    def __contains__(self, tag: object) -> bool:
        if not isinstance(tag, bytes):
            return False
        bits = self._bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._positions(tag))

    @property
    def full(self) -> bool:
        """Past capacity the false-positive rate climbs: time to rebuild bigger."""
        return self.count > self.capacity
