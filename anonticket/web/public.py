"""The public site (published as the onion service): redeem a PID, look up a token, and (with
``--pass-price``) the pass issuer's directory and issuance.

Anything else is a JSON 404; revocation, spends and pass verification are not here at all.

The rule for asynchronous code (README, "Development"): ``async def`` everywhere, plain
Deferred callbacks only on the measured hot paths.  Those are here: :meth:`PublicAPI.redeem`
and :meth:`PublicAPI.token` are plain functions that return the bytes at once when the store
answers from memory, and otherwise chain callbacks on the store's Deferred through
:func:`~anonticket.web.storecalls.store_answer` (no coroutine, no Deferred, no exception where
none is needed: docs/performance.md has the figures).  Every other handler is ``async def``
and awaits ``store_answer``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from anonticket.domain import PaymentId, ServiceToken
from anonticket.metrics import Metrics, Outcomes
from anonticket.store import Store
from anonticket.store.records import (
    BelowMinimum,
    NotFound,
    Overloaded,
    Pending,
    Redeemed,
    RedeemResult,
    TokenRecord,
)

if TYPE_CHECKING:  # passes.py imports this module
    from anonticket.web.passes import Passes
from anonticket.web.errors import install_error_handlers
from anonticket.web.jsonio import (
    ApiError,
    json_body,
    read_json_object,
    respond,
    respond_body,
    respond_error,
)
from anonticket.web.request import set_route
from anonticket.web.storecalls import store_answer


# Functions, not shared instances: raising one exception object again and again chains every
# earlier traceback onto it, and with it every earlier request's frames (a leak per 404).
def payment_not_found() -> ApiError:
    return ApiError(404, "payment_not_found", "payment not found")


def token_not_found() -> ApiError:
    return ApiError(404, "token_not_found", "token not found")


def passes_disabled() -> ApiError:
    return ApiError(404, "passes_disabled", "this issuer sells no passes (--pass-price unset)")


def below_minimum() -> ApiError:
    return ApiError(
        404,
        "below_minimum",
        "every payment to this payment id was below the minimum amount; it cannot be redeemed",
    )


def overloaded(request: IRequest, outcomes: Outcomes) -> bytes:
    """Refused at admission: answered at once, so the requests already waiting keep their
    latency, and the client is told when to come back."""
    outcomes.count("overloaded")
    request.setHeader(b"retry-after", b"1")
    return respond_error(
        request, ApiError(503, "overloaded", "too many requests at once; retry in a second")
    )


def rfc3339(timestamp: int | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_view(record: TokenRecord) -> dict[str, Any]:
    return {
        "status": record.status,
        "balance": record.balance,
        "issued_at": rfc3339(record.issued_at),
        "revoked_at": rfc3339(record.revoked_at),
    }


class PublicAPI:
    app = Klein()
    install_error_handlers(app, "public")

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        clock: IReactorTime,
        min_confirmations: int,
        passes: Passes | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._min_confirmations = min_confirmations
        self._passes = passes

    @app.route("/.well-known/private-token-issuer-directory", methods=["GET"])
    def pass_directory(self, request: IRequest) -> bytes:
        set_route(request, "pass_directory")
        if self._passes is None:
            raise passes_disabled()
        return self._passes.directory(request)

    @app.route("/api/v1/passes", methods=["POST"])
    async def pass_batch(self, request: IRequest) -> bytes:
        set_route(request, "pass_issuance")
        if self._passes is None:
            raise passes_disabled()
        return await self._passes.batch(request, read_json_object(request))

    @app.route("/api/v1/passes/token-request", methods=["POST"])
    async def pass_token_request(self, request: IRequest) -> bytes:
        set_route(request, "pass_issuance")
        if self._passes is None:
            raise passes_disabled()
        return await self._passes.token_request(request)

    @app.route("/api/v1/redeem", methods=["POST"])
    def redeem(self, request: IRequest) -> bytes | Deferred[bytes]:
        # A plain function, not a coroutine: what the store answers from memory (an unknown
        # PID, a settled one) is written without a Deferred, a coroutine or an exception.
        set_route(request, "redeem")
        try:
            body = read_json_object(request)
            pid = PaymentId.parse(body.get("pid"))
        except Exception:
            self._metrics.redeem_outcomes.count("invalid")
            raise
        answer = self._store.redeem_answer(pid, self._now(), admit=True)
        if isinstance(answer, Overloaded):
            return overloaded(request, self._metrics.redeem_outcomes)
        if isinstance(answer, Deferred):
            # Callbacks, not a coroutine: on this path for every first claim.
            return store_answer(self._metrics, "redeem", answer).addCallbacks(
                self._redeem_response,
                self._store_failed,
                callbackArgs=(request,),
                errbackArgs=(self._metrics.redeem_outcomes,),
            )
        return self._redeem_response(answer, request)

    @staticmethod
    def _store_failed(failure: Failure, outcomes: Outcomes) -> Failure:
        if failure.check(ApiError):
            outcomes.count("error")
        return failure

    def _redeem_response(self, result: RedeemResult, request: IRequest) -> bytes:
        outcomes = self._metrics.redeem_outcomes
        match result:
            case Redeemed(
                token=token, balance=balance, first_claim=first, token_status=token_status
            ):
                status = "success" if first else "already_claimed"
                outcomes.count(status)
                # token_status: a payment to a revoked or suspended token is recorded, but the
                # client must not take the token for a working one.
                return respond(
                    request,
                    {
                        "status": status,
                        "service_token": token.hex,
                        "balance": balance,
                        "token_status": token_status,
                    },
                )
            case Pending(height=height, wallet_height=wallet_height):
                outcomes.count("pending")
                confirmations = 0
                if height > 0 and wallet_height is not None:
                    # The wallet's own count: a transfer at height h has (wallet height - h);
                    # still pending, so below N (the monitor waits for a second poll to agree).
                    confirmations = min(max(0, wallet_height - height), self._min_confirmations - 1)
                return respond(
                    request,
                    {
                        "status": "pending",
                        "confirmations": confirmations,
                        "required": self._min_confirmations,
                    },
                    202,
                )
            case BelowMinimum():
                outcomes.count("below_minimum")
                return respond_error(request, below_minimum())
            case NotFound():
                outcomes.count("not_found")
                return respond_error(request, payment_not_found())
        raise AssertionError("unreachable")

    @app.route("/api/v1/token/<string:token>", methods=["GET"])
    def token(self, request: IRequest, token: str) -> bytes | Deferred[bytes]:
        # A plain function, not a coroutine: a token checked recently is answered from the
        # store's memory without a Deferred or a trip to the database thread.
        set_route(request, "token")
        try:
            parsed = ServiceToken.parse(token)
        except Exception:
            self._metrics.lookup_outcomes.count("invalid")
            raise
        answer = self._store.token_answer(parsed, admit=True)
        if isinstance(answer, Overloaded):
            return overloaded(request, self._metrics.lookup_outcomes)
        if isinstance(answer, Deferred):
            # Callbacks, not a coroutine: the same path for a cached and a stored record.
            return store_answer(self._metrics, "token_status", answer).addCallbacks(
                self._token_response,
                self._store_failed,
                callbackArgs=(request,),
                errbackArgs=(self._metrics.lookup_outcomes,),
            )
        return self._token_response(answer, request)

    def _token_response(self, record: TokenRecord | None, request: IRequest) -> bytes:
        lookups = self._metrics.lookup_outcomes
        if record is None:
            lookups.count("not_found")
            return respond_error(request, token_not_found())
        view = token_view(record)
        lookups.count(view["status"])
        return respond_body(request, json_body(view))

    def _now(self) -> int:
        return int(self._clock.seconds())
