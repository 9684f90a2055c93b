"""Log formats for shippers and journald (``--log-format``), and the noise they leave out.

``text`` is twistd's own observer, untouched (its ``--logfile``, rotation and ``--syslog`` keep
working).  ``json`` and ``journal`` write one line per event where twistd would have written
(standard output with ``--nodaemon``, where a container runtime, a log shipper or systemd's
journal reads it; else twistd's ``--logfile``):

- ``json``: ``{"time", "level", "namespace", "message", ...the event's own fields}``; a
  failure adds its ``traceback`` as a string, so one event is always one line.
- ``journal``: twistd's text without the time (journald stamps each entry itself), each line
  prefixed ``<N>`` with the syslog priority of the event's level, which journald reads as the
  entry's priority (``SyslogLevelPrefix=yes``, its default).

Both keep info and above (debug lines are for a developer's text log), and drop the lines
that only narrate Twisted's plumbing: factories starting and stopping (one pair per wallet or
tor connection) and ports opening and closing, which the sites' own "listening on" and
"stopped" lines already say.

The daemon logs no PID, token, txid, amount or client address (tests check every log line);
the fields written here are the ones its log calls carry, nothing more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    PredicateResult,
    formatEvent,
)
from zope.interface import provider

__all__ = ["PRIORITIES", "is_noise", "journal_line", "json_line", "observer"]

# Syslog priorities (RFC 5424) for Twisted's levels: what journald's PRIORITY field holds.
PRIORITIES: Mapping[Any, int] = {  # LogLevel constants (constantly has no type hints)
    LogLevel.critical: 2,
    LogLevel.error: 3,
    LogLevel.warn: 4,
    LogLevel.info: 6,
    LogLevel.debug: 7,
}

_FACTORY_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})
# twisted.internet's ports log these through the legacy log, as finished text.
_PORT_NOISE = re.compile(r"^(\S+ starting on \S+|\((TCP|UNIX|SSL) Port \S+ Closed\))$")
# A field's value written as text (an object's repr) is cut here: a log line stays a line.
_MAX_FIELD = 500


def is_noise(event: Mapping[str, Any]) -> bool:
    """A Twisted plumbing line an operator never acts on (see the module docstring)."""
    if event.get("log_format") in _FACTORY_FORMATS:
        return True
    message = event.get("message")
    if event.get("log_namespace") == "log_legacy" and isinstance(message, tuple) and message:
        return bool(_PORT_NOISE.match(str(message[0])))
    return False


def _level(event: Mapping[str, Any]) -> Any:
    """The event's LogLevel constant (info for a legacy event without one)."""
    level = event.get("log_level")
    return level if level in PRIORITIES else LogLevel.info


def _field(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    text = repr(value)
    return text if len(text) <= _MAX_FIELD else text[:_MAX_FIELD] + "..."


def json_line(event: Mapping[str, Any]) -> str:
    """One event as one JSON object (no newline)."""
    when = event.get("log_time")
    stamp = datetime.fromtimestamp(when if isinstance(when, float | int) else 0, UTC)
    record: dict[str, object] = {
        "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": _level(event).name,
        "namespace": str(event.get("log_namespace", "-")),
        "message": formatEvent(dict(event)),
    }
    for key, value in event.items():
        # log_* are the logger's own keys; the rest are the legacy log's.
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = _field(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})


def journal_line(event: Mapping[str, Any]) -> str:
    """One event as ``<N>[namespace] message`` lines, each with the priority prefix."""
    prefix = f"<{PRIORITIES[_level(event)]}>"
    namespace = str(event.get("log_namespace", "-"))
    text = formatEvent(dict(event))
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
    return "\n".join(f"{prefix}[{namespace}] {line}" for line in text.split("\n"))


def observer(fmt: str, out: IO[str]) -> ILogObserver | None:
    """The observer for ``--log-format`` *fmt* writing to *out*, or None for ``text`` (left
    to twistd)."""
    formats: dict[str, Callable[[Mapping[str, Any]], str]] = {
        "json": json_line,
        "journal": journal_line,
    }
    render = formats.get(fmt)
    if render is None:
        return None

    @provider(ILogObserver)
    def write(event: Mapping[str, Any]) -> None:
        try:
            line = render(event)
        except Exception as e:  # a log call must never take the daemon down
            failed = {"log_level": LogLevel.error, "log_format": "unwritable log event ({kind})"}
            line = render({**failed, "kind": type(e).__name__})
        out.write(line + "\n")
        out.flush()

    @provider(ILogFilterPredicate)
    def keep(event: Mapping[str, Any]) -> Any:  # a PredicateResult constant
        if _level(event) == LogLevel.debug or is_noise(event):
            return PredicateResult.no
        return PredicateResult.maybe

    return FilteringLogObserver(write, [keep])
