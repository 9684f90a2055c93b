"""What the revoke and un-revoke routes read (a reason, an abuse score) and what the list of a
token's undone revocations answers."""

from __future__ import annotations

from typing import Any

from anonticket.store.revocations import PastRevocation
from anonticket.web.jsonio import ApiError
from anonticket.web.public import rfc3339
from anonticket.web.spending import text_field

MAX_REASON_LENGTH = 1000
SMALLINT = (-32768, 32767)


def revoke_arguments(body: dict[str, Any]) -> tuple[str | None, int | None]:
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


def unrevoke_arguments(body: dict[str, Any]) -> tuple[str, int | None]:
    reason, score = revoke_arguments(body)
    if reason is None or not reason.strip():
        raise ApiError(400, "invalid_request", "reason is required: why the revocation is undone")
    return reason, score


def revocations_view(past: list[PastRevocation], limit: int) -> dict[str, Any]:
    """A page of the token's undone revocations, newest first, and the cursor of the next."""
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
    return {"revocations": entries, "next": str(past[-1].id) if more else None}
