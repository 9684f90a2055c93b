"""Hostile input against both sites: property-based HTTP fuzzing, slow clients, huge bodies.

Whatever arrives, the daemon answers with a 4xx JSON error (or a success), never a 5xx, and
keeps serving; no request makes it buffer more than the body limit.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from .conftest import get_json, reactor
from .daemonproc import Daemon
from .rawhttp import parse_response, raw_request

KNOWN = [
    "/api/v1/redeem",
    "/api/v1/token/" + "ab" * 32,
    "/api/v1/token/" + "ab" * 32 + "/revoke",
    "/metrics",
    "/healthz",
    "/",
]
token_chars = st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=" ")
paths = st.one_of(
    st.sampled_from(KNOWN),
    st.builds(lambda a, b: a + b, st.sampled_from(KNOWN), st.text(token_chars, max_size=30)),
    st.text(token_chars, min_size=1, max_size=60).map(lambda t: "/" + t),
    st.binary(max_size=20).map(lambda b: "/" + "".join(f"%{x:02X}" for x in b)),
)
methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    st.text(st.characters(min_codepoint=65, max_codepoint=90), min_size=1, max_size=10),
)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        [
            "Content-Type",
            "Accept",
            "Accept-Encoding",
            "X-Forwarded-For",
            "Cookie",
            "Range",
            "Authorization",
            "Expect",
            "Connection",
            "X-Junk",
        ]
    ),
    st.one_of(header_values, st.sampled_from(["application/json", "text/plain", "*/*"])),
    max_size=5,
)
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
).map(lambda v: json.dumps(v).encode())
pid_bodies = st.one_of(
    st.text(max_size=70), st.integers(), st.none(), st.lists(st.text(max_size=5))
).map(lambda pid: json.dumps({"pid": pid}).encode())
bodies = st.one_of(st.just(b""), json_bodies, pid_bodies, st.binary(max_size=6000))


def check_answer(raw: bytes, method: str) -> int:
    code, head, body = parse_response(raw)
    assert code < 500, (code, raw[:500])
    assert "server" not in head
    if code >= 400 and method != "HEAD":
        assert head.get("content-type") == "application/json", raw[:300]
        error = json.loads(body)
        assert isinstance(error["error"], str) and isinstance(error["code"], str)
    return code


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    site=st.sampled_from(["public", "internal"]),
    method=methods,
    path=paths,
    extra=headers,
    body=bodies,
    chunked=st.booleans(),
)
@pytest_twisted.ensureDeferred
async def test_any_request_gets_a_json_answer_and_never_a_5xx(
    daemon, site, method, path, extra, body, chunked
):
    url = daemon.public_url if site == "public" else daemon.internal_url
    port = int(url.rsplit(":", 1)[1])
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in extra.items() if k.lower() not in ("connection", "expect")]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    request = "\r\n".join(lines).encode() + b"\r\n\r\n" + payload
    raw = await raw_request(reactor, port, request, timeout=10)
    code = check_answer(raw, method)
    if len(body) > 4096:
        assert code == 413


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(min_size=1, max_size=300))
@pytest_twisted.ensureDeferred
async def test_garbage_on_the_wire_never_hurts(daemon, garbage):
    port = int(daemon.public_url.rsplit(":", 1)[1])
    try:
        raw = await raw_request(reactor, port, garbage + b"\r\n\r\n", timeout=1)
    except defer.TimeoutError:
        raw = b""  # the server is still waiting for the rest of a request: fair enough
    if raw:
        assert parse_response(raw)[0] < 500
    # Still serving.
    code, _, _ = await get_json_ok(daemon)
    assert code == 404


async def get_json_ok(daemon: Any) -> tuple[int, Any, Any]:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        return await get_json(HTTPClient(Agent(reactor, pool=pool)), daemon.public_url + "/x")
    finally:
        await pool.closeCachedConnections()


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _send_big(port: int, declared: int, send: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /api/v1/redeem HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared
        )
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < send:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # cut off by the server, as it should
        try:
            return s.recv(4096)
        except OSError:
            return b""


def test_huge_bodies_and_slow_clients_keep_memory_bounded(tmp_path):
    daemon = Daemon(tmp_path / "data", "--no-monitor").start()
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        baseline = _rss_kib(pid)
        # 40 clients declaring 100 MB bodies and pushing up to 4 MB each.
        for _ in range(40):
            answer = _send_big(daemon.public_port, 100 * 2**20, 4 * 2**20)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 413 ")
        # 200 slow clients: connected, half a request line each, never finishing.
        slow = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", daemon.public_port), timeout=10)
            s.sendall(b"POST /api/v1/red")
            slow.append(s)
        # Everyone else is still served, promptly.
        started = time.monotonic()
        for _ in range(20):
            assert daemon.get("/healthz")[0] == 200
        assert time.monotonic() - started < 5
        grown = _rss_kib(pid) - baseline
        for s in slow:
            s.close()
        assert grown < 20 * 1024, f"RSS grew by {grown} KiB"
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log_text()
