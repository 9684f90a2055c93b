"""Passes on the two sites (SPEC §14, docs/passes.md): the issuer directory and issuance on the
public site, verification for the service on the internal site.

Issuance is paid as one spend of the buying token (its Idempotency-Key scoped to that token, so
users cannot probe each other's keys), and stores nothing per pass: a retry with the same key and
the same requests is evaluated again (the same elements, fresh proofs) instead of replaying stored
responses, so no blinded or evaluated element is ever kept.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from anonticket.domain import ServiceToken
from anonticket.metrics import Metrics
from anonticket.passes.issuer import IssuerKey, IssuerKeys, valid_point
from anonticket.passes.wire import (
    DIRECTORY_MEDIA,
    REQUEST_MEDIA,
    RESPONSE_MEDIA,
    Token,
    TokenRequest,
    WireError,
    b64url,
    from_b64url,
)
from anonticket.store import Store
from anonticket.store.records import (
    KeyInUse,
    KeyReused,
    NotFound,
    SpendAnswer,
    SpendOutcome,
    SpendRequest,
)
from anonticket.web.jsonio import ApiError, body_limit, json_body, respond
from anonticket.web.public import token_not_found
from anonticket.web.spending import idempotency_key
from anonticket.web.storecalls import store_answer

REQUEST_PATH: Final = "/api/v1/passes/token-request"
DIRECTORY_PATH: Final = "/.well-known/private-token-issuer-directory"
DIRECTORY_MAX_AGE: Final = 3600  # seconds; less when the key rotates sooner

Threads = Callable[..., Deferred[Any]]  # run a function in the reactor's thread pool


def _from_b64url(text: object) -> bytes:
    """A client's base64url field: text, ASCII and short before it is decoded."""
    if not isinstance(text, str) or not text.isascii() or len(text) > 1000:
        raise ValueError("not base64url")
    return from_b64url(text)


