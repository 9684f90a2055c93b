"""WalletClient against an in-process fake monero-wallet-rpc on a real loopback socket.

The fake is only for faults and protocol details a real wallet will not produce on demand; its
Digest side follows epee (contrib/epee/src/http_auth.cpp): realm monero-rpc, qop=auth, one nonce
per TCP connection, `nc` must equal the server's own counter, otherwise 401 with a new nonce
(stale=true when the password was right).
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.guard import DigestCredentialFactory, HTTPAuthSessionWrapper
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from anonticket.wallet import WalletClient, WalletError

from .fakewallet import (
    PASSWORD,
    USER,
    Action,
    EpeeDigest,
    Fake,
    FakeWallet,
    TrackingSite,
    _listen,
    _shutdown,
    big,
    declare_huge,
    drop,
    failure_of,
    raw,
    reactor,
    reply,
    silent,
    sleep,
    stall_after_headers,
    status,
)


def _client_side_delayed_calls() -> list[Any]:
    """Delayed calls scheduled by the client stack (a leftover would be a dirty reactor)."""
    suspects = ("twisted.web.client", "twisted.web._newclient", "treq", "anonticket", "defer")
    return [
        call
        for call in reactor.getDelayedCalls()
        if any(s in getattr(call.func, "__module__", "") for s in suspects)
    ]


# --- plain JSON-RPC -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_posts_json_rpc_envelope_and_returns_result(fake: Fake) -> None:
    fake.wallet.script = [reply({"balance": 7})]
    client = fake.client()
    assert await client.call("get_balance", {"account_index": 0}) == {"balance": 7}
    assert await client.call("get_version") == {"height": 42}
    assert fake.wallet.received == [
        {"jsonrpc": "2.0", "id": "0", "method": "get_balance", "params": {"account_index": 0}},
        {"jsonrpc": "2.0", "id": "0", "method": "get_version", "params": {}},
    ]
    assert fake.wallet.content_types == ["application/json"] * 2
    assert len(fake.site.connections) == 1  # the keep-alive connection was reused


@pytest_twisted.ensureDeferred
async def test_get_height_validates(fake: Fake) -> None:
    client = fake.client()
    fake.wallet.script = [reply({"height": 0}), reply({"height": 123456})]
    assert await client.get_height() == 0
    assert await client.get_height() == 123456
    for bad in ({"height": -1}, {"height": "5"}, {"height": True}, {"height": 1.5}, {}):
        fake.wallet.script = [reply(bad)]
        error = await failure_of(client.get_height())
        assert error.kind == "bad_response" and error.code is None


@pytest_twisted.ensureDeferred
async def test_get_transfers_sends_params_and_concatenates_in_and_pool(fake: Fake) -> None:
    client = fake.client()
    incoming = [{"txid": "a", "type": "in"}, {"txid": "b", "type": "in"}]
    pooled = [{"txid": "c", "type": "pool"}]
    fake.wallet.script = [
        reply({"in": incoming, "pool": pooled}),
        reply({"pool": pooled}),
        reply({}),
    ]
    assert await client.get_transfers(100, 200) == incoming + pooled
    assert await client.get_transfers(5, 6) == pooled
    assert await client.get_transfers(0, 0) == []
    assert fake.wallet.received[0] == {
        "jsonrpc": "2.0",
        "id": "0",
        "method": "get_transfers",
        "params": {
            "in": True,
            "pool": True,
            "filter_by_height": True,
            "min_height": 100,
            "max_height": 200,
        },
    }
    for bad in ({"in": {"txid": "a"}}, {"pool": "x"}, {"in": [1]}):
        fake.wallet.script = [reply(bad)]
        assert (await failure_of(client.get_transfers(1, 2))).kind == "bad_response"


@pytest_twisted.ensureDeferred
async def test_refresh_returns_result(fake: Fake) -> None:
    fake.wallet.script = [reply({"blocks_fetched": 3, "received_money": False})]
    assert await fake.client().refresh() == {"blocks_fetched": 3, "received_money": False}
    assert fake.wallet.received[0]["method"] == "refresh"


@pytest_twisted.ensureDeferred
async def test_rpc_error_carries_code_and_short_message(fake: Fake) -> None:
    client = fake.client()
    fake.wallet.script = [reply(error={"code": -13, "message": "No wallet file"})]
    error = await failure_of(client.call("get_transfers"))
    assert (error.kind, error.code) == ("rpc_error", -13)
    assert "No wallet file" in str(error)
    fake.wallet.script = [reply(error={"code": -1, "message": "y" * 5000})]
    error = await failure_of(client.call("get_transfers"))
    assert error.kind == "rpc_error" and len(str(error)) < 200 and "y" * 100 in str(error)


@pytest_twisted.ensureDeferred
async def test_http_error_status(fake: Fake) -> None:
    client = fake.client()
    fake.wallet.script = [status(500)]
    error = await failure_of(client.call("get_height"))
    assert error.kind == "http_error" and "500" in str(error)
    assert "server error page" not in str(error)
    assert await client.get_height() == 42  # the connection stayed usable


@pytest.mark.parametrize(
    "body",
    [b"\x00\xffgarbage" * 50, b"[1, 2]", b'{"result": [1]}', b'{"id": "0"}', b"[" * 100000],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies(fake: Fake, body: bytes) -> None:
    fake.wallet.script = [raw(body)]
    error = await failure_of(fake.client().call("get_height"))
    assert error.kind == "bad_response"
    assert len(str(error)) < 200 and "garbage" not in str(error)


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_unreachable() -> None:
    port = await _listen(Site(Resource()))
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    client = WalletClient(reactor, url, timeout=5)
    try:
        error = await failure_of(client.get_height())
    finally:
        await client.close()
    assert error.kind == "unreachable"


def test_rejects_non_http_urls() -> None:
    for url in ("ftp://127.0.0.1:1", "127.0.0.1:18083", "http://"):
        with pytest.raises(ValueError):
            WalletClient(reactor, url)


# --- timeouts, body bound, retries ----------------------------------------------------------


@pytest.mark.parametrize("action", [stall_after_headers, silent])
@pytest_twisted.ensureDeferred
async def test_timeout_covers_whole_call_and_leaves_nothing_pending(
    fake: Fake, action: Action
) -> None:
    fake.wallet.script = [action]
    client = fake.client(timeout=0.5)
    started = reactor.seconds()
    error = await failure_of(client.get_height())
    elapsed = reactor.seconds() - started
    assert error.kind == "timeout" and 0.45 <= elapsed < 2.0
    await sleep(0.05)
    assert fake.site.open_connections() == []  # the client aborted the stuck connection
    assert _client_side_delayed_calls() == []
    assert await client.get_height() == 42  # and a fresh connection works


@pytest.mark.parametrize("declared", [True, False])
@pytest_twisted.ensureDeferred
async def test_body_over_cap_is_refused(fake: Fake, declared: bool) -> None:
    client = fake.client(max_body=1 << 20)
    fake.wallet.script = [big(900_000, declared), big(3 << 20, declared)]
    assert len((await client.call("get_transfers"))["pad"]) == 900_000
    error = await failure_of(client.call("get_transfers"))
    assert error.kind == "bad_response" and "body over" in str(error)
    await sleep(0.05)
    assert fake.site.open_connections() == []
    assert await client.get_height() == 42


@pytest_twisted.ensureDeferred
async def test_declared_length_over_cap_is_refused_before_reading(fake: Fake) -> None:
    fake.wallet.script = [declare_huge]
    client = fake.client(timeout=5)
    started = reactor.seconds()
    error = await failure_of(client.get_transfers(0, 1))
    assert error.kind == "bad_response" and reactor.seconds() - started < 1
    await sleep(0.05)
    assert fake.site.open_connections() == []


@pytest_twisted.ensureDeferred
async def test_large_body_under_default_cap(fake: Fake) -> None:
    entries = [{"txid": f"{i:064x}", "amount": i, "type": "in"} for i in range(40_000)]
    fake.wallet.script = [reply({"in": entries})]
    assert await fake.client().get_transfers(0, 10) == entries


@pytest_twisted.ensureDeferred
async def test_retries_once_when_the_server_closed_the_connection(fake: Fake) -> None:
    client = fake.client()
    fake.wallet.script = [reply({"height": 1}), drop, reply({"height": 2})]
    assert await client.get_height() == 1
    assert await client.get_height() == 2
    assert [r["method"] for r in fake.wallet.received] == ["get_height"] * 3
    assert len(fake.site.connections) == 2


@pytest_twisted.ensureDeferred
async def test_idle_connection_closed_by_server_is_replaced(fake: Fake) -> None:
    client = fake.client()
    assert await client.get_height() == 42
    for protocol in fake.site.open_connections():
        protocol.transport.loseConnection()  # what an idle timeout on the server does
    await sleep(0.05)
    assert await client.get_height() == 42
    assert len(fake.site.connections) == 2


@pytest_twisted.ensureDeferred
async def test_retries_only_once(fake: Fake) -> None:
    fake.wallet.script = [drop, drop, reply({"height": 3})]
    error = await failure_of(fake.client().get_height())
    assert error.kind == "unreachable"
    assert len(fake.wallet.received) == 2


# --- HTTP Digest ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(("MD5",), "MD5"), (("SHA-256", "MD5"), "SHA-256"), (("MD5", "SHA-256"), "SHA-256")],
)
@pytest_twisted.ensureDeferred
async def test_digest_algorithms_and_nc_counting(
    fake: Fake, offered: tuple[str, ...], chosen: str
) -> None:
    fake.wallet.auth = auth = EpeeDigest(USER, PASSWORD, offered)
    client = fake.client(login=(USER, PASSWORD))
    for _ in range(4):
        assert await client.get_height() == 42
    assert auth.challenges == [False]  # one challenge, then one round trip per call
    nonce = auth.accepted[0][1]
    assert auth.accepted == [(chosen, nonce, nc) for nc in (1, 2, 3, 4)]
    assert len(fake.site.connections) == 1


@pytest_twisted.ensureDeferred
async def test_digest_md5_sess_only(fake: Fake) -> None:
    fake.wallet.auth = auth = EpeeDigest(USER, PASSWORD, ("MD5",))
    original = auth.check

    def sess_only(request: Request) -> bool:
        ok = original(request)
        if not ok:  # drop the plain-MD5 challenge
            headers = request.responseHeaders.getRawHeaders("WWW-authenticate", [])
            sess = [h for h in headers if "MD5-sess" in h]
            request.responseHeaders.setRawHeaders("WWW-authenticate", sess)
        return ok

    auth.check = sess_only  # type: ignore[method-assign]
    client = fake.client(login=(USER, PASSWORD))
    assert await client.get_height() == 42
    assert await client.get_height() == 42
    assert [a[0] for a in auth.accepted] == ["MD5-sess", "MD5-sess"]


@pytest_twisted.ensureDeferred
async def test_stale_nonce_is_recovered_transparently(fake: Fake) -> None:
    fake.wallet.auth = auth = EpeeDigest(USER, PASSWORD)
    client = fake.client(login=(USER, PASSWORD))
    assert await client.get_height() == 42
    auth.expire_nonces()
    assert await client.get_height() == 42
    assert await client.get_height() == 42
    assert auth.challenges == [False, True]
    assert [a[2] for a in auth.accepted] == [1, 1, 2]  # nc restarts on the new nonce
    assert len({a[1] for a in auth.accepted}) == 2


@pytest_twisted.ensureDeferred
async def test_digest_survives_a_new_connection(fake: Fake) -> None:
    # epee keeps the nonce per TCP connection: a replacement connection gets a stale 401 first.
    fake.wallet.auth = auth = EpeeDigest(USER, PASSWORD)
    client = fake.client(login=(USER, PASSWORD))
    fake.wallet.script = [reply({"height": 1}), drop, reply({"height": 2})]
    assert await client.get_height() == 1
    assert await client.get_height() == 2
    assert auth.challenges == [False, True]
    assert len(fake.site.connections) == 2


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_auth_error_without_the_password(fake: Fake) -> None:
    fake.wallet.auth = auth = EpeeDigest(USER, PASSWORD)
    secret = "wrong-Pa55-" + secrets.token_hex(4)
    client = fake.client(login=(USER, secret))
    error = await failure_of(client.get_height())
    assert error.kind == "auth" and error.code is None
    for text in (str(error), repr(error), error.message, repr(error.__cause__)):
        assert secret not in text and PASSWORD not in text
    assert auth.challenges == [False, False]  # one retry, then give up
    assert fake.wallet.received == []


@pytest_twisted.ensureDeferred
async def test_401_without_login_or_usable_challenge_is_auth_error(fake: Fake) -> None:
    fake.wallet.auth = EpeeDigest(USER, PASSWORD)
    assert (await failure_of(fake.client().get_height())).kind == "auth"
    fake.wallet.auth = None
    fake.wallet.script = [status(401)]  # 401 without any Digest challenge
    error = await failure_of(fake.client(login=(USER, PASSWORD)).get_height())
    assert error.kind == "auth"


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_are_serialized(fake: Fake) -> None:
    fake.wallet.auth = auth = EpeeDigest(USER, PASSWORD, ("SHA-256", "MD5"))
    client = fake.client(login=(USER, PASSWORD))
    calls = [Deferred.fromCoroutine(client.get_height()) for _ in range(20)]
    assert await gatherResults(calls) == [42] * 20
    assert auth.challenges == [False]
    assert [a[2] for a in auth.accepted] == list(range(1, 21))
    assert len(fake.site.connections) == 1


@pytest_twisted.ensureDeferred
async def test_timeout_releases_the_auth_lock(fake: Fake) -> None:
    fake.wallet.auth = EpeeDigest(USER, PASSWORD)
    client = fake.client(login=(USER, PASSWORD), timeout=0.5)
    fake.wallet.script = [stall_after_headers]
    first = Deferred.fromCoroutine(client.get_height())
    # The timeout bounds the whole call, waiting for the lock included.
    queued = Deferred.fromCoroutine(client.get_height())
    for call in (first, queued):
        with pytest.raises(WalletError) as info:
            await call
        assert info.value.kind == "timeout"
    assert await client.get_height() == 42
    assert await client.get_height() == 42


@implementer(IRealm)
class _Realm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return IResource, FakeWallet(), lambda: None


@pytest_twisted.ensureDeferred
async def test_digest_against_twisted_server_side_implementation() -> None:
    # An independent check of the formulas (and of `opaque`), with Twisted's own server side.
    checker = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
    portal = Portal(_Realm(), [checker])
    guarded = HTTPAuthSessionWrapper(portal, [DigestCredentialFactory("md5", b"monero-rpc")])
    site = TrackingSite(guarded)
    port = await _listen(site)
    f = Fake(FakeWallet(), site, f"http://127.0.0.1:{port.getHost().port}", [])
    try:
        client = f.client(login=(USER, PASSWORD))
        assert await client.get_height() == 42
        assert await client.get_height() == 42
        error = await failure_of(f.client(login=(USER, "nope")).get_height())
        assert error.kind == "auth"
    finally:
        await _shutdown(f, port)
