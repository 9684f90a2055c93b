"""The public site through a real listening socket on 127.0.0.1, with treq."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from anonticket.domain import PID_ALL_ZERO, PID_LEGACY
from anonticket.store.records import PaymentStatus

from .conftest import get_json, post_json, reactor, transfer
from .rawhttp import parse_response, raw_request

PID = "0123456789abcdef"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def redeem(http, daemon, body):
    return await post_json(http, daemon.public_url + "/api/v1/redeem", body)


@pytest_twisted.ensureDeferred
async def test_redeem_success_then_already_claimed_then_status(daemon, http):
    await daemon.store.record_transfers([transfer(PID, 1, amount=4242)], now=1)
    code, body, headers = await redeem(http, daemon, {"pid": PID.upper()})
    assert code == 200 and body["status"] == "success" and body["balance"] == 4242
    assert re.fullmatch("[0-9a-f]{64}", body["service_token"])
    assert headers.getRawHeaders("content-type") == ["application/json"]
    code, again, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 200 and again == {**body, "status": "already_claimed"}
    code, status, _ = await get_json(
        http, f"{daemon.public_url}/api/v1/token/{body['service_token']}"
    )
    assert code == 200
    assert status["status"] == "active" and status["balance"] == 4242
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["issued_at"])
    assert status["revoked_at"] is None
    assert "abuse_score" not in status and "revoke_reason" not in status


@pytest_twisted.ensureDeferred
async def test_a_token_whose_payment_the_chain_took_back_reads_suspended(daemon, http):
    await daemon.store.record_transfers([transfer(PID, 1, amount=4242, height=100)], now=1)
    _, body, _ = await redeem(http, daemon, {"pid": PID})
    url = f"{daemon.public_url}/api/v1/token/{body['service_token']}"
    assert (await get_json(http, url))[1]["status"] == "active"  # now in the token answers
    # A double spend: the wallet's full report of heights (90, 110] no longer has it.
    await daemon.store.record_transfers([], now=2, recheck=(90, 110))
    code, status, _ = await get_json(http, url)
    assert code == 200 and (status["status"], status["balance"]) == ("suspended", 0)
    code, again, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 200 and (again["status"], again["balance"]) == ("already_claimed", 0)
    lookups = daemon.metrics.registry.get_sample_value
    assert lookups("anonticket_token_lookups_total", {"outcome": "suspended"}) == 1
    # Mined and confirmed again: active with its balance, the same token.
    await daemon.store.record_transfers([transfer(PID, 1, amount=4242, height=105)], now=3)
    code, status, _ = await get_json(http, url)
    assert (status["status"], status["balance"]) == ("active", 4242)


@pytest_twisted.ensureDeferred
async def test_pending_is_202_with_confirmations(daemon, http):
    await daemon.store.record_transfers(
        [transfer(PID, 1, height=100, status=PaymentStatus.PENDING)], now=1, wallet_height=104
    )
    code, body, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 202 and body == {"status": "pending", "confirmations": 4, "required": 10}


@pytest_twisted.ensureDeferred
async def test_pool_payment_is_pending_with_zero_confirmations(daemon, http):
    await daemon.store.record_transfers(
        [transfer(PID, 1, height=0, status=PaymentStatus.PENDING)], now=1, wallet_height=104
    )
    code, body, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 202 and body["confirmations"] == 0


@pytest_twisted.ensureDeferred
async def test_unknown_pid_is_404_and_a_recorded_payment_shows_at_once(daemon, http):
    code, body, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 404 and body == {"error": "payment not found", "code": "payment_not_found"}
    # Within the negative cache's window, a payment the monitor records must still be seen.
    await daemon.store.record_transfers([transfer(PID, 1, amount=5)], now=1)
    code, body, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 200 and body["status"] == "success"


@pytest_twisted.ensureDeferred
async def test_a_filter_false_positive_is_answered_by_the_negative_cache(daemon, http):
    """An unknown PID is answered by the PID filter; one the filter lets through by mistake
    costs one database trip, then the negative cache answers its repeats."""
    store = daemon.store
    trips: list[object] = []
    run = store._run

    def counted(fn, *args):
        trips.append(fn)
        return run(fn, *args)

    store._run = counted
    for _ in range(3):
        code, _, _ = await redeem(http, daemon, {"pid": PID})
        assert code == 404
    assert trips == [] and daemon.metrics.negative_cache_hits._value.get() == 0
    store._known.add(store.tagger.pid_tag(bytes.fromhex(PID)))  # a false positive
    for _ in range(3):
        code, body, _ = await redeem(http, daemon, {"pid": PID})
        assert code == 404 and body["code"] == "payment_not_found"
    assert len(trips) == 1
    assert daemon.metrics.negative_cache_hits._value.get() == 2


@pytest_twisted.ensureDeferred
async def test_dust_only_pid_gets_its_own_404(daemon, http):
    await daemon.store.record_transfers([transfer(PID, 1, status=PaymentStatus.DUST)], now=1)
    code, body, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 404 and body["code"] == "below_minimum"


@pytest.mark.parametrize(
    ("body", "code", "error_code"),
    [
        ({"pid": "0" * 16}, 400, "invalid_pid"),
        ({"pid": "ab" * 32}, 400, "invalid_pid"),
        ({"pid": "xyz"}, 400, "invalid_pid"),
        ({"pid": 12345}, 400, "invalid_pid"),
        ({"pid": None}, 400, "invalid_pid"),
        ({}, 400, "invalid_pid"),
        ([PID], 400, "invalid_request"),
        ("0123456789abcdef", 400, "invalid_request"),
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"pid": NaN}', 400, "invalid_json"),
        (b"\xff\xfe{}", 400, "invalid_json"),
        (b"[" * 3000, 400, "invalid_json"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_are_json_400s(daemon, http, body, code, error_code):
    got_code, got, headers = await redeem(http, daemon, body)
    assert (got_code, got["code"]) == (code, error_code)
    assert isinstance(got["error"], str) and got["error"]
    assert headers.getRawHeaders("content-type") == ["application/json"]


@pytest_twisted.ensureDeferred
async def test_all_zero_and_legacy_pids_have_distinct_messages(daemon, http):
    _, zero, _ = await redeem(http, daemon, {"pid": "0" * 16})
    _, legacy, _ = await redeem(http, daemon, {"pid": "ab" * 32})
    assert zero["error"] == PID_ALL_ZERO and legacy["error"] == PID_LEGACY


@pytest_twisted.ensureDeferred
async def test_wrong_content_type_is_415(daemon, http):
    response = await http.post(
        daemon.public_url + "/api/v1/redeem",
        data=b"pid=0123456789abcdef",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert response.code == 415
    assert (await response.json())["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("token", "code", "error_code"),
    [
        ("ab" * 32, 404, "token_not_found"),
        ("ab" * 31, 400, "invalid_token"),
        ("zz" * 32, 400, "invalid_token"),
        ("%FF" * 5, 400, "bad_request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_token_errors(daemon, http, token, code, error_code):
    got_code, body, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert (got_code, body["code"]) == (code, error_code)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/api/v1/redeem", "POST"),
        ("PUT", "/api/v1/redeem", "POST"),
        ("DELETE", "/api/v1/token/" + "ab" * 32, "GET, HEAD"),
        ("POST", "/api/v1/token/" + "ab" * 32, "GET, HEAD"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(daemon, http, method, path, allow):
    response = await http.request(method, daemon.public_url + path, timeout=10)
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == [allow]
    assert (await response.json())["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/metrics",
        "/healthz",
        "/api/v1/redeem/",
        "/api/v1/token/",
        "/api/v1/token/" + "ab" * 32 + "/revoke",
        "/api/v2/redeem",
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_internal_routes_are_404_on_the_public_site(daemon, http, path):
    for method in ("GET", "POST"):
        response = await http.request(
            method,
            daemon.public_url + path,
            data=b"{}",
            timeout=10,
            headers={"Content-Type": "application/json"},
        )
        assert response.code == 404, (method, path)
        assert (await response.json()) == {"error": "not found", "code": "not_found"}


@pytest_twisted.ensureDeferred
async def test_no_server_header_and_no_access_log(daemon, http, caplog_events):
    await daemon.store.record_transfers([transfer(PID, 9)], now=1)
    response = await http.post(
        daemon.public_url + "/api/v1/redeem",
        data=json.dumps({"pid": PID}).encode(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    token = (await response.json())["service_token"]
    assert response.headers.getRawHeaders("server") is None
    await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    text = "\n".join(caplog_events)
    assert PID not in text and token not in text
    assert "/api/v1" not in text and "127.0.0.1" not in text


@pytest_twisted.ensureDeferred
async def test_body_over_4k_is_413_before_it_is_read(daemon):
    body = b'{"pid": "' + b"a" * 8000 + b'"}'
    raw = await raw_request(
        reactor,
        port_of(daemon.public_url),
        b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body),
        body,
    )
    code, headers, payload = parse_response(raw)
    assert code == 413 and headers["content-type"] == "application/json"
    assert json.loads(payload)["code"] == "body_too_large"


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_4k_is_413(daemon):
    chunk = b"a" * 3000
    raw = await raw_request(
        reactor,
        port_of(daemon.public_url),
        b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"%x\r\n%s\r\n" % (len(chunk), chunk),
        b"%x\r\n%s\r\n" % (len(chunk), chunk),
        b"0\r\n\r\n",
    )
    code, _, payload = parse_response(raw)
    assert code == 413 and json.loads(payload)["code"] == "body_too_large"


@pytest_twisted.ensureDeferred
async def test_expect_continue_gets_413_and_no_100(daemon):
    raw = await raw_request(
        reactor,
        port_of(daemon.public_url),
        b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 1000000\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in raw


@pytest_twisted.ensureDeferred
async def test_body_of_exactly_4k_is_accepted(daemon):
    body = json.dumps({"pid": PID, "pad": "x" * (4096 - 38)}).encode()
    assert len(body) == 4096
    raw = await raw_request(
        reactor,
        port_of(daemon.public_url),
        b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    code, _, payload = parse_response(raw)
    assert code == 404 and json.loads(payload)["code"] == "payment_not_found"


@pytest_twisted.ensureDeferred
async def test_malformed_http_gets_a_json_400(daemon):
    raw = await raw_request(reactor, port_of(daemon.public_url), b"BLAH\r\n\r\n")
    code, _, payload = parse_response(raw)
    assert code == 400 and json.loads(payload)["code"] == "bad_request"


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_request_does_no_harm(daemon, http):
    await raw_request(
        reactor,
        port_of(daemon.public_url),
        b'POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"pid"',
        hangup=True,
    )
    code, _, _ = await redeem(http, daemon, {"pid": PID})
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_many_404s_do_not_grow_memory(daemon, http):
    """Regression: re-raising one shared exception chained every request's traceback onto it
    (8-9 KB per 404, found by bench/)."""
    import random
    import tracemalloc

    rng = random.Random(1)

    async def unknowns(n):
        for _ in range(n):
            pid = rng.randbytes(8).hex()
            code, _, _ = await redeem(http, daemon, {"pid": pid})
            assert code == 404

    await unknowns(50)  # warm up caches and pools
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await unknowns(400)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 1_000_000, f"{grown} bytes kept after 400 answers"


@pytest_twisted.ensureDeferred
async def test_a_surge_is_refused_at_admission_while_memory_answers_go_on(tmp_path, http):
    """With --admission-limit 3 and the database held (a lock another process keeps), the 4th
    request that needs the database is answered 503 overloaded at once; answers from memory
    (an unknown PID, a settled one) are never refused; the admitted ones finish when the
    database is back."""
    from anonticket.metrics import Metrics
    from anonticket.tap import build

    from .conftest import _url, daemon_config

    metrics = Metrics()
    root = build(daemon_config(tmp_path, **{"admission-limit": "3"}), reactor, metrics)
    root.startService()
    try:
        store = root.getServiceNamed("store").store
        url = _url(root.getServiceNamed("public-site")) + "/api/v1/redeem"
        settled, waiting = "00000000000000aa", [f"00000000000000{i:02x}" for i in range(1, 7)]
        await store.record_transfers(
            [transfer(settled, 99)] + [transfer(p, i) for i, p in enumerate(waiting, 1)], now=1
        )
        assert (await post_json(http, url, {"pid": settled}))[0] == 200
        assert (await post_json(http, url, {"pid": settled}))[0] == 200  # now from memory
        lock = sqlite3.connect(tmp_path / "anonticket.sqlite3", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # every write now waits (busy_timeout 5 s)
        try:
            held = [ensureDeferred(post_json(http, url, {"pid": p})) for p in waiting[:3]]
            for _ in range(500):
                if store._batcher.waiting >= 3:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            assert store._batcher.waiting == 3
            started = reactor.seconds()
            code, body, headers = await post_json(http, url, {"pid": waiting[3]})
            assert (code, body["code"]) == (503, "overloaded")
            assert headers.getRawHeaders("retry-after") == ["1"]
            token = "ab" * 32
            code, body, _ = await get_json(http, url.replace("redeem", f"token/{token}"))
            assert (code, body["code"]) == (503, "overloaded")
            assert reactor.seconds() - started < 1.0  # answered at once, not after the lock
            # From memory: never refused.
            assert (await post_json(http, url, {"pid": settled}))[0] == 200
            assert (await post_json(http, url, {"pid": "0123456789abcdef"}))[0] == 404
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        for outcome in held:
            code, body, _ = await outcome
            assert (code, body["status"]) == (200, "success")
        count = metrics.registry.get_sample_value
        assert count("anonticket_redeem_requests_total", {"outcome": "overloaded"}) == 1
        assert count("anonticket_token_lookups_total", {"outcome": "overloaded"}) == 1
    finally:
        await root.stopService()
