"""How a handler waits for the store: :func:`store_answer` turns a store failure into the 503
(the one place it happens), :func:`shielded` keeps a client that hangs up from cancelling work
whose outcome must still be seen.

The rule for asynchronous code is written in :mod:`anonticket.web.public`, which holds the two
hot-path handlers it excepts.
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from anonticket.metrics import Metrics
from anonticket.web import HTTP_LOG_NAMESPACE
from anonticket.web.errors import PROCESS_LOG, type_name
from anonticket.web.jsonio import ApiError

log = Logger(namespace=HTTP_LOG_NAMESPACE)

T = TypeVar("T")


def shielded(d: Deferred[T]) -> Deferred[T]:
    """A Deferred with ``d``'s result whose cancellation (the client went away) leaves ``d`` to
    finish: for work whose outcome must be seen whoever waits for it."""
    outer: Deferred[T] = Deferred()

    def forward(result: object) -> object:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)  # type: ignore[arg-type]
        return None  # ``d`` itself ends here: its failure is outer's to report

    d.addBoth(forward)
    return outer


def store_answer(metrics: Metrics, operation: str, d: Deferred[T]) -> Deferred[T]:
    """``d`` (a store operation's result) with a failure turned into one log line, a metric and
    ApiError 503 for the client: the one place a store failure becomes an HTTP answer.

    A Deferred, not a coroutine, so that the hot paths can chain callbacks on it; every other
    handler awaits it (the rule: :mod:`anonticket.web.public`)."""

    def failed(failure: Failure) -> Failure:
        if failure.check(CancelledError):
            return failure  # the client went away; nothing failed
        metrics.store_errors.labels(operation).inc()
        # Every request fails while the store is down: the metric counts them all, the log
        # says so a few times a minute.
        error_type = type_name(failure)
        PROCESS_LOG.emit(
            log,
            LogLevel.error,
            ("store", operation, error_type),
            "store {operation} failed: {error_type}",
            operation=operation,
            error_type=error_type,
        )
        return Failure(
            ApiError(
                503,
                "unavailable",
                "service temporarily unavailable, retry later",
                {"Retry-After": "5"},
            )
        )

    return d.addErrback(failed)
