"""Passes (SPEC §14): the Privacy Pass issuer, type 1, through real sockets; RFC 9497 vectors
through the serving path; verification exactly once; nothing that links a pass to its purchase."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from voprf import p384

from anonticket.config import from_options
from anonticket.domain import ServiceToken
from anonticket.keys import DataDirError
from anonticket.passes.issuer import IssuerKeys, load_keys
from anonticket.passes.wire import Token, TokenRequest, b64url, from_b64url, token_key_id

from .conftest import get_json, post_json, reactor, running_daemon, transfer
from .webhookreceiver import Receiver

PID = "0123456789abcdef"
AMOUNT = 10_000
PRICE = 100
# RFC 9497 Appendix A.4.2, P384-SHA384, VOPRF mode.
RFC_SEED = "a3" * 32
RFC_INFO = "test key"
RFC_PK = (
    "031d689686c611991b55f1a1d8f4305ccd6cb719446f660a30db61b7aa87b46acf59b7c0d4a9077b3da21c25dd"
    "482229a0"
)
RFC_VECTORS = [
    (  # BlindedElement, EvaluationElement of test vectors 1 and 2
        "02d338c05cbecb82de13d6700f09cb61190543a7b7e2c6cd4fca56887e564ea82653b27fdad383995ea6d0"
        "2cf26d0e24d9",
        "02a7bba589b3e8672aa19e8fd258de2e6aae20101c8d761246de97a6b5ee9cf105febce4327a326255a3c6"
        "04f63f600ef6",
    ),
    (
        "02f27469e059886f221be5f2cca03d2bdc61e55221721c3b3e56fc012e36d31ae5f8dc058109591556a6db"
        "d3a8c69c433b",
        "03f16f903947035400e96b7f531a38d4a07ac89a80f89d86a1bf089c525a92c7f4733729ca30c56ce78b1a"
        "b4f7d92db8b4",
    ),
]


def key_file(tmp_path: Path, seed: str = RFC_SEED, info: str = RFC_INFO) -> Path:
    path = tmp_path / "issuer.json"
    path.write_text(json.dumps({"seed": seed, "info": info}))
    path.chmod(0o600)
    return path


@asynccontextmanager
async def pass_daemon(tmp_path: Path, database: str | None = None, **extra: str):
    options: dict[str, object] = {
        "data-dir": str(tmp_path / "data"),
        "public": "tcp:0:interface=127.0.0.1",
        "internal": "tcp:0:interface=127.0.0.1",
        "no-monitor": True,
        "pass-price": str(PRICE),
        **extra,
    }
    if database is not None:
        options["database"] = database
    async with running_daemon(from_options(options, environ={}), tmp_path / "data") as daemon:
        yield daemon


async def funded_token(daemon, http, amount: int = AMOUNT) -> str:
    await daemon.store.record_transfers([transfer(PID, 1, amount=amount)], now=1)
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    assert code == 200
    return str(body["service_token"])


async def directory(daemon, http) -> tuple[bytes, dict[str, Any]]:
    response = await http.get(
        daemon.public_url + "/.well-known/private-token-issuer-directory", timeout=10
    )
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [
        b"application/private-token-issuer-directory"
    ]
    body = json.loads(await response.content())
    return from_b64url(body["token-keys"][0]["token-key"]), body


async def token_request(daemon, http, token: str, body: bytes, key: str = "buy-1", **headers):
    sent = {
        "Content-Type": "application/private-token-request",
        "Authorization": f"Bearer {token}",
        "Idempotency-Key": key,
        **headers,
    }
    response = await http.post(
        daemon.public_url + "/api/v1/passes/token-request",
        data=body,
        headers={k: v for k, v in sent.items() if v is not None},
        timeout=10,
    )
    return response.code, await response.content(), response.headers


def blind(public_key: bytes, challenge: bytes = b"origin challenge"):
    """The client's side of one pass, with the voprf package's Client."""
    nonce = os.urandom(32)
    key_id = token_key_id(public_key)
    token_input = b"\x00\x01" + nonce + hashlib.sha256(challenge).digest() + key_id
    client, blinded = p384.Client.blind(token_input)
    request = TokenRequest(key_id[-1], blinded.serialize()).serialize()
    return client, token_input, request


def finalize(client, token_input: bytes, response: bytes, public_key: bytes) -> bytes:
    """A pass from a TokenResponse (evaluate_msg | evaluate_proof; the package wants the proof
    first), verifying the issuer's proof."""
    output = p384.VerifiableOutput.deserialize(response[49:] + response[:49])
    authenticator: bytes = client.finalize(output, p384.PublicKey.deserialize(public_key))
    return token_input + authenticator


