"""WalletClient against an in-process fake monero-wallet-rpc on a real loopback socket.

The fake is only for faults and protocol details a real wallet will not produce on demand; its
Digest side follows epee (contrib/epee/src/http_auth.cpp): realm monero-rpc, qop=auth, one nonce
per TCP connection, `nc` must equal the server's own counter, otherwise 401 with a new nonce
(stale=true when the password was right).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import secrets
import sys
import tracemalloc
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.web.guard import DigestCredentialFactory, HTTPAuthSessionWrapper
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from anonticket.jsonslices import (
    SLICE_COST,
    MalformedJson,
    TooManyEntries,
    WrongShape,
    rpc_answer,
    run_sliced,
)
from anonticket.wallet import MAX_TRANSFER_ENTRIES, WalletClient, WalletError

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
    stream,
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
    client = fake.client(max_call_body=1 << 20, max_body=2 << 20)
    fake.wallet.script = [big(900_000, declared), big(3 << 20, declared)]
    assert len((await client.call("get_balance"))["pad"]) == 900_000
    error = await failure_of(client.call("get_balance"))
    assert error.kind == "bad_response" and "body over 1048576 bytes" in str(error)
    await sleep(0.05)
    assert fake.site.open_connections() == []
    assert await client.get_height() == 42
    # Fewer heights make a get_transfers answer smaller: over its cap it is too_large.
    fake.wallet.script = [big(3 << 20, declared)]
    error = await failure_of(client.get_transfers(7, 9))
    assert error.kind == "too_large"
    assert error.message == "get_transfers: answer over 2097152 bytes for heights (7, 9]"


@pytest_twisted.ensureDeferred
async def test_declared_length_over_cap_is_refused_before_reading(fake: Fake) -> None:
    fake.wallet.script = [declare_huge, declare_huge]
    client = fake.client(timeout=5)
    started = reactor.seconds()
    assert (await failure_of(client.get_transfers(0, 1))).kind == "too_large"
    assert (await failure_of(client.get_height())).kind == "bad_response"
    assert reactor.seconds() - started < 1
    await sleep(0.05)
    assert fake.site.open_connections() == []


@pytest_twisted.ensureDeferred
async def test_large_body_under_default_cap(fake: Fake) -> None:
    # As many entries as the default limit allows, with long notes: ~24 MB.
    entries = [transfer(i, note="n" * 600) for i in range(MAX_TRANSFER_ENTRIES)]
    fake.wallet.script = [reply({"in": entries})]
    assert await fake.client(timeout=60).get_transfers(0, 10) == entries


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


# --- get_transfers: bounded work on the reactor (issue #10) ---------------------------------


def transfer(i: int, **over: Any) -> dict[str, Any]:
    """An `in` entry as monero-wallet-rpc 0.18 returns it."""
    amount = 1_500_000_000_000 + i
    entry = {
        "address": "4" + "A" * 94,
        "amount": amount,
        "amounts": [amount],
        "confirmations": 12,
        "double_spend_seen": False,
        "fee": 30_660_000,
        "height": 1000 + i // 10,
        "locked": False,
        "note": "",
        "payment_id": f"{i:016x}",
        "subaddr_index": {"major": 0, "minor": 0},
        "subaddr_indices": [{"major": 0, "minor": 0}],
        "suggested_confirmations_threshold": 1,
        "timestamp": 1_700_000_000 + i,
        "txid": f"{i:064x}",
        "type": "in",
        "unlock_time": 0,
    }
    entry.update(over)
    return entry


def envelope(result: dict[str, Any], indent: int | None = None, ascii: bool = True) -> bytes:
    document = {"id": "0", "jsonrpc": "2.0", "result": result}
    return json.dumps(document, indent=indent, ensure_ascii=ascii).encode()


@pytest_twisted.ensureDeferred
async def test_get_transfers_pool_false_and_a_normal_answer_decodes_as_before(fake: Fake) -> None:
    incoming = [
        transfer(1),
        transfer(2, note='caf\u00e9 \U0001f600 "quoted" \\ },{ \n', subaddr_indices=[{}, {}]),
        transfer(3, amounts=[1, 2, 3], extra={"nested": [[], {}, None, 1.5e300, -0, True]}),
    ]
    pooled = [transfer(4, type="pool", height=0)]
    result = {"in": incoming, "out": [transfer(9, type="out")], "pool": pooled, "x": {"y": 1}}
    client = fake.client()
    for body in (envelope(result), envelope(result, indent=2), b"\xef\xbb\xbf" + envelope(result)):
        fake.wallet.script = [raw(body)]
        assert await client.get_transfers(100, 200, pool=False) == incoming + pooled
        assert json.loads(body.removeprefix(b"\xef\xbb\xbf"))["result"]["in"] == incoming
    assert fake.wallet.received[0]["params"] == {
        "in": True,
        "pool": False,
        "filter_by_height": True,
        "min_height": 100,
        "max_height": 200,
    }


@pytest_twisted.ensureDeferred
async def test_get_transfers_shapes_and_errors_as_before(fake: Fake) -> None:
    client = fake.client()
    cases: list[tuple[bytes, str]] = [
        (b'{"result": {"in": {"txid": "a"}}}', "'in' is not a list of objects"),
        (b'{"result": {"pool": "x"}}', "'pool' is not a list of objects"),
        (b'{"result": {"in": [1]}}', "'in' is not a list of objects"),
        (b'{"result": {"in": [{}, null]}}', "'in' is not a list of objects"),
        (b'{"result": [1]}', "result is not an object"),
        (b'{"id": "0"}', "result is not an object"),
        (b"[1, 2]", "body is not a JSON-RPC object"),
        (b"\x00\xffgarbage" * 50, "body is not JSON"),
        (b'{"result": {"in": [{}]}} trailing', "body is not JSON"),
        (b'{"result": {"in": [{},]}}', "body is not JSON"),
        (b"", "body is not JSON"),
    ]
    for body, message in cases:
        fake.wallet.script = [raw(body)]
        error = await failure_of(client.get_transfers(1, 2))
        assert (error.kind, error.message) == ("bad_response", f"get_transfers: {message}")
    fake.wallet.script = [reply(error={"code": -13, "message": "No wallet file"})]
    error = await failure_of(client.get_transfers(1, 2))
    assert (error.kind, error.code, error.message) == (
        "rpc_error",
        -13,
        "get_transfers: No wallet file",
    )


@pytest_twisted.ensureDeferred
async def test_get_transfers_of_empty_objects_is_too_large_in_bounded_memory(fake: Fake) -> None:
    # What raised the daemon from 62 MB to 1.8 GB: ~20 MiB of `{}` in `in`.
    head, piece, tail = b'{"id": "0", "jsonrpc": "2.0", "result": {"in": [', b"{},", b"{}]}}"
    count = (20 << 20) // len(piece)
    fake.wallet.script = [stream(head, piece, count, tail)]
    client = fake.client(timeout=60)
    tracemalloc.start()
    try:
        error = await failure_of(client.get_transfers(10, 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.kind == "too_large"
    assert error.message == "get_transfers: more than 20000 entries for heights (10, 20]"
    # The body is held twice for a moment as it is read (chunks, then joined): ~40 MiB.
    assert peak < 100_000_000
    # What json.loads would have built, measured: the list and its dicts (~500 MB).
    body = head + piece * count + tail
    entries = json.loads(body)["result"]["in"]
    materialised = sys.getsizeof(entries) + sum(map(sys.getsizeof, entries))
    del entries, body
    assert peak * 5 < materialised, (peak, materialised)


@pytest_twisted.ensureDeferred
async def test_a_valid_answer_is_decoded_over_many_reactor_turns(fake: Fake) -> None:
    entries = [transfer(i) for i in range(15_000)]
    body = envelope({"in": entries, "pool": []})
    turns = 0

    def turn() -> None:
        nonlocal turns
        turns += 1

    # A callLater(0) chain: it runs once a reactor turn, and only between slices of decoding.
    ticker = LoopingCall(turn)
    ticker.clock = reactor
    ticker.start(0, now=False)
    try:
        answer = await run_sliced(reactor, rpc_answer(body, ("in", "pool"), 20_000))
    finally:
        ticker.stop()
    assert answer.arrays == {"in": entries, "pool": []} and answer.error is None
    # ~9 MB of entries at SLICE_COST work units (~one character each) a slice: ~40 slices.
    assert turns >= 20, turns
    # And the same answer through the client, from the wallet.
    fake.wallet.script = [raw(body)]
    assert await fake.client(timeout=60).get_transfers(0, 1) == entries


@pytest_twisted.ensureDeferred
async def test_max_entries_bounds_in_and_pool_together(fake: Fake) -> None:
    client = fake.client(max_entries=5)
    fake.wallet.script = [
        reply({"in": [transfer(i) for i in range(5)]}),
        reply({"in": [transfer(i) for i in range(3)], "pool": [transfer(i) for i in range(3)]}),
        reply({"in": [transfer(i) for i in range(6)]}),
        reply({"in": [], "out": [transfer(i) for i in range(6)]}),  # asked or not, it is work
    ]
    assert len(await client.get_transfers(1, 2)) == 5
    for _ in range(3):
        error = await failure_of(client.get_transfers(10, 20, pool=False))
        assert error.kind == "too_large"
        assert error.message == "get_transfers: more than 5 entries for heights (10, 20]"
    assert await client.get_height() == 42  # the connection is still good


@pytest.mark.parametrize("declared", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_huge_answer_to_a_small_call_is_refused_unread(fake: Fake, declared: bool) -> None:
    head, piece, tail = b'{"result": {"height": 1, "pad": [', b"{},", b"{}]}}"
    fake.wallet.script = [stream(head, piece, (64 << 20) // len(piece), tail, declared)]
    client = fake.client(timeout=30)
    tracemalloc.start()
    try:
        error = await failure_of(client.get_height())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.kind == "bad_response"
    assert error.message == "get_height: body over 65536 bytes"
    assert peak < 4_000_000  # never more than the cap and a few socket reads
    await sleep(0.05)
    assert fake.site.open_connections() == []  # the client hung up rather than read 64 MiB
    assert await client.get_height() == 42


@pytest_twisted.ensureDeferred
async def test_wallet_text_cannot_inject_log_lines(fake: Fake) -> None:
    hostile = "boom\n2026-01-01T00:00:00 [anonticket] forged\r\x1b[31m\x00\x7f\u2028\u00e9\ud800 \\"
    client = fake.client(login=(USER, PASSWORD))
    fake.wallet.script = [
        reply(error={"code": -1, "message": hostile}),
        reply(error={"code": -1, "message": hostile}),
    ]
    for call in (client.call("get_balance"), client.get_transfers(1, 2)):
        error = await failure_of(call)
        assert error.kind == "rpc_error"
        for text in (str(error), error.message):
            assert all(" " <= c <= "~" for c in text), text
        assert "boom\\n2026-01-01T00:00:00 [anonticket] forged\\r\\x1b[31m\\x00\\x7f" in str(error)
        assert "\\u2028\\xe9\\ud800 \\" in str(error)
    # Escapes count towards the clip: a message of control characters stays short.
    fake.wallet.script = [reply(error={"code": -1, "message": "\n" * 5000})]
    error = await failure_of(client.get_height())
    assert len(error.message) <= len("get_height: ") + 100
    # Any message at all, whoever built it, is escaped.
    assert WalletError("auth", "a\nb").message == "a\\nb"


# --- anonticket.jsonslices ------------------------------------------------------------------


def _walk(body: bytes, max_entries: int = 10**6, max_value: int = 65536) -> Any:
    """The answer, fully walked without a reactor: the arrays, ("error", e) or "bad"."""
    steps = rpc_answer(body, ("in", "pool"), max_entries, max_value=max_value)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        answer = done.value
    except (MalformedJson, WrongShape):
        return "bad"
    if answer.error is not None:
        return ("error", answer.error)
    return answer.arrays if answer.result_ok else "bad"


def _oracle(body: bytes) -> Any:
    """What json.loads and the former checks made of an answer."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return "bad"
    if not isinstance(document, dict):
        return "bad"
    if document.get("error") is not None:
        return ("error", document["error"])
    result = document.get("result")
    if not isinstance(result, dict):
        return "bad"
    arrays = {k: v for k, v in result.items() if k in ("in", "pool")}
    for value in arrays.values():
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            return "bad"
    return arrays


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


