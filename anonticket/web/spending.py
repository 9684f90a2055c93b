"""What the internal site's spend and ledger routes read from a request and write back
(SPEC §12, docs/spending.md): the Idempotency-Key, If-Match, the spend body, the answers.

The store remembers a spend's answer as values (outcome, balance, version, spend id), not as
HTTP; the answer is rendered from them here, so a replay is the same status and body.
"""

from __future__ import annotations

import re
from typing import Any, Final

from twisted.web.iweb import IRequest

from anonticket.domain import ServiceToken
from anonticket.store.records import (
    LedgerEntry,
    SpendAnswer,
    SpendOutcome,
    SpendRequest,
    TokenRecord,
    VersionMismatch,
)
from anonticket.web.jsonio import ApiError, respond
from anonticket.web.public import rfc3339, token_view

MAX_MEMO_LENGTH: Final = 200
MAX_KEY_LENGTH: Final = 255
MAX_AMOUNT: Final = 2**63 - 1  # what both databases store
LEDGER_PAGE: Final = 50  # entries a ledger page has unless ?limit= says otherwise
MAX_LEDGER_PAGE: Final = 500
_KEY: Final = re.compile(rb"[\x21-\x7e]{1,255}")
_ETAG: Final = re.compile(rb'\s*(?:W/)?"([0-9]{1,19})"\s*')


def storable_text(text: str) -> bool:
    """Text both databases store as it is: encodable as UTF-8 (no lone surrogate, which JSON's
    \\ud800 escapes can carry) and without control characters other than tab and newline
    (PostgreSQL refuses NUL; the others have no business in a reason or a memo)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any((ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0 for c in text)


def text_field(value: object, max_length: int) -> bool:
    """Whether an optional text field (a memo, a revoke reason) is absent or text to store."""
    return value is None or (
        isinstance(value, str) and len(value) <= max_length and storable_text(value)
    )


def idempotency_key(request: IRequest) -> bytes:
    """The request's Idempotency-Key: 1-255 visible ASCII characters, required."""
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values or values == [b""]:  # an empty value is no key, as an empty option is unset
        raise ApiError(
            400,
            "idempotency_key_required",
            "an Idempotency-Key header is required: a new one for each purchase, the same one "
            "when retrying it",
        )
    if len(values) > 1 or not _KEY.fullmatch(values[0]):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be one value of 1 to {MAX_KEY_LENGTH} visible ASCII characters",
        )
    key: bytes = values[0]
    return key


def if_match(request: IRequest) -> int | None:
    """The version of ``If-Match: "<version>"``, or None without one (or with ``*``)."""
    values = request.requestHeaders.getRawHeaders(b"if-match")
    if not values:
        return None
    if len(values) == 1 and values[0].strip() == b"*":
        return None  # any current version: the token has to exist, which a spend checks
    match = _ETAG.fullmatch(values[0]) if len(values) == 1 else None
    if match is None:
        raise ApiError(
            400, "invalid_if_match", 'If-Match must be one version as an ETag: "<version>"'
        )
    return int(match.group(1))


def spend_request(
    token: ServiceToken, body: dict[str, Any], key: bytes, expected: int | None
) -> SpendRequest:
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_AMOUNT:
        raise ApiError(
            400, "invalid_amount", "amount must be a whole number of atomic units, at least 1"
        )
    memo = body.get("memo")
    if not text_field(memo, MAX_MEMO_LENGTH):
        raise ApiError(
            400,
            "invalid_memo",
            f"memo must be a string of at most {MAX_MEMO_LENGTH} characters without control "
            "characters, or absent",
        )
    unknown = set(body) - {"amount", "memo"}
    if unknown:
        raise ApiError(400, "invalid_request", "a spend has only the fields amount and memo")
    return SpendRequest(token, amount, memo, key, expected)


def etag(request: IRequest, version: int) -> None:
    request.setHeader(b"etag", b'"%d"' % version)


_REFUSALS: Final = {
    SpendOutcome.INSUFFICIENT_BALANCE: ("insufficient_balance", "the balance is too low"),
    SpendOutcome.TOKEN_REVOKED: ("token_revoked", "the token is revoked"),
    SpendOutcome.TOKEN_SUSPENDED: (
        "token_suspended",
        "the token is suspended: a payment credited to it left the chain",
    ),
}


def spend_response(request: IRequest, answer: SpendAnswer, amount: int) -> bytes:
    """The answer as the service saw it the first time (and again, marked, on a replay)."""
    if answer.replayed:
        request.setHeader(b"idempotent-replayed", b"true")
    etag(request, answer.version)
    if answer.outcome == SpendOutcome.SPENT:
        return respond(
            request,
            {
                "status": "active",
                "balance": answer.balance,
                "amount": amount,
                "version": answer.version,
                "spend_id": answer.spend_id,
            },
        )
    code, message = _REFUSALS[answer.outcome]
    body: dict[str, Any] = {"error": message, "code": code, "version": answer.version}
    if answer.outcome == SpendOutcome.INSUFFICIENT_BALANCE:
        body["balance"] = answer.balance
    return respond(request, body, 409)


def version_mismatch(request: IRequest, mismatch: VersionMismatch) -> bytes:
    etag(request, mismatch.version)
    return respond(
        request,
        {
            "error": "the token changed since that version",
            "code": "version_mismatch",
            "version": mismatch.version,
            "balance": mismatch.balance,
        },
        412,
    )


def internal_token_view(record: TokenRecord) -> dict[str, Any]:
    """The public view, and what the service and the operator need beside it."""
    view = token_view(record)
    view["version"] = record.version
    view["credited"] = record.credited
    view["spent"] = record.spent
    view["reversed"] = record.reversed
    view["abuse_score"] = record.abuse_score
    view["revoke_reason"] = record.revoke_reason
    return view


def page_query(request: IRequest, cursor: bytes = b"before") -> tuple[int, int | None]:
    """``?limit=`` (1-500, default 50) and the cursor (``?before=``, or another name): the
    ``next`` of the previous page."""
    args = request.args or {}
    limit = _query_int(args, b"limit", LEDGER_PAGE, 1, MAX_LEDGER_PAGE)
    before = _query_int(args, cursor, None, 1, 2**63 - 1)
    assert limit is not None
    return limit, before


def _query_int(
    args: dict[bytes, list[bytes]], name: bytes, default: int | None, low: int, high: int
) -> int | None:
    values = args.get(name)
    if not values:
        return default
    text = values[-1]
    if len(values) > 1 or not text.isdigit() or len(text) > 19 or not low <= int(text) <= high:
        raise ApiError(
            400,
            "invalid_request",
            f"{name.decode()} must be one whole number from {low} to {high}",
        )
    return int(text)


def ledger_view(entries: list[LedgerEntry], limit: int) -> dict[str, Any]:
    """Entries newest first; ``next`` pages on (null on the last page)."""
    rendered = []
    for entry in entries:
        item: dict[str, Any] = {
            "kind": entry.kind.name.lower(),
            "amount": entry.amount,
            "at": rfc3339(entry.at),
        }
        if entry.spend_id is not None:
            item["spend_id"] = entry.spend_id
            item["memo"] = entry.memo
        rendered.append(item)
    more = len(entries) == limit and entries
    return {"entries": rendered, "next": str(entries[-1].id) if more else None}
