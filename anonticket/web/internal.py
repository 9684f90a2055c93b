"""The internal site: metrics, health, and the service's side of tokens (look up with the
details, spend, read the ledger, revoke).

It is never published as an onion.  It has no authentication of its own: config lets it listen
only on loopback or a unix socket, or as TLS with client certificates required (see
anonticket.web.mtls), so who can reach it is decided by where and how it listens.
"""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any, Final, Protocol

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from anonticket.domain import ServiceToken
from anonticket.metrics import Metrics
from anonticket.store import Store
from anonticket.store.records import (
    KeyInUse,
    KeyReused,
    MonitorState,
    NotFound,
    Overloaded,
    SpendAnswer,
    VersionMismatch,
)
from anonticket.web.errors import install_error_handlers
from anonticket.web.jsonio import ApiError, read_json_object, respond, respond_body
from anonticket.web.passes import Passes
from anonticket.web.public import passes_disabled, rfc3339, token_not_found
from anonticket.web.request import set_route
from anonticket.web.spending import (
    etag,
    idempotency_key,
    if_match,
    internal_token_view,
    ledger_view,
    page_query,
    spend_request,
    spend_response,
    text_field,
    version_mismatch,
)
from anonticket.web.storecalls import shielded, store_answer

MAX_REASON_LENGTH = 1000
# The ids outbox.py makes; anything else cannot name an event and never reaches the database
# (PostgreSQL refuses a NUL byte in text: a 503 and a store error for any client's typo).
EVENT_ID = re.compile(r"msg_[0-9a-f]{32}")
SMALLINT = (-32768, 32767)
# The OpenAPI 3.1 documents of this site and of the public one (docs/api.md): package data,
# read once when the site is built and answered from memory.
OPENAPI_INTERNAL: Final = "openapi-internal.json"
OPENAPI_PUBLIC: Final = "openapi-public.json"


class MonitorHealth(Protocol):
    """What /healthz needs from the wallet monitor."""

    @property
    def poll_interval(self) -> float: ...

    def last_success(self) -> float | None:
        """Reactor time of the last poll that completed, or None before the first."""

    def height_note(self) -> str | None:
        """Why the last poll did not take the wallet's height as reported, if it did not."""

    def trusted_height(self) -> int | None:
        """The height the last successful poll acted on, if any."""


class OnionHealth(Protocol):
    """What /healthz needs from the onion service."""

    def health(self) -> dict[str, Any]:
        """``state``, ``bootstrap_percent``, ``bootstrap_summary`` and ``problem``."""


def _onion_problem(tor: dict[str, Any]) -> str | None:
    """Why the onion is not reachable, in words an operator acts on; None when published."""
    state = tor["state"]
    if state == "published":
        return None
    if state == "bootstrapping":
        percent = tor["bootstrap_percent"]
        text = f"tor is bootstrapping ({percent} %): it cannot reach the Tor network yet"
    elif state == "publishing":
        text = "the onion service is waiting for tor to upload its descriptor"
    elif state == "failed":
        text = "the onion service failed and is being retried (see the log)"
    else:
        text = "tor is starting"
    if tor.get("problem"):
        text += f"; tor says: {tor['problem']}"
    return text


def _revoke_arguments(body: dict[str, Any]) -> tuple[str | None, int | None]:
    reason = body.get("reason")
    if not text_field(reason, MAX_REASON_LENGTH):
        raise ApiError(
            400,
            "invalid_request",
            f"reason must be a string of at most {MAX_REASON_LENGTH} characters without "
            "control characters, or null",
        )
    score = body.get("abuse_score")
    if score is not None and (
        isinstance(score, bool)
        or not isinstance(score, int)
        or not SMALLINT[0] <= score <= SMALLINT[1]
    ):
        raise ApiError(
            400,
            "invalid_request",
            f"abuse_score must be an integer from {SMALLINT[0]} to {SMALLINT[1]}, or null",
        )
    return reason, score