class _Writer:
    """Serialises JSON with random whitespace between tokens, and keeps the length of the
    longest value the walker decodes whole, to set ``max_value`` just above it."""

    def __init__(self, data: st.DataObject, ascii_only: bool) -> None:
        self._random = data.draw(st.randoms(use_true_random=False))
        self._ascii = ascii_only
        self.longest = 1

    def ws(self) -> str:
        return "".join(self._random.choices(" \t\n\r", k=self._random.choice((0, 0, 0, 1, 3))))

    def leaf(self, value: Any) -> str:
        text = self.dump(value)
        self.longest = max(self.longest, len(text))
        return text

    def dump(self, value: Any) -> str:
        if isinstance(value, dict):
            members = [
                self.ws() + self.dump(k) + self.ws() + ":" + self.ws() + self.dump(v) + self.ws()
                for k, v in value.items()
            ]
            return "{" + ",".join(members) + self.ws() + "}"
        if isinstance(value, list):
            return "[" + ",".join(self.ws() + self.dump(v) + self.ws() for v in value) + "]"
        return json.dumps(value, ensure_ascii=self._ascii)

    def obj(self, members: list[tuple[str, str]]) -> str:
        """An object walked member by member: keys are decoded whole, values are given."""
        parts = [self.ws() + self.leaf(k) + self.ws() + ":" + self.ws() + v for k, v in members]
        return "{" + ",".join(p + self.ws() for p in parts) + self.ws() + "}"

    def array(self, items: list[Any]) -> str:
        return "[" + ",".join(self.ws() + self.leaf(v) + self.ws() for v in items) + "]"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ascii_only=st.booleans(), mutate=st.booleans())
