"""Benchmark the Privacy Pass issuer (issue #16): passes evaluated and verified per second on one
core, in process; and, against the real daemon (``twistd -n anonticket`` with ``--pass-price``,
SQLite, loopback), what a purchase costs in latency: one pass (RFC 9578 wire format) and a batch
of 100 (``POST /api/v1/passes``), and verifications on the internal site.  Prints numbers.

    .venv/bin/python bench/passes.py [--seconds 3] [--purchases 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from anonticket.passes.client import blind, finish
from anonticket.passes.issuer import IssuerKeys
from anonticket.passes.wire import Token, TokenRequest, b64url, from_b64url

TWISTD = str(Path(sys.executable).parent / "twistd")
PRICE = 1


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of ``fn`` per second, over about ``seconds``."""
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        fn()
        done += 1
    return done / elapsed


def in_process(seconds: float) -> None:
    keys = IssuerKeys(os.urandom(32), "bench", lifetime=0)
    key = keys.current(0)
    made = blind(key.public_key, b"challenge", 1)[0]
    blinded = TokenRequest.parse(made.request).blinded
    the_pass = Token.parse(finish(made, key.evaluate(blinded), key.public_key))
    evaluations = rate(lambda: key.evaluate(blinded), seconds)
    verifications = rate(lambda: key.verifies(the_pass.input, the_pass.authenticator), seconds)
    clients = rate(lambda: blind(key.public_key, b"challenge", 1), seconds)
    print(
        f"in process, one core: {evaluations:,.0f} evaluations+proofs/s (issuance), "
        f"{verifications:,.0f} verifications/s, {clients:,.0f} client blinds/s"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
    request = urllib.request.Request(url, data=body, headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), time.perf_counter() - started
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - started


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return f"p50 {p[49]:.1f} ms, p90 {p[89]:.1f} ms, max {ms[-1]:.1f} ms ({len(ms)} runs)"


PID = bytes.fromhex("0123456789abcdef")


def seed(data: str) -> None:
    """In a child process (task.react exits): one confirmed payment of 1 XMR to PID."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorThreads

    from anonticket.store import Store
    from anonticket.store.records import PaymentStatus, Transfer

    async def record(reactor: IReactorThreads) -> None:
        store = Store(reactor, f"sqlite:///{Path(data) / 'anonticket.sqlite3'}", Path(data))
        store.open()
        try:
            transfer = Transfer(b"\x01" * 32, 0, 0, PID, 10**12, 100, PaymentStatus.UNCLAIMED)
            await store.record_transfers([transfer], now=1)
        finally:
            store.close()

    task.react(lambda reactor: Deferred.fromCoroutine(record(reactor)))


def against_daemon(purchases: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-passes-"))
    data = tmp / "data"
    data.mkdir(mode=0o700)
    subprocess.run([sys.executable, __file__, "--seed", str(data)], check=True)
    pid = PID
    public, internal = free_port(), free_port()
    log = open(tmp / "daemon.log", "ab")
    daemon = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "anonticket",
            "--data-dir",
            str(data),
            "--no-monitor",
            "--public",
            f"tcp:{public}:interface=127.0.0.1",
            "--internal",
            f"tcp:{internal}:interface=127.0.0.1",
            "--pass-price",
            str(PRICE),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{public}"
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", internal), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        status, body, _ = post(
            base + "/api/v1/redeem",
            json.dumps({"pid": pid.hex()}).encode(),
            {"Content-Type": "application/json"},
        )
        token = json.loads(body)["service_token"]
        with urllib.request.urlopen(base + "/.well-known/private-token-issuer-directory") as r:
            directory = json.loads(r.read())
        public_key = from_b64url(directory["token-keys"][0]["token-key"])
        auth = {"Authorization": f"Bearer {token}"}
        single, batch, verify = [], [], []
        passes: list[bytes] = []
        for i in range(purchases):
            made = blind(public_key, b"challenge", 1)[0]
            status, answer, took = post(
                base + "/api/v1/passes/token-request",
                made.request,
                {
                    **auth,
                    "Idempotency-Key": f"one-{i}",
                    "Content-Type": "application/private-token-request",
                },
            )
            assert status == 200, (status, answer)
            single.append(took)
            passes.append(finish(made, answer, public_key))
        for i in range(max(1, purchases // 4)):
            many = blind(public_key, b"challenge", 100)
            body = json.dumps({"requests": [b64url(m.request) for m in many]}).encode()
            status, answer, took = post(
                base + "/api/v1/passes",
                body,
                {**auth, "Idempotency-Key": f"batch-{i}", "Content-Type": "application/json"},
            )
            assert status == 200, (status, answer)
            batch.append(took)
        for the_pass in passes:
            status, answer, took = post(
                f"http://127.0.0.1:{internal}/api/v1/passes/verify",
                json.dumps({"token": b64url(the_pass)}).encode(),
                {"Content-Type": "application/json"},
            )
            assert status == 200, (status, answer)
            verify.append(took)
        print(f"daemon, one pass (RFC 9578 request): {percentiles(single)}")
        print(f"daemon, batch of 100 (POST /api/v1/passes): {percentiles(batch)}")
        print(f"daemon, verification (internal site): {percentiles(verify)}")
    finally:
        daemon.terminate()
        daemon.wait(20)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per in-process rate")
    parser.add_argument("--purchases", type=int, default=20, help="single purchases timed")
    parser.add_argument("--seed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed:
        seed(args.seed)
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    in_process(args.seconds)
    against_daemon(args.purchases)


if __name__ == "__main__":
    main()
