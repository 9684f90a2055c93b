"""JSON in and out, for both sites: every answer is JSON, errors included.

An error answer is ``{"error": "<message>", "code": "<stable code>"}`` (:class:`ApiError`); no
traceback, SQL, path or library message reaches a client.  A request body is read as one JSON
object within the site's body limit (:data:`MAX_BODY`, or :data:`PASS_BATCH_BODY` on a pass
issuer's public site; the request itself refuses a longer body before buffering it, see
:mod:`anonticket.web.request`).
"""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn

from twisted.web.iweb import IRequest

MAX_BODY: Final = 4096
# A batch of 100 pass token requests in JSON (base64url, 73 bytes each with quotes and comma).
PASS_BATCH_BODY: Final = 8192


class ApiError(Exception):
    """An error answer: HTTP status, stable code, stable message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        fields: dict[str, object] | None = None,
    ) -> None:
        """``fields``: more members of the JSON answer (e.g. the balance of a refusal)."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.fields = fields or {}


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


# Made once: json.dumps/json.loads with any option build a new encoder/decoder on every call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def json_body(obj: object) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


def error_body(code: str, message: str) -> bytes:
    """An error answer's body, for the answers written by hand below Klein."""
    return json_body({"error": message, "code": code})


def respond(request: IRequest, obj: object, status: int = 200) -> bytes:
    return respond_body(request, json_body(obj), status)


def respond_body(request: IRequest, body: bytes, status: int = 200) -> bytes:
    """Answer with ``body``, already JSON."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


def respond_error(request: IRequest, error: ApiError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return respond(
        request, {"error": error.message, "code": error.code, **error.fields}, error.status
    )


def read_json_object(request: IRequest, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object, or ApiError 400/413/415."""
    content_type = request.getHeader(b"content-type")
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media != b"application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                "request body must be JSON (Content-Type: application/json)",
            )
    content = request.content
    assert content is not None
    content.seek(0)
    limit = body_limit(request)
    raw = content.read(limit + 1)
    if len(raw) > limit:  # the Request already refuses these; this keeps the bound local
        raise ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")
    if not raw.strip() and allow_empty:
        return {}
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    return value


def body_limit(request: object) -> int:
    """The largest body the request's site takes (:data:`MAX_BODY` but on a site that says
    otherwise: a :class:`~anonticket.web.site.PrivacySite` has its own ``max_body``)."""
    site = getattr(getattr(request, "channel", None), "site", None)
    limit = getattr(site, "max_body", None)
    return limit if isinstance(limit, int) else MAX_BODY
