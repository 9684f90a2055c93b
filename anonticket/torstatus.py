"""What tor says about its bootstrap, for /healthz, the metrics and the onion's state.

Tor reports bootstrap progress as ``STATUS_CLIENT`` events and answers
``GETINFO status/bootstrap-phase`` with the same words (control-spec §4.1.10, §5.5.3):

    NOTICE BOOTSTRAP PROGRESS=50 TAG=loading_descriptors SUMMARY="Loading relay descriptors"
    WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting to a relay" WARNING="..." REASON=...

A tor stuck below 100 % cannot reach the Tor network (no network, a firewall, a wrong clock,
blocked relays): an onion service cannot be published then, which is a different fault from a
bootstrapped tor still uploading the descriptor.  Both a tor we launch and one we attach to are
watched the same way, so /healthz says which it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

__all__ = ["Bootstrap", "parse_bootstrap", "watch_bootstrap"]

# KEY=VALUE or KEY="quoted value" (tor escapes \" and \\ inside quotes).
_PAIR = re.compile(r'([A-Z_]+)=("(?:[^"\\]|\\.)*"|\S*)')
# Tor's own words go to /healthz and the log: keep them short and printable.
_MAX_TEXT = 200


@dataclass(frozen=True)
class Bootstrap:
    """One bootstrap report: *percent* done, tor's *summary* of the step, and the *problem*
    it reported at this step (``WARN BOOTSTRAP``), if any."""

    percent: int
    tag: str
    summary: str
    problem: str | None = None

    @property
    def done(self) -> bool:
        return self.percent >= 100


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    printable = "".join(c if c.isprintable() else "?" for c in value)
    return printable[:_MAX_TEXT]


def parse_bootstrap(text: str) -> Bootstrap | None:
    """A ``STATUS_CLIENT`` event body or a ``status/bootstrap-phase`` answer, or ``None`` when
    it is not a bootstrap report (other client status events share the event type)."""
    words = text.split(None, 2)
    if len(words) < 2 or words[1] != "BOOTSTRAP":
        return None
    pairs = {k: _unquote(v) for k, v in _PAIR.findall(words[2] if len(words) > 2 else "")}
    try:
        percent = int(pairs.get("PROGRESS", ""))
    except ValueError:
        return None
    if not 0 <= percent <= 100:
        return None
    problem = None
    if words[0] == "WARN":
        problem = pairs.get("WARNING") or "tor reported a bootstrap problem"
        if pairs.get("REASON"):
            problem = f"{problem} ({pairs['REASON']})"
    return Bootstrap(percent, pairs.get("TAG", ""), pairs.get("SUMMARY", ""), problem)


async def watch_bootstrap(
    protocol: Any, report: Callable[[Bootstrap], None], clock: IReactorTime, timeout: float
) -> None:
    """Subscribe *report* to tor's bootstrap events, then ask where it stands now.

    Subscribing first means no report between the answer and the subscription is lost; an
    older answer arriving after a newer event is harmless, the next event corrects it.
    """

    def event(text: str) -> None:
        parsed = parse_bootstrap(text)
        if parsed is not None:
            report(parsed)

    await defer.maybeDeferred(protocol.add_event_listener, "STATUS_CLIENT", event).addTimeout(
        timeout, clock
    )
    answer = await defer.maybeDeferred(protocol.get_info, "status/bootstrap-phase").addTimeout(
        timeout, clock
    )
    if isinstance(answer, dict):
        phase = answer.get("status/bootstrap-phase")
        if isinstance(phase, str):
            event(phase)
