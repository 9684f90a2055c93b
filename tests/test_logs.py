"""--log-format: one JSON object per line, or journald priority prefixes; no plumbing noise."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from anonticket import logs
from anonticket.tap import log_observer


def capture(fmt: str) -> tuple[LogPublisher, io.StringIO]:
    out = io.StringIO()
    observer = logs.observer(fmt, out)
    assert observer is not None
    publisher = LogPublisher(observer)
    return publisher, out


def test_json_lines_carry_time_level_namespace_message_and_fields() -> None:
    publisher, out = capture("json")
    log = Logger(namespace="anonticket.monitor", observer=publisher)
    log.warn("wallet poll failed ({kind}): {error}", kind="timeout", error="no answer\nin 10 s")
    log.info("object field {thing}", thing=object())
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the newline in a field stays inside its JSON string
    first = json.loads(lines[0])
    assert first["level"] == "warn" and first["namespace"] == "anonticket.monitor"
    assert first["message"] == "wallet poll failed (timeout): no answer\nin 10 s"
    assert first["kind"] == "timeout" and first["error"] == "no answer\nin 10 s"
    assert first["time"].endswith("Z") and first["time"][10] == "T"
    assert not any(key.startswith("log_") for key in first)
    assert json.loads(lines[1])["thing"].startswith("<object object at")


def test_a_failure_is_one_json_line_with_its_traceback() -> None:
    publisher, out = capture("json")
    log = Logger(namespace="anonticket.store", observer=publisher)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("store call failed", Failure())
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "critical" and record["message"] == "store call failed"
    assert "ZeroDivisionError" in record["traceback"]


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (LogLevel.critical, 2),
        (LogLevel.error, 3),
        (LogLevel.warn, 4),
        (LogLevel.info, 6),
    ],
)
def test_journal_lines_carry_the_syslog_priority_of_their_level(
    level: LogLevel, priority: int
) -> None:
    publisher, out = capture("journal")
    Logger(namespace="anonticket.onion", observer=publisher).emit(level, "two\nlines")
    assert (
        out.getvalue()
        == f"<{priority}>[anonticket.onion] two\n<{priority}>[anonticket.onion] lines\n"
    )


def test_debug_lines_are_left_out() -> None:
    for fmt in ("json", "journal"):
        publisher, out = capture(fmt)
        Logger(namespace="anonticket.wallet", observer=publisher).debug("a retry")
        assert out.getvalue() == ""


def test_factory_and_port_noise_is_left_out_and_the_rest_kept() -> None:
    for fmt in ("json", "journal"):
        out = io.StringIO()
        observer = logs.observer(fmt, out)
        assert observer is not None
        globalLogPublisher.addObserver(observer)
        try:
            Logger(namespace="twisted.web.client._HTTP11ClientFactory").info(
                "Starting factory {factory!r}", factory=object()
            )
            Logger(namespace="x").info("Stopping factory {factory!r}", factory=object())
            legacy_log.msg("PrivacySite starting on 9180")
            legacy_log.msg("(TCP Port 9180 Closed)")
            legacy_log.msg("(UNIX Port /run/anonticket/public.sock Closed)")
            Logger(namespace="anonticket.web.service").info("internal site stopped")
            legacy_log.msg("Spawning tor process with DataDirectory /x")
        finally:
            globalLogPublisher.removeObserver(observer)
        text = out.getvalue()
        assert "factory" not in text and "starting on" not in text and "Closed" not in text
        assert "internal site stopped" in text and "Spawning tor process" in text


def test_an_event_that_cannot_be_formatted_is_still_one_json_line() -> None:
    publisher, out = capture("json")
    # A format that cannot be applied: formatEvent reports it; the line is still JSON.
    Logger(namespace="x", observer=publisher).info("{missing.attribute}")
    record = json.loads(out.getvalue())
    assert record["namespace"] == "x" and "Unable to format event" in record["message"]


def test_text_is_left_to_twistd_and_json_goes_where_twistd_would_write(tmp_path) -> None:
    assert log_observer("text", {"nodaemon": True}) is None
    assert log_observer("json", {"nodaemon": True, "logfile": None}) is not None
    logfile = tmp_path / "anonticket.log"
    observer = log_observer("json", {"nodaemon": False, "logfile": str(logfile)})
    assert observer is not None
    Logger(namespace="anonticket.tap", observer=observer).info("to the file")
    assert json.loads(logfile.read_text())["message"] == "to the file"
    with pytest.raises(SystemExit, match="--log-format journal: not with twistd's --syslog"):
        log_observer("journal", {"syslog": True})
