"""Spending a token's balance on the internal site (SPEC §12), through real sockets."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from anonticket.store.records import PaymentStatus

from .conftest import get_json, post_json, transfer

PID = "0123456789abcdef"
AMOUNT = 1000


async def issue_token(daemon, http, pid: str = PID, amount: int = AMOUNT, txid: int = 1) -> str:
    await daemon.store.record_transfers([transfer(pid, txid, amount=amount)], now=1)
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": pid})
    assert code == 200
    return str(body["service_token"])


async def spend(daemon, http, token: str, body: object, key: str | None = "k1", **headers: str):
    if key is not None:
        headers["Idempotency-Key"] = key
    url = f"{daemon.internal_url}/api/v1/token/{token}/spend"
    return await post_json(http, url, body, {k.replace("_", "-"): v for k, v in headers.items()})


def header(headers, name: str) -> str | None:
    values = headers.getRawHeaders(name.encode())
    return None if not values else values[0].decode()


@pytest_twisted.ensureDeferred
async def test_a_spend_takes_the_amount_once_and_every_view_shows_it(daemon, http):
    token = await issue_token(daemon, http)
    # Prime both answer caches: the spend must evict them at once.
    _, before, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert before["balance"] == AMOUNT
    code, redeem, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    assert redeem["balance"] == AMOUNT

    code, body, headers = await spend(daemon, http, token, {"amount": 300, "memo": "1 month"})
    assert code == 200
    assert set(body) == {"status", "balance", "amount", "version", "spend_id"}
    assert (body["status"], body["balance"], body["amount"]) == ("active", 700, 300)
    assert body["version"] == 2  # issued (1), spent (2)
    assert len(body["spend_id"]) == 32
    assert header(headers, "ETag") == '"2"'
    assert header(headers, "Idempotent-Replayed") is None

    _, public, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert public["balance"] == 700
    _, redeem, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    assert (redeem["status"], redeem["balance"]) == ("already_claimed", 700)
    code, internal, headers = await get_json(http, f"{daemon.internal_url}/api/v1/token/{token}")
    assert code == 200 and header(headers, "ETag") == '"2"'
    assert {k: internal[k] for k in ("balance", "version", "credited", "spent", "reversed")} == {
        "balance": 700,
        "version": 2,
        "credited": AMOUNT,
        "spent": 300,
        "reversed": 0,
    }
    assert internal["status"] == "active" and internal["abuse_score"] == 0


@pytest_twisted.ensureDeferred
async def test_the_same_key_replays_the_first_answer_and_spends_nothing(daemon, http):
    token = await issue_token(daemon, http)
    code, first, _ = await spend(daemon, http, token, {"amount": 300, "memo": "m"})
    for _ in range(3):
        again_code, again, headers = await spend(daemon, http, token, {"amount": 300, "memo": "m"})
        assert (again_code, again) == (code, first)
        assert header(headers, "Idempotent-Replayed") == "true"
        assert header(headers, "ETag") == f'"{first["version"]}"'
    _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert view["balance"] == AMOUNT - 300
    # A new key is a new purchase.
    code, second, _ = await spend(daemon, http, token, {"amount": 300, "memo": "m"}, key="k2")
    assert code == 200 and second["balance"] == AMOUNT - 600
    assert second["spend_id"] != first["spend_id"]


@pytest_twisted.ensureDeferred
async def test_a_key_used_for_another_request_is_refused(daemon, http):
    token = await issue_token(daemon, http)
    other = await issue_token(daemon, http, pid="fedcba9876543210", txid=2)
    code, _, _ = await spend(daemon, http, token, {"amount": 10, "memo": "a"})
    assert code == 200
    for token_used, body in (
        (token, {"amount": 11, "memo": "a"}),
        (token, {"amount": 10, "memo": "b"}),
        (token, {"amount": 10}),
        (other, {"amount": 10, "memo": "a"}),
    ):
        code, got, _ = await spend(daemon, http, token_used, body)
        assert (code, got["code"]) == (422, "idempotency_key_reused")
    for t in (token, other):
        _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{t}")
        assert view["balance"] == (AMOUNT - 10 if t == token else AMOUNT)


@pytest.mark.parametrize(
    ("body", "key", "code"),
    [
        ({"amount": 1}, None, "idempotency_key_required"),
        ({"amount": 1}, "", "idempotency_key_required"),
        ({"amount": 1}, "has space", "invalid_idempotency_key"),
        ({"amount": 1}, "x" * 256, "invalid_idempotency_key"),
        ({"amount": 1}, "caf\u00e9", "invalid_idempotency_key"),
        ({"amount": 0}, "k", "invalid_amount"),
        ({"amount": -5}, "k", "invalid_amount"),
        ({"amount": 1.5}, "k", "invalid_amount"),
        ({"amount": True}, "k", "invalid_amount"),
        ({"amount": "5"}, "k", "invalid_amount"),
        ({"amount": 2**63}, "k", "invalid_amount"),
        ({}, "k", "invalid_amount"),
        ({"amount": 1, "memo": "x" * 201}, "k", "invalid_memo"),
        ({"amount": 1, "memo": "a\x00b"}, "k", "invalid_memo"),
        ({"amount": 1, "memo": 5}, "k", "invalid_memo"),
        ({"amount": 1, "price": 5}, "k", "invalid_request"),
        ([1], "k", "invalid_request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_spends_are_400_and_not_remembered(daemon, http, body, key, code):
    token = await issue_token(daemon, http)
    status, got, _ = await spend(daemon, http, token, body, key=key)
    assert (status, got["code"]) == (400, code)
    # Nothing was spent, and the key (a well-formed one) is free for a real request.
    usable = key if key and "idempotency_key" not in code else "k"
    status, got, headers = await spend(daemon, http, token, {"amount": 1}, key=usable)
    assert status == 200 and got["balance"] == AMOUNT - 1
    assert header(headers, "Idempotent-Replayed") is None


@pytest_twisted.ensureDeferred
async def test_a_memo_of_200_characters_is_kept_in_the_ledger(daemon, http):
    token = await issue_token(daemon, http)
    memo = "\u00e9" * 200
    code, body, _ = await spend(daemon, http, token, {"amount": 5, "memo": memo})
    assert code == 200
    _, ledger, _ = await get_json(http, f"{daemon.internal_url}/api/v1/token/{token}/ledger")
    assert ledger["entries"][0] == {
        "kind": "spend",
        "amount": 5,
        "at": ledger["entries"][0]["at"],
        "spend_id": body["spend_id"],
        "memo": memo,
    }


@pytest_twisted.ensureDeferred
async def test_insufficient_balance_is_remembered_under_its_key(daemon, http):
    token = await issue_token(daemon, http)
    code, body, headers = await spend(daemon, http, token, {"amount": AMOUNT + 1})
    assert (code, body["code"], body["balance"]) == (409, "insufficient_balance", AMOUNT)
    assert header(headers, "ETag") == '"1"'
    # A top-up later does not change the answer under that key: the purchase was refused.
    await daemon.store.record_transfers([transfer(PID, 9, amount=AMOUNT)], now=2)
    _, redeem, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    assert redeem["balance"] == 2 * AMOUNT
    again, replay, headers = await spend(daemon, http, token, {"amount": AMOUNT + 1})
    assert (again, replay) == (code, body)
    assert header(headers, "Idempotent-Replayed") == "true"
    # The whole balance can be spent, to zero and not below.
    code, body, _ = await spend(daemon, http, token, {"amount": 2 * AMOUNT}, key="all")
    assert (code, body["balance"]) == (200, 0)
    code, body, _ = await spend(daemon, http, token, {"amount": 1}, key="one-more")
    assert (code, body["code"], body["balance"]) == (409, "insufficient_balance", 0)


@pytest_twisted.ensureDeferred
async def test_if_match_guards_the_version_and_a_mismatch_is_not_remembered(daemon, http):
    token = await issue_token(daemon, http)
    code, body, headers = await spend(daemon, http, token, {"amount": 10}, If_Match='"7"')
    assert code == 412
    assert body == {
        "error": "the token changed since that version",
        "code": "version_mismatch",
        "version": 1,
        "balance": AMOUNT,
    }
    assert header(headers, "ETag") == '"1"'
    # The same key with the version the service now knows goes through.
    code, body, _ = await spend(daemon, http, token, {"amount": 10}, If_Match='"1"')
    assert (code, body["version"]) == (200, 2)
    code, body, _ = await spend(daemon, http, token, {"amount": 10}, key="k2", If_Match="*")
    assert (code, body["version"]) == (200, 3)
    for bad in ("1", '"x"', '"1", "2"', '"' + "9" * 20 + '"'):
        code, body, _ = await spend(daemon, http, token, {"amount": 1}, key="k3", If_Match=bad)
        assert (code, body["code"]) == (400, "invalid_if_match"), bad


@pytest_twisted.ensureDeferred
async def test_revoked_suspended_and_unknown_tokens(daemon, http):
    token = await issue_token(daemon, http)
    revoke = f"{daemon.internal_url}/api/v1/token/{token}/revoke"
    assert (await post_json(http, revoke, {}))[0] == 200
    code, body, headers = await spend(daemon, http, token, {"amount": 1})
    assert (code, body["code"]) == (409, "token_revoked")
    assert header(headers, "ETag") == '"2"'  # the revoke was a change
    again, replay, _ = await spend(daemon, http, token, {"amount": 1})
    assert (again, replay) == (code, body)

    other = await issue_token(daemon, http, pid="fedcba9876543210", txid=2)
    # The chain takes the payment back: the token is suspended.
    pooled = transfer("fedcba9876543210", 2, amount=AMOUNT, height=0, status=PaymentStatus.PENDING)
    await daemon.store.record_transfers([pooled], now=3)
    code, body, _ = await spend(daemon, http, other, {"amount": 1}, key="s")
    assert (code, body["code"]) == (409, "token_suspended")

    unknown = "cd" * 32
    code, body, _ = await spend(daemon, http, unknown, {"amount": 1}, key="u")
    assert (code, body["code"]) == (404, "token_not_found")
    code, body, _ = await spend(daemon, http, "abc", {"amount": 1}, key="u")
    assert (code, body["code"]) == (400, "invalid_token")
    for path in ("", "/ledger"):
        code, body, _ = await get_json(http, f"{daemon.internal_url}/api/v1/token/{unknown}{path}")
        assert (code, body["code"]) == (404, "token_not_found")


@pytest_twisted.ensureDeferred
async def test_the_ledger_pages_newest_first_and_never_names_a_pid_or_txid(daemon, http):
    token = await issue_token(daemon, http)
    await daemon.store.record_transfers([transfer(PID, 2, amount=500)], now=5)
    await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    for i in range(3):
        code, _, _ = await spend(daemon, http, token, {"amount": 100 + i}, key=f"k{i}")
        assert code == 200
    url = f"{daemon.internal_url}/api/v1/token/{token}/ledger"
    code, page, _ = await get_json(http, url)
    assert code == 200 and page["next"] is None
    kinds = [(e["kind"], e["amount"]) for e in page["entries"]]
    assert kinds == [
        ("spend", 102),
        ("spend", 101),
        ("spend", 100),
        ("credit", 500),
        ("credit", 1000),
    ]
    raw = json.dumps(page)
    assert PID not in raw and (1).to_bytes(32, "big").hex() not in raw
    # Paging: two at a time, following "next", gives the same entries.
    seen, cursor = [], ""
    while True:
        _, part, _ = await get_json(http, f"{url}?limit=2{cursor}")
        seen += part["entries"]
        if part["next"] is None:
            break
        cursor = f"&before={part['next']}"
    assert seen == page["entries"]
    _, internal, _ = await get_json(http, f"{daemon.internal_url}/api/v1/token/{token}")
    assert (
        internal["balance"]
        == 1500 - 303
        == sum(e["amount"] * (1 if e["kind"] in ("credit", "restoration") else -1) for e in seen)
    )
    for query in ("limit=0", "limit=501", "limit=x", "before=-1", "limit=1&limit=2"):
        code, body, _ = await get_json(http, f"{url}?{query}")
        assert (code, body["code"]) == (400, "invalid_request"), query


@pytest_twisted.ensureDeferred
async def test_the_public_site_has_none_of_these_routes(daemon, http):
    token = await issue_token(daemon, http)
    code, body, _ = await spend(daemon, http, token, {"amount": 1})
    assert code == 200
    url = f"{daemon.public_url}/api/v1/token/{token}/spend"
    code, body, _ = await post_json(http, url, {"amount": 1}, {"Idempotency-Key": "p"})
    assert (code, body["code"]) == (404, "not_found")
    code, body, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}/ledger")
    assert (code, body["code"]) == (404, "not_found")
    _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert "version" not in view and "spent" not in view


@pytest_twisted.ensureDeferred
async def test_a_second_request_with_a_key_in_flight_is_told_so(daemon, http):
    token = await issue_token(daemon, http)
    from anonticket.domain import ServiceToken
    from anonticket.store.records import KeyInUse, SpendAnswer, SpendRequest

    request = SpendRequest(ServiceToken.parse(token), 5, None, b"k")
    first = daemon.store.spend(request, 10)
    second = daemon.store.spend(request, 10)  # the first has not reached the database yet
    assert isinstance(await second, KeyInUse)
    assert isinstance(await first, SpendAnswer)
    third = await daemon.store.spend(request, 11)
    assert isinstance(third, SpendAnswer) and third.replayed


@pytest_twisted.ensureDeferred
async def test_metrics_count_spends_by_outcome_without_amounts(daemon, http):
    token = await issue_token(daemon, http)
    await spend(daemon, http, token, {"amount": 777})
    await spend(daemon, http, token, {"amount": 777})
    await spend(daemon, http, token, {"amount": 10**9}, key="big")
    await spend(daemon, http, token, {"amount": 1}, key=None)
    response = await http.get(f"{daemon.internal_url}/metrics", timeout=10)
    text = (await response.content()).decode()
    for outcome, count in (
        ("spent", 1),
        ("replayed", 1),
        ("insufficient_balance", 1),
        ("invalid", 1),
    ):
        assert f'anonticket_spend_requests_total{{outcome="{outcome}"}} {count}.0' in text
    # No amount or token in any label (values are durations and counts: "777" can be a digit
    # run of a latency, so only the label sets are searched).
    labels = [line.split("}")[0] for line in text.splitlines() if "{" in line]
    assert labels and not any("777" in label or token in label for label in labels)
    assert token not in text


@pytest_twisted.ensureDeferred
async def test_64_concurrent_spends_of_one_token_never_overdraw(any_daemon, http):
    """64 connections at once, each its own purchase; on both databases."""
    daemon = any_daemon
    token = await issue_token(daemon, http)

    async def one(i: int):
        return await spend(daemon, http, token, {"amount": 30}, key=f"buy-{i}")

    from twisted.internet.defer import Deferred

    results = await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(64)])
    codes = [code for code, _, _ in results]
    assert all(code in (200, 409) for code in codes), codes
    spent = [body for code, body, _ in results if code == 200]
    assert len(spent) == AMOUNT // 30
    assert all(body["code"] == "insufficient_balance" for code, body, _ in results if code == 409)
    # Every version from 2 up was handed out once: each spend was one change.
    assert sorted(body["version"] for body in spent) == list(range(2, 2 + len(spent)))
    _, view, _ = await get_json(http, f"{daemon.internal_url}/api/v1/token/{token}")
    assert view["balance"] == AMOUNT - 30 * len(spent) == AMOUNT % 30
    assert view["spent"] == 30 * len(spent)


@pytest_twisted.ensureDeferred
async def test_a_spend_whose_client_hangs_up_is_still_counted_if_made(daemon, http):
    """The metric follows the store: every spend made is counted, answered or not."""
    from urllib.parse import urlsplit

    from .conftest import reactor
    from .rawhttp import raw_request

    token = await issue_token(daemon, http)
    port = urlsplit(daemon.internal_url).port
    for i in range(20):
        body = b'{"amount": 7}'
        head = (
            f"POST /api/v1/token/{token}/spend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nIdempotency-Key: gone-{i}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        await raw_request(reactor, port, head + body, hangup=True)
    spent = daemon.metrics.spend_outcomes._children["spent"]
    for _ in range(100):
        _, view, _ = await get_json(http, f"{daemon.internal_url}/api/v1/token/{token}")
        if spent._value.get() * 7 == view["spent"]:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert spent._value.get() * 7 == view["spent"] == AMOUNT - view["balance"]
    assert view["spent"] > 0  # the case at hand: spends made for clients gone
