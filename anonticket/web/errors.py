"""Every failure of a route as one JSON answer (Klein's error handlers), and the bounded log
lines for failures a client can cause (:mod:`anonticket.web.ratelog`)."""

from __future__ import annotations

import time
from typing import Final

from klein import Klein
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from anonticket.domain import DomainError
from anonticket.web import HTTP_LOG_NAMESPACE
from anonticket.web.jsonio import ApiError, respond_error
from anonticket.web.ratelog import LogBudget

log = Logger(namespace=HTTP_LOG_NAMESPACE)


def install_error_handlers(app: Klein, site: str) -> None:
    """Map every failure to one JSON answer.  Order matters: Klein tries handlers in order, and a
    catch-all registered first would turn 404 and 405 into 500."""

    @app.handle_errors(HTTPException)
    def http_error(self: object, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, HTTPException)
        if isinstance(e, MethodNotAllowed):
            allowed = ", ".join(sorted(e.valid_methods or ()))
            return respond_error(
                request,
                ApiError(405, "method_not_allowed", "method not allowed", {"Allow": allowed}),
            )
        if e.code == 404 or e.code is None or 300 <= e.code < 400:
            # Werkzeug redirects "/x/" to "/x"; we have no such routes to redirect to.
            return respond_error(request, ApiError(404, "not_found", "not found"))
        return respond_error(request, ApiError(e.code, "http_error", e.name.lower()))

    @app.handle_errors(ApiError)
    def api_error(self: object, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, ApiError)
        return respond_error(request, e)

    @app.handle_errors(DomainError)
    def domain_error(self: object, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, DomainError)
        return respond_error(request, ApiError(400, e.code, e.message))

    @app.handle_errors(Exception)
    def unexpected(self: object, request: IRequest, failure: Failure) -> bytes:
        # Log the type and where it happened, not the value: a repr could carry request data.
        # A client that can trigger it can trigger it a million times: bounded.
        error_type = type_name(failure)
        log_budget(request).emit(
            log,
            LogLevel.error,
            ("unexpected", site, error_type),
            "{site} site: unexpected {error_type} answering a request",
            site=site,
            error_type=error_type,
        )
        return respond_error(request, ApiError(500, "internal_error", "internal error"))


def type_name(failure: Failure) -> str:
    return failure.type.__name__ if failure.type else "error"


# For log lines raised where no site is at hand (a store failure): a monotonic clock is enough
# to space out log lines, and nothing a test or the daemon decides depends on it.
PROCESS_LOG: Final = LogBudget(time.monotonic)


def log_budget(request: object) -> LogBudget:
    """The request's site's budget, or the process's for a request of no such site."""
    budget = getattr(getattr(request, "site", None), "log_budget", None)
    return budget if isinstance(budget, LogBudget) else PROCESS_LOG