class Passes:
    """The issuer's directory and issuance (public site) and verification (internal site)."""

    def __init__(
        self,
        keys: IssuerKeys,
        price: int,
        batch_max: int,
        store: Store,
        metrics: Metrics,
        clock: IReactorTime,
        threads: Threads,
    ) -> None:
        self._keys = keys
        self._price = price
        self._batch_max = batch_max
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._threads = threads

    def directory(self, request: IRequest) -> bytes:
        now = self._clock.seconds()
        key = self._keys.current(now)
        # RFC 9578 section 4: base64url "including padding" (decoders such as Cloudflare's
        # privacypass-ts refuse it unpadded).
        encoded = base64.urlsafe_b64encode(key.public_key).decode("ascii")
        entry: dict[str, Any] = {"token-type": 1, "token-key": encoded}
        if key.not_before is not None:
            entry["not-before"] = key.not_before
        max_age = DIRECTORY_MAX_AGE
        if self._keys.lifetime:
            # Never cached past the rotation: a client must not ask with a key gone stale.
            rotation = (key.period + 1) * self._keys.lifetime
            max_age = max(0, min(max_age, rotation - int(now)))
        request.setHeader(b"content-type", DIRECTORY_MEDIA.encode("ascii"))
        request.setHeader(b"cache-control", b"public, max-age=%d" % max_age)
        return json_body({"issuer-request-uri": REQUEST_PATH, "token-keys": [entry]})

    async def token_request(self, request: IRequest) -> bytes:
        """RFC 9578 issuance: one TokenRequest in, one TokenResponse out, paid from the bearer
        token's balance."""
        outcomes = self._metrics.pass_issuance_outcomes
        try:
            media = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip()
            if media.lower() != REQUEST_MEDIA.encode("ascii"):
                raise ApiError(415, "unsupported_media_type", f"the body must be {REQUEST_MEDIA}")
            token, key = _bearer(request), idempotency_key(request)
            content = request.content
            assert content is not None
            content.seek(0)
            body = content.read(body_limit(request) + 1)
            current = self._keys.current(self._clock.seconds())
            requests = [_token_request(body, current)]
        except Exception:
            outcomes.count("invalid")
            raise
        _, responses = await self._issue(request, token, key, requests, current)
        request.setHeader(b"content-type", RESPONSE_MEDIA.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return responses[0]

    async def batch(self, request: IRequest, body: dict[str, Any]) -> bytes:
        """The batch form: ``{"requests": [<base64url TokenRequest>, ...]}`` in, the responses
        (and the balance after the purchase) out, paid as one spend."""
        outcomes = self._metrics.pass_issuance_outcomes
        try:
            token, key = _bearer(request), idempotency_key(request)
            current = self._keys.current(self._clock.seconds())
            listed = body.get("requests")
            if not isinstance(listed, list) or not 1 <= len(listed) <= self._batch_max:
                raise ApiError(
                    400,
                    "invalid_request",
                    f'"requests" must list 1 to {self._batch_max} base64url TokenRequests',
                )
            requests = [_token_request(_request_bytes(item), current) for item in listed]
        except Exception:
            outcomes.count("invalid")
            raise
        answer, responses = await self._issue(request, token, key, requests, current)
        return respond(
            request,
            {"responses": [b64url(r) for r in responses], "balance": answer.balance},
        )

    async def _issue(
        self,
        request: IRequest,
        token: ServiceToken,
        key: bytes,
        requests: list[TokenRequest],
        current: IssuerKey,
    ) -> tuple[SpendAnswer, list[bytes]]:
        answer = await self._buy(token, key, requests, current)
        responses = await self._evaluate(current, requests)
        self._metrics.pass_issuance_outcomes.count("replayed" if answer.replayed else "issued")
        self._metrics.passes_issued.inc(len(responses))
        if answer.replayed:
            request.setHeader(b"idempotent-replayed", b"true")
        return answer, responses

    async def _buy(
        self, token: ServiceToken, key: bytes, requests: list[TokenRequest], current: IssuerKey
    ) -> SpendAnswer:
        """The price of the passes as one spend, exactly once per key and requests."""
        digest = hashlib.sha256(current.key_id + b"".join(r.serialize() for r in requests)).digest()
        count = len(requests)
        spend = SpendRequest(
            token,
            count * self._price,
            f"{count} pass" + ("" if count == 1 else "es"),
            # Scoped to the buying token: one user's keys never meet another's.
            b"pass\x00" + hashlib.sha256(token.raw).digest() + key,
            extra=digest,
        )
        now = int(self._clock.seconds())
        outcomes = self._metrics.pass_issuance_outcomes
        try:
            result = await store_answer(self._metrics, "spend", self._store.spend(spend, now))
        except ApiError:
            outcomes.count("error")
            raise
        match result:
            case SpendAnswer(outcome=SpendOutcome.SPENT):
                return result
            case SpendAnswer():
                code = result.outcome.name.lower()
                outcomes.count(code)
                raise ApiError(
                    409, code, _REFUSED[result.outcome], fields={"balance": result.balance}
                )
            case KeyReused():
                outcomes.count("invalid")
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for other token requests",
                )
            case KeyInUse():
                outcomes.count("invalid")
                raise ApiError(
                    409,
                    "idempotency_key_in_use",
                    "a purchase with this Idempotency-Key is still being answered",
                    {"Retry-After": "1"},
                )
            case NotFound():
                outcomes.count("not_found")
                raise token_not_found()
        raise AssertionError("unreachable")

    async def _evaluate(self, key: IssuerKey, requests: list[TokenRequest]) -> list[bytes]:
        # ~6 ms of curve arithmetic a pass: off the reactor thread.
        responses: list[bytes] = await self._threads(
            lambda: [key.evaluate(r.blinded) for r in requests]
        )
        return responses

    # Verification, for the service (the origin), on the internal site.

    def oldest_period(self, now: float) -> int:
        """The oldest key period a pass verifies under now."""
        return min(k.period for k in self._keys.accepted(now))

    async def verify(self, request: IRequest, body: dict[str, Any]) -> bytes:
        outcomes = self._metrics.pass_verification_outcomes
        now = self._clock.seconds()
        try:
            token = Token.parse(_from_b64url(body.get("token")))
        except (ValueError, WireError):
            outcomes.count("invalid")
            raise _invalid_pass() from None
        key = next((k for k in self._keys.accepted(now) if k.key_id == token.key_id), None)
        valid = key is not None and await self._threads(
            key.verifies, token.input, token.authenticator
        )
        if not valid or key is None:
            outcomes.count("invalid")
            raise _invalid_pass()
        try:
            first = await store_answer(
                self._metrics,
                "use_pass",
                self._store.use_pass(token.nonce, token.key_id, key.period, int(now)),
            )
        except ApiError:
            outcomes.count("error")
            raise
        if not first:
            outcomes.count("already_used")
            raise ApiError(409, "pass_already_used", "this pass was used before")
        outcomes.count("valid")
        return respond(request, {"status": "valid"})


_REFUSED: Final = {
    SpendOutcome.INSUFFICIENT_BALANCE: "the balance is too low for these passes",
    SpendOutcome.TOKEN_REVOKED: "the token is revoked",
    SpendOutcome.TOKEN_SUSPENDED: "the token is suspended",
}


def _bearer(request: IRequest) -> ServiceToken:
    value = request.getHeader(b"authorization")
    if value is None or not value[:7].lower() == b"bearer ":
        raise ApiError(
            401,
            "token_required",
            "the service token paying for the passes goes in Authorization: Bearer <token>",
            {"WWW-Authenticate": "Bearer"},
        )
    return ServiceToken.parse(value[7:].strip().decode("ascii", "replace"))


def _request_bytes(item: object) -> bytes:
    try:
        return _from_b64url(item)
    except ValueError:
        raise ApiError(
            400, "invalid_token_request", "each request must be a base64url TokenRequest"
        ) from None


def _token_request(body: bytes, current: IssuerKey) -> TokenRequest:
    try:
        parsed = TokenRequest.parse(body)
    except WireError as e:
        raise ApiError(400, "invalid_token_request", str(e)) from None
    if parsed.truncated_key_id != current.truncated_key_id:
        raise ApiError(
            400,
            "invalid_token_request",
            "truncated_token_key_id names no current key: fetch the issuer directory again",
        )
    if not valid_point(parsed.blinded):
        # Checked before the purchase: nothing is charged for a request that cannot be served.
        raise ApiError(400, "invalid_token_request", "blinded_msg is not a point of P-384")
    return parsed


def _invalid_pass() -> ApiError:
    return ApiError(
        400,
        "invalid_pass",
        'not a type-1 token issued here under a current key (base64url in "token")',
    )
