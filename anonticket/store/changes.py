"""Which numbered rows a node has already applied, when it re-reads a stream of them.

Payment rows (``payments.id``) and token changes (``tokens.changed_seq``) are read by number:
"everything above the highest number I have seen".  On PostgreSQL a number is taken when the
row is written and becomes visible when its transaction commits, so a lower number can appear
after a higher one has been read.  A reader therefore re-reads a short overlap below its
highest number and must tell the rows it has applied from the ones that committed late.
"""

from __future__ import annotations

from typing import Final, TypeVar

T = TypeVar("T")

OVERLAP: Final = 100


class NumberedRows:
    def __init__(self, upto: int = 0, overlap: int = OVERLAP) -> None:
        self.upto = upto  # the highest number applied
        self._overlap = overlap
        self._recent: set[int] = set()  # numbers applied within the overlap below ``upto``

    @property
    def since(self) -> int:
        """Read the rows numbered above this."""
        return max(0, self.upto - self._overlap)

    def fresh(self, rows: list[tuple[int, T]]) -> list[T]:
        """What the rows (number, what) carry, read in number order, not applied before; from
        now on they count as applied."""
        upto, recent = self.upto, self._recent
        new = [tag for number, tag in rows if number > upto or number not in recent]
        if rows:
            upto = max(upto, rows[-1][0])
        floor = upto - self._overlap
        self._recent = {n for n in recent if n > floor}
        self._recent.update(number for number, _ in rows if number > floor)
        self.upto = upto
        return new