def test_jsonslices_agrees_with_json_loads(
    data: st.DataObject, ascii_only: bool, mutate: bool
) -> None:
    w = _Writer(data, ascii_only)
    entries = st.dictionaries(st.text(max_size=6), json_values, max_size=5)
    result: list[tuple[str, str]] = []
    for key in data.draw(st.lists(st.sampled_from(["in", "pool", "out", "x"]), max_size=4)):
        if key == "x":
            result.append((key, w.leaf(data.draw(json_values))))
        else:
            result.append((key, w.array(data.draw(st.lists(entries, max_size=20)))))
    envelope_members = [("id", w.leaf("0")), ("jsonrpc", w.leaf("2.0")), ("result", w.obj(result))]
    if data.draw(st.booleans()):
        envelope_members.append(("error", w.leaf(data.draw(json_values))))
    body = (w.ws() + w.obj(envelope_members) + w.ws()).encode()
    # Small windows (4 times max_value) and chunks: most entries cross a window boundary.
    max_value = w.longest
    if not mutate:
        assert _walk(body, max_value=max_value) == _oracle(body)
        return
    # A damaged body: never anything but our exceptions, and never a wrong success.
    at = data.draw(st.integers(0, len(body)))
    cut = data.draw(st.integers(0, 3))
    noise = data.draw(st.binary(max_size=3))
    body = body[:at] + noise + body[at + cut :]
    if b"\x00" in body[:4]:
        return  # json.loads would take it for UTF-16 or UTF-32
    walked = _walk(body, max_value=max_value)
    if walked != "bad":
        assert walked == _oracle(body)


