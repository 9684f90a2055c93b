"""The internal site: metrics, revocation, health, through real sockets."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from .conftest import get_json, post_json, reactor, transfer
from .rawhttp import raw_request

PID = "0123456789abcdef"
AMOUNT = 918273645546  # distinctive: must never show up in metrics


async def issue_token(daemon, http) -> str:
    await daemon.store.record_transfers([transfer(PID, 1, amount=AMOUNT)], now=1)
    code, body, _ = await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    assert code == 200
    token = body["service_token"]
    assert isinstance(token, str)
    return token


@pytest_twisted.ensureDeferred
async def test_revoke_then_status_shows_revoked_everywhere(daemon, http):
    token = await issue_token(daemon, http)
    url = f"{daemon.internal_url}/api/v1/token/{token}/revoke"
    code, body, headers = await post_json(http, url, {"reason": "chargeback", "abuse_score": 5})
    assert code == 200
    assert body["status"] == "revoked" and body["revoke_reason"] == "chargeback"
    assert body["abuse_score"] == 5 and body["balance"] == AMOUNT and body["revoked_at"]
    # The version the revocation made, for an If-Match on the next spend.
    assert headers.getRawHeaders("etag") == [f'"{body["version"]}"']
    code, again, _ = await post_json(http, url, {"reason": "other", "abuse_score": 1})
    assert code == 200 and again == body  # idempotent: the first revocation stands
    code, public, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert code == 200 and public["status"] == "revoked"
    assert public["revoked_at"] == body["revoked_at"]


@pytest_twisted.ensureDeferred
async def test_revoke_with_empty_body_and_without_content_type(daemon, http):
    token = await issue_token(daemon, http)
    response = await http.post(
        f"{daemon.internal_url}/api/v1/token/{token}/revoke", data=b"", timeout=10
    )
    body = await response.json()
    assert response.code == 200 and body["status"] == "revoked"
    assert body["revoke_reason"] is None and body["abuse_score"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"reason": 5},
        {"reason": "x" * 1001},
        {"abuse_score": "high"},
        {"abuse_score": True},
        {"abuse_score": 40000},
        {"abuse_score": 1.5},
        [],
    ],
)
@pytest_twisted.ensureDeferred
async def test_revoke_rejects_bad_fields(daemon, http, body):
    token = await issue_token(daemon, http)
    code, got, _ = await post_json(http, f"{daemon.internal_url}/api/v1/token/{token}/revoke", body)
    assert code == 400 and got["code"] == "invalid_request"
    _, status, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    assert status["status"] == "active"


@pytest_twisted.ensureDeferred
async def test_revoke_unknown_and_malformed_tokens(daemon, http):
    code, body, _ = await post_json(
        http, f"{daemon.internal_url}/api/v1/token/{'cd' * 32}/revoke", {}
    )
    assert (code, body["code"]) == (404, "token_not_found")
    code, body, _ = await post_json(http, f"{daemon.internal_url}/api/v1/token/abc/revoke", {})
    assert (code, body["code"]) == (400, "invalid_token")


@pytest.mark.parametrize(
    "reason", ["\ud800 lone surrogate", "a\x00nul", "bell\x07", "esc\x1b[31m", "c1\x85"]
)
@pytest_twisted.ensureDeferred
async def test_a_reason_the_database_cannot_store_is_a_400_on_both_backends(
    any_daemon, http, reason
):
    daemon = any_daemon
    token = await issue_token(daemon, http)
    url = f"{daemon.internal_url}/api/v1/token/{token}/revoke"
    code, body, _ = await post_json(http, url, {"reason": reason})
    assert (code, body["code"]) == (400, "invalid_request")
    # Nothing was stored; a plain reason (tab and newline are fine) still works.
    code, body, _ = await post_json(http, url, {"reason": "abuse\tseen\ntwice"})
    assert code == 200 and body["revoke_reason"] == "abuse\tseen\ntwice"


@pytest_twisted.ensureDeferred
async def test_revoke_needs_post(daemon, http):
    response = await http.get(f"{daemon.internal_url}/api/v1/token/{'cd' * 32}/revoke", timeout=10)
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["POST"]


@pytest_twisted.ensureDeferred
async def test_metrics_count_outcomes_without_secrets_in_labels(daemon, http):
    token = await issue_token(daemon, http)
    await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID})
    await post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": "zz"})
    await get_json(http, f"{daemon.public_url}/api/v1/token/{token}")
    await post_json(http, f"{daemon.internal_url}/api/v1/token/{token}/revoke", {})
    response = await http.get(daemon.internal_url + "/metrics", timeout=10)
    text = (await response.content()).decode()
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    for line in (
        'anonticket_redeem_requests_total{outcome="success"} 1.0',
        'anonticket_redeem_requests_total{outcome="already_claimed"} 1.0',
        'anonticket_redeem_requests_total{outcome="invalid"} 1.0',
        'anonticket_token_lookups_total{outcome="active"} 1.0',
        'anonticket_token_revocations_total{outcome="revoked"} 1.0',
        'anonticket_http_responses_total{code="400",route="redeem",site="public"} 1.0',
        # The token was checked, then revoked: both its answers are evicted (a redeem of its
        # PID now says the token is revoked).
        'anonticket_answer_cache_entries{kind="token"} 0.0',
        'anonticket_answer_cache_entries{kind="redeem"} 0.0',
    ):
        assert line in text, line
    assert 'anonticket_http_request_duration_seconds_count{route="redeem",site="public"}' in text
    assert PID not in text and token not in text and str(AMOUNT) not in text
    assert "_created" not in text


@pytest_twisted.ensureDeferred
async def test_healthz_reports_store_and_disabled_monitor(daemon, http):
    await daemon.store.record_transfers([], now=1, cursor=80, wallet_height=100)
    code, body, _ = await get_json(http, daemon.internal_url + "/healthz")
    assert code == 200
    assert body == {
        "status": "ok",
        "store": "ok",
        "monitor": "disabled",
        "wallet_height": 100,
        "cursor": 80,
        "lag": 10,
        "tor": {"state": "disabled"},  # the public site is on tcp: no onion to check
    }


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_the_store_fails(daemon, http):
    await daemon.store.record_transfers([transfer(PID, 1)], now=1)  # a PID the store must ask
    daemon.store.close()
    try:
        code, body, _ = await get_json(http, daemon.internal_url + "/healthz")
        assert code == 503 and body["status"] == "unavailable" and body["store"] == "error"
        assert "store" in body["reason"]
        # Client-facing routes answer 503 too, with no detail of the failure.
        code, redeem, headers = await post_json(
            http, daemon.public_url + "/api/v1/redeem", {"pid": PID}
        )
        assert code == 503 and redeem["code"] == "unavailable"
        assert headers.getRawHeaders("retry-after") == ["5"]
        code, lookup, _ = await get_json(http, f"{daemon.public_url}/api/v1/token/{'ab' * 32}")
        assert code == 503 and lookup["code"] == "unavailable"
        errors = daemon.metrics.registry.get_sample_value
        assert errors("anonticket_redeem_requests_total", {"outcome": "error"}) == 1
        assert errors("anonticket_token_lookups_total", {"outcome": "error"}) == 1
        assert errors("anonticket_store_errors_total", {"operation": "token_status"}) == 1
    finally:
        daemon.store.open()


@pytest_twisted.ensureDeferred
async def test_unknown_internal_path_is_json_404(daemon, http):
    code, body, _ = await get_json(http, daemon.internal_url + "/nope")
    assert code == 404 and body["code"] == "not_found"


class StubMonitor:
    """Stands in for the wallet monitor's health view (the monitor itself is tested elsewhere)."""

    poll_interval = 5.0

    def __init__(self) -> None:
        self.last: float | None = None
        self.note: str | None = None
        self.trusted: int | None = None

    def last_success(self) -> float | None:
        return self.last

    def height_note(self) -> str | None:
        return self.note

    def trusted_height(self) -> int | None:
        return self.trusted