@pytest_twisted.ensureDeferred
async def test_rfc_9497_vectors_through_the_serving_path(tmp_path, http):
    async with pass_daemon(
        tmp_path, **{"pass-key-file": str(key_file(tmp_path)), "pass-key-lifetime": "0"}
    ) as daemon:
        public_key, body = await directory(daemon, http)
        assert public_key.hex() == RFC_PK
        assert body["issuer-request-uri"] == "/api/v1/passes/token-request"
        assert "not-before" not in body["token-keys"][0]  # never rotates
        token = await funded_token(daemon, http)
        truncated = token_key_id(bytes.fromhex(RFC_PK))[-1]
        for i, (blinded, evaluated) in enumerate(RFC_VECTORS):
            request = TokenRequest(truncated, bytes.fromhex(blinded)).serialize()
            code, response, headers = await token_request(daemon, http, token, request, f"v{i}")
            assert code == 200
            assert headers.getRawHeaders(b"content-type") == [b"application/private-token-response"]
            assert len(response) == 49 + 96
            assert response[:49].hex() == evaluated


@pytest_twisted.ensureDeferred
async def test_a_pass_is_bought_once_verified_once_and_nothing_links_it_to_the_purchase(
    tmp_path, http, caplog_events
):
    receiver = Receiver()  # events are looked at too
    hook = receiver.listen()
    async with pass_daemon(tmp_path, **{"webhook-url": hook}) as daemon:
        public_key, _ = await directory(daemon, http)
        token = await funded_token(daemon, http)
        client, token_input, request = blind(public_key)
        code, response, _ = await token_request(daemon, http, token, request)
        assert code == 200
        # Retried with the same key and request: the same evaluation, charged once.
        again_code, again, headers = await token_request(daemon, http, token, request)
        assert again_code == 200 and again[:49] == response[:49]
        assert headers.getRawHeaders(b"idempotent-replayed") == [b"true"]
        _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
        assert view["balance"] == AMOUNT - PRICE
        # The same key with another request is refused, not served for free.
        _, _, other = blind(public_key)
        code, body, _ = await token_request(daemon, http, token, other)
        assert (code, json.loads(body)["code"]) == (422, "idempotency_key_reused")

        the_pass = finalize(client, token_input, response, public_key)
        verify = daemon.internal_url + "/api/v1/passes/verify"
        code, body, _ = await post_json(http, verify, {"token": b64url(the_pass)})
        assert (code, body) == (200, {"status": "valid"})
        code, body, _ = await post_json(http, verify, {"token": b64url(the_pass)})
        assert (code, body["code"]) == (409, "pass_already_used")
        forged = the_pass[:-1] + bytes([the_pass[-1] ^ 1])
        for bad in (b64url(forged), b64url(the_pass[:-1]), "!!", 5, None):
            code, body, _ = await post_json(http, verify, {"token": bad})
            assert (code, body["code"]) == (400, "invalid_pass"), bad
        # The public site verifies nothing.
        code, _, _ = await post_json(http, daemon.public_url + "/api/v1/passes/verify", {})
        assert code == 404
        ledger = await daemon.store.ledger(ServiceToken.parse(token), 10, None)
        metrics = (await (await http.get(daemon.internal_url + "/metrics")).content()).decode()
    # What a link would need: the blinded or evaluated element, the nonce, the authenticator.
    secrets = {
        "blinded": TokenRequest.parse(request).blinded,
        "evaluated": response[:49],
        "nonce": Token.parse(the_pass).nonce,
        "authenticator": Token.parse(the_pass).authenticator,
    }
    await receiver.wait_for(2)  # token.issued, token.spent
    await receiver.stop()
    events = b"\n".join(d.body for d in receiver.deliveries)
    assert [d.event["type"] for d in receiver.deliveries] == ["token.issued", "token.spent"]
    database = (tmp_path / "data" / "anonticket.sqlite3").read_bytes()
    conn = sqlite3.connect(tmp_path / "data" / "anonticket.sqlite3")
    dumped = "\n".join(conn.iterdump()).encode()
    conn.close()
    logs = "\n".join(caplog_events)
    for name, value in secrets.items():
        for form in (value, value.hex().encode(), b64url(value).encode()):
            assert form not in database and form not in dumped and form not in events, name
            assert form.decode("latin-1") not in logs and form.decode("latin-1") not in metrics
    # The ledger knows a count and a price, nothing per pass.
    spends = [(e.kind.name, e.amount, e.memo) for e in ledger if e.kind.name == "SPEND"]
    assert spends == [("SPEND", PRICE, "1 pass")]


