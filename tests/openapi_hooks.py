"""Schemathesis hooks for tests/test_openapi.py, loaded by ``st run`` in its own process
(``SCHEMATHESIS_HOOKS``).

Generated values alone reach almost only the error answers: a random token is unknown, a random
body is no TokenRequest for the issuer's key.  So before a case is sent, some of its values are
swapped for real ones the test made on the daemon (a redeemed token, a revoked one, a paid,
a pending and a dust payment ID, failed webhook events, passes, the issuer's key), chosen from
a hash of the case or in turn (the same cases each run for one seed), and the answers' statuses are
recorded so the test can tell that the success paths were taken.  Only positive cases (valid
by the document) are edited, so a negative case keeps its invalid part, and its refusal is
still checked (schemathesis cannot revalidate a binary body it did not make).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import schemathesis
from requests.structures import CaseInsensitiveDict
from schemathesis.transport.serialization import serialize_binary

from anonticket.passes.client import blind, token_challenge
from anonticket.passes.wire import b64url, from_b64url

SEEDS: dict[str, Any] = json.loads(Path(os.environ["ANONTICKET_OPENAPI_SEEDS"]).read_text())
SEEN = Path(os.environ["ANONTICKET_OPENAPI_SEEN"])
_passes = list(SEEDS.get("passes", []))
_redeemed: list[bool] = []  # redeems given a seeded payment ID so far
_retried: list[bool] = []  # a failed event was retried by its id: no more waiting for one

# The hooks see cases of every operation of both documents.
Case = schemathesis.Case[Any]


@schemathesis.deserializer("application/private-token-issuer-directory")
def _directory(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    """The issuer directory is JSON under its own media type (RFC 9578 section 4)."""
    return json.loads(response.content)


@schemathesis.serializer("application/private-token-request")
def _token_request_bytes(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """The issuance body on the wire: the documented string, one character a byte."""
    if isinstance(value, str) and type(value) is str:
        return value.encode("latin-1", "replace")
    return serialize_binary(value)


@schemathesis.deserializer("application/private-token-response")
def _token_response(
    ctx: schemathesis.DeserializationContext, response: schemathesis.Response
) -> Any:
    """The TokenResponse as the document describes it: one character a byte."""
    return response.content.decode("latin-1")


def _digest(case: Case) -> bytes:
    """Fixed by the case's generated values."""
    text = repr((case.method, case.path, case.path_parameters, case.query, case.headers, case.body))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _failed_event() -> str | None:
    """The id of an event failed now (a retry of all of them makes them wait for a second or
    two, until the receiver that is not there refuses them again): waited for until one
    retry by id is answered, then the generated ids (unknown) are left."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        url = SEEDS["internal_url"] + "/api/v1/webhooks/failed"
        with urllib.request.urlopen(url, timeout=5) as answer:
            events = json.loads(answer.read())["events"]
        if events:
            return str(events[0]["id"])
        time.sleep(0.2)
    return None


def _fresh_request() -> str:
    key = from_b64url(SEEDS["issuer_key"])
    return b64url(blind(key, token_challenge("openapi.test"), 1)[0].request)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Case, kwargs: Any) -> None:
    meta = case.meta
    if meta is not None and meta.generation.mode.is_negative:
        return
    digest = _digest(case)
    roll = digest[0] % 100
    tokens = SEEDS["tokens"]
    path, method = case.path, case.method.upper()
    if case.headers and "Idempotency-Key" in case.headers and roll < 80:
        # Generated keys repeat ("0"), and the same key for another request is a refusal
        # (422): a key of the case's own makes most purchases new, and a repeated case a replay.
        case.headers["Idempotency-Key"] = "openapi-" + digest[1:9].hex()
    if case.path_parameters and "token" in case.path_parameters and roll < 75:
        # Revoke and un-revoke one token; spend, look up and page the other, and now and then
        # the revoked one (a refusal to spend it).
        revoking = path.endswith(("/revoke", "/unrevoke"))
        pick = "revoked" if revoking or roll < 10 else "spender"
        case.path_parameters["token"] = tokens[pick]
    if case.path_parameters and "event_id" in case.path_parameters and roll < 50 and not _retried:
        event = _failed_event()
        if event is not None:
            case.path_parameters["event_id"] = event
    if path == "/api/v1/redeem" and roll < 60:
        # In turn, so that each (paid, pending, below the minimum) is asked at least once.
        pids = SEEDS["pids"]
        case.body = {"pid": pids[len(_redeemed) % len(pids)]}
        _redeemed.append(True)
    if path.startswith("/api/v1/passes") and method == "POST" and path != "/api/v1/passes/verify":
        if roll < 70:
            headers = CaseInsensitiveDict(case.headers or {})
            headers["Authorization"] = f"Bearer {tokens['spender']}"
            case.headers = headers
        if roll < 50:
            request = _fresh_request()
            if path == "/api/v1/passes":
                case.body = {"requests": [request] * (1 + roll % 3)}
            else:
                case.body = from_b64url(request).decode("latin-1")
    if path == "/api/v1/passes/verify" and roll < 60 and _passes:
        # Each pass verifies once: the first showing is 200, the later ones 409.
        case.body = {"token": _passes[roll % len(_passes)]}


@schemathesis.hook
def after_call(
    context: schemathesis.HookContext, case: Case, response: schemathesis.Response
) -> None:
    if case.operation.path.endswith("{event_id}/retry") and response.status_code == 200:
        _retried.append(True)
    with SEEN.open("a") as seen:
        seen.write(f"{case.method.upper()} {case.operation.path} {response.status_code}\n")