@pytest_twisted.ensureDeferred
async def test_healthz_follows_the_monitors_last_successful_poll(store, http):
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.task import Clock

    from anonticket.metrics import Metrics
    from anonticket.web.internal import InternalAPI
    from anonticket.web.site import PrivacySite

    from .conftest import reactor

    clock, monitor, metrics = Clock(), StubMonitor(), Metrics()
    clock.advance(1000)
    api = InternalAPI(store, metrics, clock, 10, monitor=monitor)
    site = PrivacySite(api.app.resource(), name="internal", metrics=metrics, clock=clock)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    url = f"http://127.0.0.1:{port.getHost().port}/healthz"
    try:
        code, body, _ = await get_json(http, url)
        assert code == 503 and body["monitor"] == "starting"
        monitor.last = clock.seconds()
        clock.advance(14.9)
        code, body, _ = await get_json(http, url)
        assert code == 200 and body["monitor"] == "ok"
        clock.advance(0.2)
        code, body, _ = await get_json(http, url)
        assert code == 503 and body["monitor"] == "stale" and "15 seconds" in body["reason"]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_healthz_shows_the_height_the_monitor_acts_on_and_why(store, http):
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.task import Clock

    from anonticket.metrics import Metrics
    from anonticket.web.internal import InternalAPI
    from anonticket.web.site import PrivacySite

    from .conftest import reactor

    clock, monitor, metrics = Clock(), StubMonitor(), Metrics()
    clock.advance(1000)
    monitor.last, monitor.trusted = clock.seconds(), 100
    monitor.note = "the wallet's height rose from 100 to 20000 in one poll: not trusted"
    # The wallet said 20,000 once; the monitor acts on 100.
    await store.record_transfers([], now=1, cursor=90, wallet_height=20_000)
    api = InternalAPI(store, metrics, clock, 10, monitor=monitor)
    site = PrivacySite(api.app.resource(), name="internal", metrics=metrics, clock=clock)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    try:
        code, body, _ = await get_json(http, f"http://127.0.0.1:{port.getHost().port}/healthz")
        assert code == 200
        assert (body["wallet_height"], body["trusted_height"]) == (20_000, 100)
        assert body["lag"] == 0 and body["height_check"] == monitor.note
        monitor.note = None
        code, body, _ = await get_json(http, f"http://127.0.0.1:{port.getHost().port}/healthz")
        assert body["height_check"] == "ok"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_metrics_follow_a_request_in_flight_and_one_whose_client_left(daemon, http):
    async def metric(series: str) -> float:
        response = await http.get(daemon.internal_url + "/metrics", timeout=10)
        for line in (await response.content()).decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        raise AssertionError(series)

    async def until(condition) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(reactor, 0.01)
        raise AssertionError("timed out")

    site = daemon.root.getServiceNamed("public-site").site
    in_flight = 'anonticket_http_requests_in_flight{site="public"}'
    answered = 'anonticket_http_request_duration_seconds_count{route="redeem",site="public"}'
    held: list[Deferred[object]] = []

    def hold(pid, now, admit=False):
        held.append(Deferred())
        return held[-1]

    daemon.store.redeem_answer = hold
    body = b'{"pid": "%s"}' % PID.encode()
    # A client that hangs up while its redeem waits on the store: counted out once, at once.
    await raw_request(
        reactor,
        int(daemon.public_url.rsplit(":", 1)[1]),
        b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        hangup=True,
    )
    await until(lambda: len(held) == 1 and site.in_flight == 0)
    assert await metric(in_flight) == 0.0
    kept = ensureDeferred(post_json(http, daemon.public_url + "/api/v1/redeem", {"pid": PID}))
    await until(lambda: len(held) == 2)
    assert await metric(in_flight) == 1.0
    held[1].errback(RuntimeError("store down"))
    assert (await kept)[0] == 503
    held[0].errback(RuntimeError("store down"))  # the store answers the one who left, late
    assert site.in_flight == 0 and await metric(in_flight) == 0.0
    assert await metric(answered) == 2.0


def test_dropped_connections_are_exported_per_site_and_reason():
    from types import SimpleNamespace

    from anonticket.metrics import Metrics

    metrics = Metrics()
    site = SimpleNamespace(name="public", refused=3, evicted=5, timed_out=7)
    metrics.watch_site(site)
    value = metrics.registry.get_sample_value
    name = "anonticket_http_connections_dropped_total"
    assert value(name, {"site": "public", "reason": "refused"}) == 3
    site.timed_out += 1  # read when scraped
    assert value(name, {"site": "public", "reason": "timed_out"}) == 8
    assert value(name, {"site": "public", "reason": "evicted"}) == 5