@pytest_twisted.ensureDeferred
async def test_issuance_refuses_what_it_cannot_serve_and_charges_nothing(tmp_path, http):
    async with pass_daemon(tmp_path) as daemon:
        public_key, _ = await directory(daemon, http)
        token = await funded_token(daemon, http, amount=PRICE + 50)
        _, _, good = blind(public_key)
        cases: list[tuple[dict[str, str | None], bytes, int, str]] = [
            ({"Authorization": None}, good, 401, "token_required"),
            ({"Content-Type": "application/json"}, good, 415, "unsupported_media_type"),
            ({"Idempotency-Key": None}, good, 400, "idempotency_key_required"),
            ({}, b"\x00\x02" + good[2:], 400, "invalid_token_request"),
            ({}, good[:2] + bytes([good[2] ^ 1]) + good[3:], 400, "invalid_token_request"),
            ({}, good[:3] + b"\x05" + good[4:], 400, "invalid_token_request"),  # not a point
            ({}, good[:-1], 400, "invalid_token_request"),
            ({"Authorization": "Bearer " + "cd" * 32}, good, 404, "token_not_found"),
        ]
        for i, (headers, body, status, code) in enumerate(cases):
            got, answer, _ = await token_request(daemon, http, token, body, f"k{i}", **headers)
            assert got == status, (i, got)
            assert json.loads(answer)["code"] == code, i
        _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
        assert view["balance"] == PRICE + 50
        assert (await token_request(daemon, http, token, good, "ok"))[0] == 200
        _, _, next_one = blind(public_key)
        code, answer, _ = await token_request(daemon, http, token, next_one, "poor")
        assert (code, json.loads(answer)) == (
            409,
            {
                "error": "the balance is too low for these passes",
                "code": "insufficient_balance",
                "balance": 50,
            },
        )


@pytest_twisted.ensureDeferred
async def test_without_a_price_there_is_no_issuer(daemon, http):
    code, body, _ = await get_json(
        http, daemon.public_url + "/.well-known/private-token-issuer-directory"
    )
    assert (code, body["code"]) == (404, "passes_disabled")
    code, body, _ = await post_json(http, daemon.internal_url + "/api/v1/passes/verify", {})
    assert (code, body["code"]) == (404, "passes_disabled")
    assert not (daemon.data_dir / "pass.key").exists()


