"""The internal site: metrics, health, and the service's side of tokens (look up with the
details, spend, read the ledger, revoke), pass verification, failed webhook events, and the
OpenAPI documents.

Every route of the site is here, in one Klein app; what a route reads and answers beyond a line
or two is in a module of its own: :mod:`~anonticket.web.spending` (spends and the ledger),
:mod:`~anonticket.web.revoking`, :mod:`~anonticket.web.webhooks` (failed events),
:mod:`~anonticket.web.health` (``/healthz``), :mod:`~anonticket.web.passes`.

It is never published as an onion.  It has no authentication of its own: config lets it listen
only on loopback or a unix socket, or as TLS with client certificates required (see
anonticket.web.mtls), so who can reach it is decided by where and how it listens.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import Final

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from anonticket.domain import ServiceToken
from anonticket.metrics import Metrics, Outcomes
from anonticket.store import Store
from anonticket.store.records import (
    KeyInUse,
    KeyReused,
    MonitorState,
    NotFound,
    Overloaded,
    SpendAnswer,
    TokenRecord,
    VersionMismatch,
)
from anonticket.web.errors import install_error_handlers
from anonticket.web.health import MonitorHealth, OnionHealth, health_answer
from anonticket.web.jsonio import ApiError, read_json_object, respond, respond_body
from anonticket.web.passes import Passes
from anonticket.web.public import passes_disabled, token_not_found
from anonticket.web.request import set_route
from anonticket.web.revoking import revocations_view, revoke_arguments, unrevoke_arguments
from anonticket.web.spending import (
    etag,
    idempotency_key,
    if_match,
    internal_token_view,
    ledger_view,
    page_query,
    spend_request,
    spend_response,
    version_mismatch,
)
from anonticket.web.storecalls import shielded, store_answer
from anonticket.web.webhooks import (
    EVENT_ID,
    event_not_found,
    failed_events_view,
    webhooks_disabled,
)

# The OpenAPI 3.1 documents of this site and of the public one (docs/api.md): package data,
# read once when the site is built and answered from memory.
# A revocation's store call, given the time: the record and whether it changed, or None.
Revocation = Callable[[int], Deferred[tuple[TokenRecord, bool] | None]]
OPENAPI_INTERNAL: Final = "openapi-internal.json"
OPENAPI_PUBLIC: Final = "openapi-public.json"


class InternalAPI:
    app = Klein()
    install_error_handlers(app, "internal")

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        clock: IReactorTime,
        min_confirmations: int,
        monitor: MonitorHealth | None = None,
        passes: Passes | None = None,
        onion: OnionHealth | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._min_confirmations = min_confirmations
        self._monitor = monitor
        self._onion = onion
        self._passes = passes
        self._openapi = files("anonticket.web").joinpath(OPENAPI_INTERNAL).read_bytes()
        self._openapi_public = files("anonticket.web").joinpath(OPENAPI_PUBLIC).read_bytes()

    @app.route("/api/v1/passes/verify", methods=["POST"])
    async def verify_pass(self, request: IRequest) -> bytes:
        set_route(request, "pass_verify")
        if self._passes is None:
            raise passes_disabled()
        return await self._passes.verify(request, read_json_object(request))

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        set_route(request, "openapi")
        return respond_body(request, self._openapi)

    @app.route("/api/v1/openapi-public.json", methods=["GET"])
    def openapi_public(self, request: IRequest) -> bytes:
        set_route(request, "openapi")
        return respond_body(request, self._openapi_public)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        set_route(request, "metrics")
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        body: bytes = generate_latest(self._metrics.registry)
        return body

    @app.route("/api/v1/token/<string:token>/revoke", methods=["POST"])
    async def revoke(self, request: IRequest, token: str) -> bytes:
        def prepare() -> Revocation:
            parsed = ServiceToken.parse(token)
            reason, score = revoke_arguments(read_json_object(request, allow_empty=True))
            return lambda now: self._store.revoke(parsed, reason, score, now)

        outcomes = self._metrics.revoke_outcomes
        return await self._revocation(
            request, "revoke", prepare, outcomes, ("revoked", "already_revoked")
        )

    @app.route("/api/v1/token/<string:token>/unrevoke", methods=["POST"])
    async def unrevoke(self, request: IRequest, token: str) -> bytes:
        def prepare() -> Revocation:
            parsed = ServiceToken.parse(token)
            reason, score = unrevoke_arguments(read_json_object(request))
            return lambda now: self._store.unrevoke(parsed, reason, score, now)

        outcomes = self._metrics.unrevoke_outcomes
        return await self._revocation(
            request, "unrevoke", prepare, outcomes, ("unrevoked", "not_revoked")
        )

    async def _revocation(
        self,
        request: IRequest,
        action: str,
        prepare: Callable[[], Revocation],
        outcomes: Outcomes,
        counted: tuple[str, str],
    ) -> bytes:
        """Revoke or un-revoke: *prepare* reads the request (a bad one counts as invalid) and
        gives the store call; the answer is the internal view with its ETag.  *action* names
        the route and the store operation; *counted* the outcomes of a change made and of a
        token that already was so."""
        set_route(request, action)
        try:
            change = prepare()
        except Exception:
            outcomes.count("invalid")
            raise
        now = int(self._clock.seconds())
        try:
            result = await store_answer(self._metrics, action, change(now))
        except ApiError:
            outcomes.count("error")
            raise
        if result is None:
            outcomes.count("not_found")
            raise token_not_found()
        record, newly = result
        outcomes.count(counted[0] if newly else counted[1])
        etag(request, record.version)  # as every answer with the internal view
        return respond(request, internal_token_view(record))

    @app.route("/api/v1/token/<string:token>/revocations", methods=["GET"])
    async def revocations(self, request: IRequest, token: str) -> bytes:
        set_route(request, "revocations")
        parsed = ServiceToken.parse(token)
        limit, before = page_query(request)
        past = await store_answer(
            self._metrics, "revocations", self._store.past_revocations(parsed, limit, before)
        )
        if past is None:
            raise token_not_found()
        return respond(request, revocations_view(past, limit))

    @app.route("/api/v1/token/<string:token>", methods=["GET"])
    async def token(self, request: IRequest, token: str) -> bytes:
        set_route(request, "internal_token")
        parsed = ServiceToken.parse(token)
        answer = self._store.token_answer(parsed)
        # The store's memory answers exactly (a change here evicts at once, one on another
        # node within a second, and the version lets a spend catch the rest).
        if isinstance(answer, Deferred):
            record = await store_answer(self._metrics, "token_status", answer)
        else:
            assert not isinstance(answer, Overloaded)  # only refused with admit=True
            record = answer
        if record is None:
            raise token_not_found()
        etag(request, record.version)
        return respond(request, internal_token_view(record))

    @app.route("/api/v1/token/<string:token>/ledger", methods=["GET"])
    async def ledger(self, request: IRequest, token: str) -> bytes:
        set_route(request, "ledger")
        parsed = ServiceToken.parse(token)
        limit, before = page_query(request)
        entries = await store_answer(
            self._metrics, "ledger", self._store.ledger(parsed, limit, before)
        )
        if entries is None:
            raise token_not_found()
        return respond(request, ledger_view(entries, limit))

    @app.route("/api/v1/token/<string:token>/spend", methods=["POST"])
    async def spend(self, request: IRequest, token: str) -> bytes:
        set_route(request, "spend")
        outcomes = self._metrics.spend_outcomes
        try:
            parsed = ServiceToken.parse(token)
            key = idempotency_key(request)
            expected = if_match(request)
            spend = spend_request(parsed, read_json_object(request), key, expected)
        except Exception:
            outcomes.count("invalid")
            raise
        now = int(self._clock.seconds())
        made = self._store.spend(spend, now)
        # Counted as the store answers, not as the client is answered: a spend made for a
        # client that hung up meanwhile is still a spend (and the made one is never cancelled).
        made.addBoth(self._count_spend)
        result = await store_answer(self._metrics, "spend", shielded(made))
        match result:
            case SpendAnswer():
                return spend_response(request, result, spend.amount)
            case VersionMismatch():
                return version_mismatch(request, result)
            case KeyReused():
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for another spend (token, amount or memo)",
                )
            case KeyInUse():
                raise ApiError(
                    409,
                    "idempotency_key_in_use",
                    "a spend with this Idempotency-Key is still being answered; retry shortly",
                    {"Retry-After": "1"},
                )
            case NotFound():
                raise token_not_found()
        raise AssertionError("unreachable")

    def _count_spend(self, result: object) -> object:
        outcomes = self._metrics.spend_outcomes
        match result:
            case SpendAnswer():
                outcomes.count("replayed" if result.replayed else result.outcome.name.lower())
            case VersionMismatch():
                outcomes.count("version_mismatch")
            case KeyReused():
                outcomes.count("idempotency_key_reused")
            case KeyInUse():
                outcomes.count("idempotency_key_in_use")
            case NotFound():
                outcomes.count("not_found")
            case _:
                outcomes.count("error")  # a failure: store_answer makes it the 503
        return result

    def _webhooks_enabled(self) -> None:
        if not self._store.events:
            raise webhooks_disabled()

    @app.route("/api/v1/webhooks/failed", methods=["GET"])
    async def failed_events(self, request: IRequest) -> bytes:
        set_route(request, "webhooks")
        self._webhooks_enabled()
        limit, after = page_query(request, cursor=b"after")
        events = await store_answer(
            self._metrics, "failed_events", self._store.failed_events(limit, after)
        )
        return respond(request, failed_events_view(events, limit))

    @app.route("/api/v1/webhooks/failed/retry", methods=["POST"])
    async def retry_all(self, request: IRequest) -> bytes:
        return await self._retry(request, None)

    @app.route("/api/v1/webhooks/failed/<string:event_id>/retry", methods=["POST"])
    async def retry_one(self, request: IRequest, event_id: str) -> bytes:
        return await self._retry(request, event_id)

    async def _retry(self, request: IRequest, event_id: str | None) -> bytes:
        set_route(request, "webhooks")
        self._webhooks_enabled()
        if event_id is not None and not EVENT_ID.fullmatch(event_id):
            raise event_not_found()
        now = int(self._clock.seconds())
        retried = await store_answer(
            self._metrics, "retry_failed_events", self._store.retry_failed_events(event_id, now)
        )
        if event_id is not None and retried == 0:  # unknown, or not failed (any more)
            raise event_not_found()
        if retried:
            self._store.event_written()  # deliver them now, not at the next look
        return respond(request, {"retried": retried})

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        set_route(request, "healthz")
        state: MonitorState | None = None
        try:
            state = await store_answer(self._metrics, "monitor_state", self._store.monitor_state())
        except ApiError:
            pass  # the answer says so: "store": "error"
        body, status = health_answer(
            state, self._monitor, self._onion, self._clock.seconds(), self._min_confirmations
        )
        return respond(request, body, status)