def _unrevoke_arguments(body: dict[str, Any]) -> tuple[str, int | None]:
    reason, score = _revoke_arguments(body)
    if reason is None or not reason.strip():
        raise ApiError(400, "invalid_request", "reason is required: why the revocation is undone")
    return reason, score


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
        set_route(request, "revoke")
        outcomes = self._metrics.revoke_outcomes
        try:
            parsed = ServiceToken.parse(token)
            reason, score = _revoke_arguments(read_json_object(request, allow_empty=True))
        except Exception:
            outcomes.count("invalid")
            raise
        now = int(self._clock.seconds())
        try:
            result = await store_answer(
                self._metrics, "revoke", self._store.revoke(parsed, reason, score, now)
            )
        except ApiError:
            outcomes.count("error")
            raise
        if result is None:
            outcomes.count("not_found")
            raise token_not_found()
        record, newly = result
        outcomes.count("revoked" if newly else "already_revoked")
        etag(request, record.version)  # as every answer with the internal view
        return respond(request, internal_token_view(record))

    @app.route("/api/v1/token/<string:token>/unrevoke", methods=["POST"])
    async def unrevoke(self, request: IRequest, token: str) -> bytes:
        set_route(request, "unrevoke")
        outcomes = self._metrics.unrevoke_outcomes
        try:
            parsed = ServiceToken.parse(token)
            reason, score = _unrevoke_arguments(read_json_object(request))
        except Exception:
            outcomes.count("invalid")
            raise
        now = int(self._clock.seconds())
        try:
            result = await store_answer(
                self._metrics, "unrevoke", self._store.unrevoke(parsed, reason, score, now)
            )
        except ApiError:
            outcomes.count("error")
            raise
        if result is None:
            outcomes.count("not_found")
            raise token_not_found()
        record, newly = result
        outcomes.count("unrevoked" if newly else "not_revoked")
        etag(request, record.version)
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
        entries = [
            {
                "revoked_at": rfc3339(p.revoked_at),
                "revoke_reason": p.revoke_reason,
                "unrevoked_at": rfc3339(p.unrevoked_at),
                "unrevoke_reason": p.unrevoke_reason,
            }
            for p in past
        ]
        more = len(past) == limit and past
        return respond(
            request, {"revocations": entries, "next": str(past[-1].id) if more else None}
        )

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
            raise ApiError(404, "webhooks_disabled", "no --webhook-url is set: there are no events")

    @app.route("/api/v1/webhooks/failed", methods=["GET"])
    async def failed_events(self, request: IRequest) -> bytes:
        set_route(request, "webhooks")
        self._webhooks_enabled()
        limit, after = page_query(request, cursor=b"after")
        events = await store_answer(
            self._metrics, "failed_events", self._store.failed_events(limit, after)
        )
        return respond(
            request,
            {
                "events": [
                    {
                        "id": e.event_id,
                        "type": e.type,
                        "created_at": rfc3339(e.created_at),
                        "attempts": e.attempts,
                        "last_error": e.last_error,
                    }
                    for e in events
                ],
                "next": str(events[-1].row) if len(events) == limit else None,
            },
        )

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
            raise ApiError(404, "event_not_found", "no failed event has this id")
        now = int(self._clock.seconds())
        retried = await store_answer(
            self._metrics, "retry_failed_events", self._store.retry_failed_events(event_id, now)
        )
        if event_id is not None and retried == 0:  # unknown, or not failed (any more)
            raise ApiError(404, "event_not_found", "no failed event has this id")
        if retried:
            self._store.event_written()  # deliver them now, not at the next look
        return respond(request, {"retried": retried})

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        set_route(request, "healthz")
        problems: list[str] = []
        state = MonitorState(cursor=None, wallet_height=None)
        try:
            state = await store_answer(self._metrics, "monitor_state", self._store.monitor_state())
        except ApiError:
            problems.append("store is not answering")
        body: dict[str, Any] = {
            "store": "error" if problems else "ok",
            "wallet_height": state.wallet_height,
            "cursor": state.cursor,
            # Confirmed blocks not yet processed: 0 when the monitor is caught up.
            "lag": (
                None
                if state.wallet_height is None or state.cursor is None
                else max(0, state.wallet_height - self._min_confirmations - state.cursor)
            ),
        }
        if self._monitor is None:
            body["monitor"] = "disabled"
        else:
            last = self._monitor.last_success()
            limit = 3 * self._monitor.poll_interval
            body["last_poll"] = None if last is None else rfc3339(int(last))
            # What the monitor made of the wallet's height: "ok", or why it did not trust it,
            # and the height it acts on (confirmations and the lag count from it).
            body["height_check"] = self._monitor.height_note() or "ok"
            trusted = self._monitor.trusted_height()
            body["trusted_height"] = trusted
            if trusted is not None and state.cursor is not None:
                body["lag"] = max(0, trusted - self._min_confirmations - state.cursor)
            if last is None:
                body["monitor"] = "starting"
                problems.append("the monitor has not completed a poll yet")
            elif self._clock.seconds() - last > limit:
                body["monitor"] = "stale"
                problems.append(f"no successful wallet poll in the last {limit:g} seconds")
            else:
                body["monitor"] = "ok"
        if self._onion is None:
            body["tor"] = {"state": "disabled"}  # the public site is not an onion
        else:
            body["tor"] = tor = self._onion.health()
            # Unpublished, no client can reach the public site: the daemon is not serving.
            problem = _onion_problem(tor)
            if problem is not None:
                problems.append(problem)
        body["status"] = "unavailable" if problems else "ok"
        if problems:
            body["reason"] = "; ".join(problems)
        return respond(request, body, 503 if problems else 200)