def test_keys_rotate_by_period_and_the_previous_one_verifies_for_a_grace_period():
    keys = IssuerKeys(bytes(range(32)), "k", lifetime=100)
    first = keys.current(150)
    assert (first.period, first.not_before) == (1, 100)
    assert [k.period for k in keys.accepted(150)] == [1, 0]
    second = keys.current(250)
    assert second.public_key != first.public_key
    assert [k.period for k in keys.accepted(250)] == [2, 1]  # first still verifies
    assert first.key_id not in [k.key_id for k in keys.accepted(350)]  # grace over
    # The same seed gives every node the same keys.
    assert IssuerKeys(bytes(range(32)), "k", lifetime=100).current(250).public_key == (
        second.public_key
    )
    # A pass made under the first key verifies in its grace period and not after.
    client, token_input, request = blind(first.public_key)
    response = first.evaluate(TokenRequest.parse(request).blinded)
    the_pass = Token.parse(finalize(client, token_input, response, first.public_key))
    assert any(k.verifies(the_pass.input, the_pass.authenticator) for k in keys.accepted(250))
    assert not any(k.verifies(the_pass.input, the_pass.authenticator) for k in keys.accepted(350))


def test_key_files(tmp_path):
    made = load_keys(tmp_path, None, 0)
    assert (tmp_path / "pass.key").stat().st_mode & 0o077 == 0
    assert load_keys(tmp_path, None, 0).current(0).public_key == made.current(0).public_key
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"sk": "11" * 48}))
    raw.chmod(0o600)
    with pytest.raises(DataDirError, match="raw scalar"):
        load_keys(tmp_path, raw, 0)
    for bad in ({"seed": "ab", "info": "x"}, {"seed": "zz" * 32, "info": "x"}, [1], {"info": 1}):
        raw.write_text(json.dumps(bad))
        with pytest.raises(DataDirError, match="expected JSON"):
            load_keys(tmp_path, raw, 0)
    raw.chmod(0o644)
    with pytest.raises(DataDirError, match="other users"):
        load_keys(tmp_path, raw, 0)


@pytest_twisted.ensureDeferred
async def test_a_pass_is_used_once_across_two_nodes(pg_server, tmp_path):
    from anonticket.store import Store

    url = pg_server.new_database()
    nodes = [Store(reactor, url, tmp_path) for _ in range(2)]
    for node in nodes:
        node.open()
    try:
        nonce, key_id = os.urandom(32), os.urandom(32)
        results = await gatherResults(
            [nodes[i % 2].use_pass(nonce, key_id, 0, 5) for i in range(16)]
        )
        assert results.count(True) == 1
    finally:
        for node in nodes:
            node.close()


@pytest_twisted.ensureDeferred
async def test_used_passes_of_expired_keys_are_forgotten(store):
    old, current = (os.urandom(32), os.urandom(32)), (os.urandom(32), os.urandom(32))
    assert await store.use_pass(*old, 0, 5) and await store.use_pass(*current, 2, 5)
    assert await store.purge_used_passes(1) == 1
    assert not await store.use_pass(*current, 2, 6)  # still remembered


@pytest_twisted.ensureDeferred
async def test_a_batch_of_passes_is_one_purchase(database_url, tmp_path, http):
    async with pass_daemon(tmp_path, database_url) as daemon:
        public_key, _ = await directory(daemon, http)
        token = await funded_token(daemon, http, amount=150 * PRICE)
        made = [blind(public_key) for _ in range(100)]
        body = {"requests": [b64url(request) for _, _, request in made]}
        assert len(json.dumps(body)) > 4096  # more than other sites take, less than 8192
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "batch-1"}
        url = daemon.public_url + "/api/v1/passes"
        code, answer, _ = await post_json(http, url, body, headers)
        assert code == 200 and answer["balance"] == 50 * PRICE
        passes = [
            finalize(client, token_input, from_b64url(response), public_key)
            for (client, token_input, _), response in zip(made, answer["responses"], strict=True)
        ]
        code, again, replayed = await post_json(http, url, body, headers)
        assert code == 200 and again["balance"] == 50 * PRICE
        assert replayed.getRawHeaders(b"idempotent-replayed") == [b"true"]
        verify = daemon.internal_url + "/api/v1/passes/verify"
        for the_pass in passes[:3]:
            assert (await post_json(http, verify, {"token": b64url(the_pass)}))[0] == 200
        bad_bodies: list[dict[str, object]] = [
            {"requests": []},
            {"requests": ["AA"]},
            {"requests": "x"},
            {},
        ]
        for bad in bad_bodies:
            code, answer, _ = await post_json(http, url, bad, {**headers, "Idempotency-Key": "b"})
            assert code == 400, bad
        too_many = {"requests": body["requests"] + body["requests"][:1]}
        code, answer, _ = await post_json(http, url, too_many, {**headers, "Idempotency-Key": "c"})
        assert (code, answer["code"]) == (400, "invalid_request")
        _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
        assert view["balance"] == 50 * PRICE
        ledger = await daemon.store.ledger(ServiceToken.parse(token), 10, None)
        assert [(e.amount, e.memo) for e in ledger if e.kind.name == "SPEND"] == [
            (100 * PRICE, "100 passes")
        ]


