"""Log lines a client can cause, bounded: a flood of them writes a few lines, not megabytes.

Anything a request can trigger over and over (an unexpected error, a store failure, a site at
its connection cap, running out of descriptors) goes through a :class:`LogBudget`: per kind of
line, at most ``burst`` lines in each ``period``; the lines held back are counted and the count
is reported with the next line of that kind that is written.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final

from twisted.logger import Logger, LogLevel

BURST: Final = 5
PERIOD: Final = 60.0
# Kinds are few and fixed (format strings, error types, site names); this only guards against
# a key that accidentally carries request data.
MAX_KINDS: Final = 64
_OVERFLOW: Final = "(other)"


class LogBudget:
    """At most ``burst`` lines per kind in each ``period`` seconds of ``clock``."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        burst: int = BURST,
        period: float = PERIOD,
        max_kinds: int = MAX_KINDS,
    ) -> None:
        self._clock = clock
        self._burst = burst
        self._period = period
        self._max_kinds = max_kinds
        # kind -> [window start, lines written in the window, lines held back since last one]
        self._kinds: dict[Hashable, list[float]] = {}

    def allow(self, kind: Hashable) -> int | None:
        """None if a line of this kind must not be written now; otherwise how many were held
        back since the last one written (usually 0)."""
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= self._max_kinds:
                self._forget_quiet(now)
                if len(self._kinds) >= self._max_kinds:
                    kind = _OVERFLOW
            state = self._kinds.setdefault(kind, [now, 0, 0])
        if now - state[0] >= self._period:
            state[0], state[1] = now, 0
        if state[1] >= self._burst:
            state[2] += 1
            return None
        state[1] += 1
        held, state[2] = int(state[2]), 0
        return held

    def emit(
        self, logger: Logger, level: LogLevel, kind: Hashable, fmt: str, **fields: Any
    ) -> bool:
        """Write ``fmt`` at ``level`` if the budget of ``kind`` allows; True if written."""
        held = self.allow(kind)
        if held is None:
            return False
        if held:
            fmt += " ({held_back} more like this not logged)"
        logger.emit(level, fmt, held_back=held, **fields)
        return True

    def _forget_quiet(self, now: float) -> None:
        for kind, state in list(self._kinds.items()):
            if now - state[0] >= self._period and not state[2]:
                del self._kinds[kind]