def test_jsonslices_bounds() -> None:
    entry = json.dumps(transfer(1))
    body = ('{"result": {"in": [' + ",".join([entry] * 10) + "]}}").encode()
    assert _walk(body, max_value=len(entry)) == {"in": [transfer(1)] * 10}
    with pytest.raises(MalformedJson, match="over"):
        for _ in rpc_answer(body, ("in",), 100, max_value=len(entry) - 1):
            pass
    with pytest.raises(TooManyEntries):
        for _ in rpc_answer(body, ("in",), 9):
            pass
    many = ("{" + ",".join(f'"k{i}": 0' for i in range(65)) + "}").encode()
    with pytest.raises(WrongShape, match="members"):
        for _ in rpc_answer(many, ("in",), 100):
            pass
    deep = b'{"result": {"in": [{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}}"
    assert _walk(deep) == "bad"  # too deep for the decoder, or too long: either way refused
    spaces = b'{"result": {"in": [' + b" " * (3 << 20) + b"{}" + b" " * (3 << 20) + b"]}}"
    assert _walk(spaces) == {"in": [{}]}


def test_jsonslices_work_is_reported_in_small_amounts() -> None:
    # Every kind of long content reports its work as it goes, so no slice runs away.
    bodies = [
        envelope({"in": [transfer(i) for i in range(2000)]}, indent=2),
        b'{"result": {"in": [' + b"{}," * 200_000 + b"{}]}}",
        b'{"result": {"out": [' + b"[]," * 200_000 + b"[]]}}",
        b'{"result": {"in": [' + b" " * (8 << 20) + b"]}}",
        envelope(
            {"in": [transfer(i, note="\u00e9\U0001f600" * 5000) for i in range(50)]}, ascii=False
        ),
    ]
    for body in bodies:
        steps = rpc_answer(body, ("in", "pool"), 10**6)
        biggest = 0
        with contextlib.suppress(StopIteration):
            while True:
                biggest = max(biggest, next(steps))
        # The largest steps: a window of whitespace (256 Ki) or a chunk of 5,000 `{}`.
        assert 0 < biggest <= 2 * SLICE_COST, biggest


@pytest_twisted.ensureDeferred
async def test_run_sliced_can_be_cancelled_between_slices() -> None:
    # What a timeout or a shutdown does to a get_transfers call that is decoding.
    body = envelope({"in": [transfer(i) for i in range(5000)]})
    steps = rpc_answer(body, ("in",), 20_000)
    decoding = Deferred.fromCoroutine(run_sliced(reactor, steps))
    await sleep(0)
    assert not decoding.called
    decoding.cancel()
    with pytest.raises(CancelledError):
        await decoding
    # closed: the window and the entries so far are let go
    assert inspect.getgeneratorstate(steps) == inspect.GEN_CLOSED