@pytest_twisted.ensureDeferred
async def test_the_client_buys_checks_stores_and_uses_passes(tmp_path, http):
    import io

    from anonticket.client import run

    async def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, list(argv), out, err)
        return code, out.getvalue(), err.getvalue()

    store = tmp_path / "me" / "passes.json"
    async with pass_daemon(tmp_path) as daemon:
        token = await funded_token(daemon, http, amount=150 * PRICE)
        url = ["--url", daemon.public_url, "--store", str(store)]
        code, out, err = await cli("passes", "buy", token, "--count", "120", *url)
        assert (code, err) == (0, ""), err
        fields = dict(line.split(":", 1) for line in out.splitlines())
        assert fields["passes bought"].strip() == "120"
        assert fields["balance"].strip().startswith(f"{30 * PRICE} atomic units")
        assert store.stat().st_mode & 0o077 == 0 and store.parent.stat().st_mode & 0o077 == 0
        _, view, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
        assert view["balance"] == 30 * PRICE  # two purchases: 100 and 20
        # Each pass is used once locally and verifies once at the service.
        verify = daemon.internal_url + "/api/v1/passes/verify"
        seen = set()
        for _ in range(3):
            code, out, _ = await cli("passes", "use", "--store", str(store))
            assert code == 0 and out.startswith('PrivateToken token="')
            value = out.strip()[len('PrivateToken token="') : -1]
            assert value not in seen
            seen.add(value)
            assert (await post_json(http, verify, {"token": value}))[0] == 200
        code, out, err = await cli("passes", "buy", token, "--count", "31", *url)
        assert code == 1 and "balance is too low" in err
        stored = json.loads(store.read_text())
        assert len(stored["passes"]) == 120
        assert sum(1 for p in stored["passes"] if p["used"]) == 3
    empty = tmp_path / "empty.json"
    code, _, err = await cli("passes", "use", "--store", str(empty))
    assert code == 4 and "no unused pass" in err


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_keys_and_each_pass_verifies_once_across_them(
    pg_server, tmp_path, http
):
    """Two daemons on one PostgreSQL with one --pass-key-file (and secret.key): a pass bought on
    one verifies on the other, once for both."""
    import shutil

    url = pg_server.new_database()
    keys = str(key_file(tmp_path, seed="5c" * 32, info="two nodes"))
    async with pass_daemon(tmp_path / "a", url, **{"pass-key-file": keys}) as first:
        (tmp_path / "b" / "data").mkdir(parents=True, mode=0o700)
        shutil.copy(tmp_path / "a" / "data" / "secret.key", tmp_path / "b" / "data")
        async with pass_daemon(tmp_path / "b", url, **{"pass-key-file": keys}) as second:
            key_a, _ = await directory(first, http)
            key_b, _ = await directory(second, http)
            assert key_a == key_b
            token = await funded_token(first, http)
            client, token_input, request = blind(key_a)
            code, response, _ = await token_request(second, http, token, request)
            assert code == 200
            the_pass = b64url(finalize(client, token_input, response, key_a))
            answers = []
            for node in (first, second, first):
                code, _, _ = await post_json(
                    http, node.internal_url + "/api/v1/passes/verify", {"token": the_pass}
                )
                answers.append(code)
            assert answers == [200, 409, 409]
