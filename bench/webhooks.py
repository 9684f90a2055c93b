"""Benchmark the webhook delivery of the real daemon (issue #15's closing figures; the method
and the numbers are in docs/webhooks.md, "Measured").

    .venv/bin/python bench/webhooks.py [--events N] [--latency M] [--clients C] ...

Everything runs on loopback in a temporary directory: payments are seeded into SQLite through
``anonticket.store.Store`` (as the monitor records them) before the daemon starts; then the real
``twistd -n anonticket --no-monitor`` runs with ``--webhook-url`` pointing at a receiver this
script runs as a child process (this same file, ``--receiver PORT``: a minimal HTTP/1.1 server
that answers 204 and reports each arrival's time and ``webhook-id``).  Its clock is the
machine's CLOCK_MONOTONIC, the same as this process's, so "the change was answered" and "its
event arrived" are compared directly.  It measures:

1. latency: redeems, then spends (internal site, ``Idempotency-Key``), one at a time, each
   waiting for its event: from the HTTP answer to the event's arrival at the receiver;
2. "up": N changes by C concurrent clients with the receiver up (throughput, answer latency,
   and how long after each answer its event arrived);
3. "down": the same N changes (fresh PIDs) and concurrency with the receiver down (its port
   closed: every attempt is refused), then the receiver is started and the backlog drains:
   events/s, every event arrived at least once, duplicates counted.

A change is a redeem of a fresh PID or, for ``--spend-share`` of them, a spend on one of
``--spend-tokens`` tokens, so a token's events queue behind each other and their order of
arrival is checked.  Signatures of a sample of arrivals are verified with the
``standardwebhooks`` package.  The daemon runs with ``--webhook-retry-schedule`` of 1 s steps
(see ``--retry-schedule``), or a refused event would wait 5 s before its first retry.

Results go to stdout (the lines start with ``latency``, ``storm``, ``drain``, ``check``), progress
to stderr.  No figure is judged; the exit code is 1 only when a check of correctness fails: an
answer that is not a success, an event that never arrived, a bad signature, or a token's events
arriving out of order.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

TWISTD = str(Path(sys.executable).parent / "twistd")
AMOUNT = 10**12  # 1 XMR per seeded payment
SPEND = 1  # atomic units a spend takes: a seeded token holds 10^12, never used up here
SEED_BATCH = 10_000
ONE_SECOND_SCHEDULE = ",".join(["1"] * 50)  # the longest schedule the daemon accepts: 50 steps
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: nothing started here may outlive an interrupted bench.
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)


def token_id(token_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(token_hex)).hexdigest()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max (nearest rank), in milliseconds, of values in seconds."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1] * 1000}


def spread(values: Sequence[float]) -> str:
    p = percentiles(values)
    return " ".join(f"{k} {v:.1f}" for k, v in p.items()) + " ms"


def by_quarter(times: Sequence[float], start: float) -> str:
    """The rate (per second) in each quarter of a run, quarters by count: does it hold up?"""
    ordered = sorted(times)
    rates: list[str] = []
    previous, done = start, 0
    for q in range(1, 5):
        end = math.ceil(q * len(ordered) / 4)
        if end > done:
            rates.append(f"{(end - done) / max(ordered[end - 1] - previous, 1e-9):,.0f}")
            previous, done = ordered[end - 1], end
    return " / ".join(rates)


# --- the receiver (a child process running this file with --receiver PORT) -----------------


async def _receive(port: int) -> None:
    """Answer every POST with 204; one JSON line per arrival on stdout:
    [monotonic arrival time, webhook-id, webhook-timestamp, webhook-signature, body]."""
    out = sys.stdout

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers: dict[str, str] = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                arrived = time.monotonic()
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                record = [
                    arrived,
                    headers.get("webhook-id", ""),
                    headers.get("webhook-timestamp", ""),
                    headers.get("webhook-signature", ""),
                    body.decode("utf-8", "replace"),
                ]
                out.write(json.dumps(record) + "\n")
                out.flush()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port, reuse_address=True)
    out.write("ready\n")
    out.flush()
    async with server:
        await server.serve_forever()


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    event_id: str
    timestamp: str
    signature: str
    body: str
    event: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        """What names the change the event is about, as the client knows it from its answer."""
        data = self.event["data"]
        if self.event["type"] == "token.spent":
            return ("spend", str(data["spend_id"]))
        return (str(self.event["type"]), str(data["token_id"]))


class Receiver:
    """The receiver child, and every arrival it reported (kept across its restarts)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.arrivals: list[Arrival] = []
        self.first: dict[tuple[str, str], float] = {}  # change -> first arrival of its event
        self._raw: list[str] = []
        self._cond = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> float:
        """Start listening; the monotonic time it was ready."""
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--receiver", str(self.port)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        assert self._process.stdout is not None
        ready = self._process.stdout.readline()
        if ready.strip() != "ready":
            raise SystemExit(f"webhooks bench: the receiver did not start ({ready!r})")
        started = time.monotonic()
        self._reader = threading.Thread(target=self._read, args=(self._process,), daemon=True)
        self._reader.start()
        return started

    def _read(self, process: subprocess.Popen[str]) -> None:
        # Only collects lines: parsing happens in the thread that waits (see _absorb), so this
        # thread takes as little of the GIL as it can from the clients while they run.
        assert process.stdout is not None
        for line in process.stdout:
            with self._cond:
                self._raw.append(line)
                self._cond.notify_all()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._process = None
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        with self._cond:
            self._absorb()

    def _absorb(self) -> None:
        raw, self._raw = self._raw, []
        for line in raw:
            at, event_id, timestamp, signature, body = json.loads(line)
            arrival = Arrival(at, event_id, timestamp, signature, body, json.loads(body))
            self.arrivals.append(arrival)
            self.first.setdefault(arrival.key, at)

    def count(self) -> int:
        with self._cond:
            self._absorb()
            return len(self.arrivals)

    def wait(self, keys: Sequence[tuple[str, str]], timeout: float) -> bool:
        """Until the events of all these changes arrived (False when the time ran out)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._absorb()
                if all(k in self.first for k in keys):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)


# --- seeding ---------------------------------------------------------------------------------


async def _seed(reactor: Any, data_dir: Path, pids: int, tokens: int) -> None:
    """Record ``pids + tokens`` confirmed 1 XMR payments, each to its own PID, the way the
    monitor does, and redeem the last ``tokens`` of them through the store (no events: the
    daemon is not running yet, and a store writes none unasked).  Prints the unclaimed PIDs and
    the tokens, in hex, as one JSON object."""
    from anonticket.domain import PaymentId
    from anonticket.store import Store
    from anonticket.store.records import PaymentStatus, Redeemed, Transfer

    everything = [os.urandom(8) for _ in range(pids + tokens)]
    everything = [p if any(p) else b"\x01" * 8 for p in everything]  # never "no payment id"
    store = Store(reactor, f"sqlite:///{data_dir / 'anonticket.sqlite3'}", data_dir)
    store.open()
    now = int(time.time())
    claimed: list[str] = []
    try:
        for start in range(0, len(everything), SEED_BATCH):
            transfers = [
                Transfer(os.urandom(32), 0, 0, pid, AMOUNT, 1, PaymentStatus.UNCLAIMED)
                for pid in everything[start : start + SEED_BATCH]
            ]
            await store.record_transfers(transfers, now=now, cursor=1, wallet_height=100)
        for pid in everything[pids:]:
            result = await store.redeem(PaymentId(pid), now)
            assert isinstance(result, Redeemed) and result.first_claim, result
            claimed.append(result.token.hex)
    finally:
        store.close()
    json.dump({"pids": [p.hex() for p in everything[:pids]], "tokens": claimed}, sys.stdout)


def seed(data_dir: Path, pids: int, tokens: int) -> tuple[list[str], list[str]]:
    """Seed in a child process (this file with --seed), before the daemon starts: the store
    runs on a reactor, which this process never starts."""
    result = subprocess.run(
        [sys.executable, __file__, "--seed", str(data_dir), str(pids), str(tokens)],
        stdout=subprocess.PIPE,
        check=True,
        text=True,
    )
    seeded = json.loads(result.stdout)
    return list(seeded["pids"]), list(seeded["tokens"])


# --- the daemon ------------------------------------------------------------------------------


class Daemon:
    def __init__(self, data_dir: Path, webhook_url: str, schedule: str) -> None:
        self.data_dir = data_dir
        self.public_port = free_port()
        self.internal_port = free_port()
        self.log = data_dir.parent / "daemon.log"
        argv = [
            TWISTD,
            "-n",
            "--pidfile=",
            "anonticket",
            "--data-dir",
            str(data_dir),
            "--public",
            f"tcp:{self.public_port}:interface=127.0.0.1",
            "--internal",
            f"tcp:{self.internal_port}:interface=127.0.0.1",
            "--no-monitor",
            "--webhook-url",
            webhook_url,
            "--webhook-retry-schedule",
            schedule,
        ]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"webhooks bench: the daemon did not start:\n{self.tail()}")
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.internal_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("anonticket_webhook"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


def deliveries(metrics: dict[str, float], outcome: str) -> int:
    return int(metrics.get(f'anonticket_webhook_deliveries_total{{outcome="{outcome}"}}', 0))


# --- the clients -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "redeem" or "spend"
    subject: str  # the PID, or the token spent from
    key: str = ""  # the spend's Idempotency-Key


@dataclass
class Done:
    """One change answered: when it was sent and answered, and the event it must cause."""

    kind: str
    sent: float
    answered: float
    event: tuple[str, str]


class Client:
    """One keep-alive connection to each site."""

    def __init__(self, daemon: Daemon) -> None:
        self._ports = {"public": daemon.public_port, "internal": daemon.internal_port}
        self._connections: dict[str, HTTPConnection] = {}

    def post(
        self, site: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        payload = json.dumps(body).encode()
        for attempt in (1, 2):
            connection = self._connections.get(site)
            if connection is None:
                connection = HTTPConnection("127.0.0.1", self._ports[site], timeout=60)
                self._connections[site] = connection
            try:
                connection.request(
                    "POST",
                    path,
                    payload,
                    {"Content-Type": "application/json", **(headers or {})},
                )
                response = connection.getresponse()
                answer = response.read()
                parsed: dict[str, Any] = json.loads(answer)
                return response.status, parsed
            except (OSError, HTTPException):
                # A keep-alive connection the daemon closed: once more on a new one (a redeem
                # answers the same token again, a spend with its key replays its answer).
                connection.close()
                del self._connections[site]
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def change(self, change: Change) -> Done:
        sent = time.monotonic()
        if change.kind == "redeem":
            status, body = self.post("public", "/api/v1/redeem", {"pid": change.subject})
            answered = time.monotonic()
            # already_claimed: the answer to a retry on a new connection (see post)
            if status != 200 or body.get("status") not in ("success", "already_claimed"):
                raise SystemExit(f"webhooks bench: redeem answered {status} {body}")
            return Done("redeem", sent, answered, ("token.issued", token_id(body["service_token"])))
        status, body = self.post(
            "internal",
            f"/api/v1/token/{change.subject}/spend",
            {"amount": SPEND, "memo": "bench"},
            {"Idempotency-Key": change.key},
        )
        answered = time.monotonic()
        if status != 200 or "spend_id" not in body:
            raise SystemExit(f"webhooks bench: spend answered {status} {body}")
        return Done("spend", sent, answered, ("spend", str(body["spend_id"])))

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


def storm(daemon: Daemon, changes: Sequence[Change], clients: int) -> tuple[list[Done], float]:
    """Make the changes with ``clients`` concurrent connections (closed loop); every change
    answered, and the seconds from the first sent to the last answered."""
    done: list[Done] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(share: Sequence[Change]) -> None:
        client = Client(daemon)
        mine: list[Done] = []
        try:
            for change in share:
                mine.append(client.change(change))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            client.close()
            with lock:
                done.extend(mine)

    threads = [threading.Thread(target=work, args=(changes[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    first = min(d.sent for d in done)
    last = max(d.answered for d in done)
    return done, last - first


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    events: int
    latency: int
    clients: int
    spend_share: float
    spend_tokens: int
    verify_every: int
    retry_schedule: str
    drain_timeout: float
    pids: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    _spends: int = 0

    def redeems_per_storm(self) -> int:
        return self.events - self.spends_per_storm()

    def spends_per_storm(self) -> int:
        return round(self.events * self.spend_share) if self.spend_tokens else 0

    def take_pids(self, count: int) -> list[str]:
        taken, self.pids = self.pids[:count], self.pids[count:]
        return taken

    def spend(self, token: str) -> Change:
        self._spends += 1
        return Change("spend", token, f"bench-{self._spends}")

    def storm_changes(self) -> list[Change]:
        """Redeems, with the spends spread evenly among them, on the spend tokens in turn."""
        redeems = iter(Change("redeem", p) for p in self.take_pids(self.redeems_per_storm()))
        spends = self.spends_per_storm()
        at = {round((j + 0.5) * self.events / spends) for j in range(spends)} if spends else set()
        changes: list[Change] = []
        for i in range(self.events):
            if i in at:
                changes.append(self.spend(self.tokens[self._spends % len(self.tokens)]))
            else:
                changes.append(next(redeems))
        return changes


def sample_signatures(arrivals: Sequence[Arrival], secret: str, every: int) -> tuple[int, int]:
    """Verify every ``every``-th arrival with the standardwebhooks package: (checked, bad)."""
    import standardwebhooks

    webhook = standardwebhooks.Webhook(secret)
    checked = bad = 0
    for arrival in arrivals[::every]:
        headers = {
            "webhook-id": arrival.event_id,
            "webhook-timestamp": arrival.timestamp,
            "webhook-signature": arrival.signature,
        }
        checked += 1
        try:
            event = webhook.verify(arrival.body, headers)
            if event != arrival.event:
                bad += 1
        except Exception:
            bad += 1
    return checked, bad


def outbox_rows(data_dir: Path) -> list[tuple[str, int, int]]:
    """(event_id, state, attempts) of every event the daemon wrote, read with sqlite3."""
    conn = sqlite3.connect(f"file:{data_dir / 'anonticket.sqlite3'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT event_id, state, attempts FROM outbox ORDER BY id").fetchall()
        return [(str(e), int(s), int(a)) for e, s, a in rows]
    finally:
        conn.close()


def failed_ids(data_dir: Path) -> list[str]:
    """The ids of the events that used up their retries."""
    conn = sqlite3.connect(f"file:{data_dir / 'anonticket.sqlite3'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT event_id FROM outbox WHERE state = 2 ORDER BY id").fetchall()
        return [str(e) for (e,) in rows]
    finally:
        conn.close()


class Bench:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(mode=0o700)
        self.receiver = Receiver(free_port())
        self.failures: list[str] = []
        self.verified = [0, 0]  # checked, bad
        self.retried: set[str] = set()  # failed events retried from the internal site
        self.summary: dict[str, tuple[float, dict[str, float]]] = {}  # storm -> rate, redeems
        self.daemon: Daemon | None = None
        self.secret = ""

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"check FAILED: {text}", flush=True)

    def verify(self, arrivals: Sequence[Arrival]) -> None:
        checked, bad = sample_signatures(arrivals, self.secret, self.plan.verify_every)
        self.verified[0] += checked
        self.verified[1] += bad

    def run(self) -> None:
        plan = self.plan
        storms = 3  # up, down (then the drain), up again
        pid_count = plan.latency + storms * plan.redeems_per_storm()
        token_count = plan.spend_tokens if (plan.latency or plan.spends_per_storm()) else 0
        started = time.monotonic()
        plan.pids, plan.tokens = seed(self.data_dir, pid_count, max(token_count, 1))
        say(
            f"seeded {pid_count:,} payments and {len(plan.tokens)} tokens in "
            f"{time.monotonic() - started:.1f} s"
        )
        self.receiver.start()
        self.daemon = Daemon(self.data_dir, self.receiver.url, plan.retry_schedule)
        self.secret = (self.data_dir / "webhook.secret").read_text().strip()
        try:
            self.latency()
            up = self.storm_up("receiver up")
            self.storm_down_and_drain(up)
            self.storm_up("receiver up again")  # as late as the down storm, on as big a store
            print(
                "storm side by side (changes/s; redeem answer p50/p99 ms): "
                + "; ".join(
                    f"{label} {rate:,.0f}, {p['p50']:.1f}/{p['p99']:.1f}"
                    for label, (rate, p) in self.summary.items()
                ),
                flush=True,
            )
            self.checks()
        finally:
            self.daemon.stop()
            self.receiver.stop()

    def latency(self) -> None:
        plan, daemon = self.plan, self.daemon
        assert daemon is not None
        if not plan.latency:
            return
        client = Client(daemon)
        seen = len(self.receiver.arrivals)
        try:
            for kind, changes in (
                ("redeem", [Change("redeem", p) for p in plan.take_pids(plan.latency)]),
                (
                    "spend",
                    [plan.spend(plan.tokens[i % len(plan.tokens)]) for i in range(plan.latency)],
                ),
            ):
                say(f"latency: {len(changes)} {kind}s one at a time")
                delays: list[float] = []
                answers: list[float] = []
                for change in changes:
                    done = client.change(change)
                    if not self.receiver.wait([done.event], 30):
                        self.fail(f"the event of a {kind} did not arrive within 30 s")
                        return
                    delays.append(self.receiver.first[done.event] - done.answered)
                    answers.append(done.answered - done.sent)
                print(
                    f"latency {kind} (receiver up, one change at a time, n={len(changes)}): "
                    f"answer->event {spread(delays)}; min {min(delays) * 1000:.1f} ms; "
                    f"the change's own answer {spread(answers)}",
                    flush=True,
                )
        finally:
            client.close()
        self.verify(self.receiver.arrivals[seen:])

    def _storm(self, label: str) -> tuple[list[Done], float, str]:
        plan, daemon = self.plan, self.daemon
        assert daemon is not None
        changes = plan.storm_changes()
        say(f"storm {label}: {len(changes):,} changes by {plan.clients} clients")
        cpu = daemon.cpu_seconds()
        done, seconds = storm(daemon, changes, plan.clients)
        cpu = daemon.cpu_seconds() - cpu
        redeems = [d.answered - d.sent for d in done if d.kind == "redeem"]
        spends = [d.answered - d.sent for d in done if d.kind == "spend"]
        line = (
            f"storm {label}: {len(done):,} changes ({len(redeems):,} redeems, {len(spends):,} "
            f"spends) by {plan.clients} clients in {seconds:.2f} s: "
            f"{len(done) / seconds:,.0f} changes/s "
            f"(by quarter {by_quarter([d.answered for d in done], min(d.sent for d in done))}); "
            f"redeem answer {spread(redeems)}"
        )
        if spends:
            line += f"; spend answer {spread(spends)}"
        line += f"; daemon CPU {cpu / seconds:.0%} of one core"
        self.summary[label] = (len(done) / seconds, percentiles(redeems))
        return done, seconds, line

    def storm_up(self, label: str) -> tuple[float, float]:
        seen = len(self.receiver.arrivals)
        done, seconds, line = self._storm(label)
        keys = [d.event for d in done]
        last_answer = max(d.answered for d in done)
        arrived = self.receiver.wait(keys, self.plan.drain_timeout)
        if not arrived:
            missing = sum(k not in self.receiver.first for k in keys)
            self.fail(f"storm {label}: {missing} events never arrived")
        else:
            delays = [self.receiver.first[d.event] - d.answered for d in done]
            tail = max(self.receiver.first[k] for k in keys) - last_answer
            line += (
                f"; answer->event {spread(delays)}; last event "
                f"{round(tail * 1000):+d} ms after the last answer"
            )
        print(line, flush=True)
        self.verify(self.receiver.arrivals[seen:])
        return len(done) / seconds, seconds

    def storm_down_and_drain(self, up: tuple[float, float]) -> None:
        daemon = self.daemon
        assert daemon is not None
        time.sleep(0.5)  # the daemon read the last 204s: no delivery is cut by the stop
        self.receiver.stop()
        seen = len(self.receiver.arrivals)
        written_before = len(outbox_rows(self.data_dir))
        before = daemon.metrics()
        down_since = time.monotonic()
        done, _, line = self._storm("receiver down")
        print(line + f" (vs {up[0]:,.0f} changes/s with the receiver up)", flush=True)
        time.sleep(1)  # the last changes' first attempts are made (and refused)
        metrics = daemon.metrics()
        down = time.monotonic() - down_since
        refused = deliveries(metrics, "retry") - deliveries(before, "retry")
        failed_down = deliveries(metrics, "failed") - deliveries(before, "failed")
        attempts = [n for _, _, n in outbox_rows(self.data_dir)[written_before:]]
        tried = sum(n > 0 for n in attempts)
        keys = [d.event for d in done]
        say(f"drain: receiver starts with {len(keys):,} events waiting")
        cpu = daemon.cpu_seconds()
        opened = self.receiver.start()
        retried = self.drain_wait(keys, deliveries(before, "failed"))
        arrived = all(k in self.receiver.first for k in keys)
        cpu = daemon.cpu_seconds() - cpu
        drain = self.receiver.arrivals[seen:]
        if not arrived:
            missing = sum(k not in self.receiver.first for k in keys)
            self.fail(
                f"drain: {missing} of {len(keys)} events had not arrived after "
                f"{self.plan.drain_timeout:.0f} s"
            )
            return
        wanted = set(keys)
        first = min(a.at for a in drain if a.key in wanted)
        last = max(self.receiver.first[k] for k in keys)
        ids = Counter(a.event_id for a in drain)
        duplicates = sum(n - 1 for n in ids.values())
        print(
            f"drain: {len(keys):,} events waited while the receiver was down for {down:.1f} s: "
            f"{refused:,} refused attempts ({refused / down:,.0f}/s) on {tried:,} of them "
            f"(up to {max(attempts, default=0)} attempts each), {failed_down} failed for good "
            f"({retried} retried from the internal site); "
            f"receiver up -> first arrival {first - opened:.2f} s, all arrived "
            f"{last - opened:.2f} s: {len(keys) / (last - opened):,.0f} events/s "
            f"(by quarter {by_quarter([self.receiver.first[k] for k in keys], opened)}; "
            f"{len(keys) / max(last - first, 1e-9):,.0f}/s from the first arrival); "
            f"{len(drain):,} deliveries of {len(ids):,} webhook-ids, {duplicates} duplicates; "
            f"daemon CPU {cpu / (last - opened):.0%} of one core",
            flush=True,
        )
        self.verify(drain)

    def drain_wait(self, keys: Sequence[tuple[str, str]], failed_before: int) -> int:
        """Wait for the events; whenever some used up their retries (a long outage with a
        short schedule), retry them from the internal site, as an operator would.  How many
        were retried."""
        daemon = self.daemon
        assert daemon is not None
        deadline = time.monotonic() + self.plan.drain_timeout
        retried = 0
        while not self.receiver.wait(keys, min(2.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            failed = deliveries(daemon.metrics(), "failed")
            if failed > failed_before:
                failed_before = failed
                client = Client(daemon)
                for event_id in failed_ids(self.data_dir):
                    status, _ = client.post(
                        "internal", f"/api/v1/webhooks/failed/{event_id}/retry", {}
                    )
                    if status == 200:
                        self.retried.add(event_id)
                        retried += 1
                client.close()
                say(f"drain: {retried} failed events retried from the internal site so far")
        return retried

    def checks(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        time.sleep(0.5)  # a settle in flight is written
        arrivals = self.receiver.arrivals
        rows = outbox_rows(self.data_dir)
        arrived_ids = Counter(a.event_id for a in arrivals)
        never = [e for e, _, _ in rows if e not in arrived_ids]
        unknown = set(arrived_ids) - {e for e, _, _ in rows}
        states = Counter(s for _, s, _ in rows)
        duplicates = sum(n - 1 for n in arrived_ids.values())
        if never or unknown:
            self.fail(f"{len(never)} events written never arrived; {len(unknown)} unknown ids")
        print(
            f"check events: {len(rows):,} written, every one arrived at least once: "
            f"{'yes' if not never else 'no'}; {len(arrivals):,} deliveries, {duplicates} "
            f"duplicates; outbox states {dict(sorted(states.items()))} (0 waiting, "
            f"1 delivered, 2 failed)",
            flush=True,
        )
        # In order per token: a token's events arrive (first arrival of each) in version
        # order, except an event that failed for good and was retried: the token's later
        # events went on without it (docs/webhooks.md), so it arrives late by design.
        highest: dict[str, int] = {}
        late: list[str] = []
        late_retried: list[str] = []
        events_of: Counter[str] = Counter()
        first_seen: set[str] = set()
        for a in sorted(arrivals, key=lambda a: a.at):
            if a.event_id in first_seen:
                continue
            first_seen.add(a.event_id)
            data = a.event["data"]
            token, version = str(data["token_id"]), int(data["version"])
            events_of[token] += 1
            if version < highest.get(token, 0):
                (late_retried if a.event_id in self.retried else late).append(a.event_id)
            highest[token] = max(version, highest.get(token, 0))
        if late:
            self.fail(f"{len(late)} events arrived after a later event of their token")
        print(
            f"check order: {len(events_of):,} tokens, up to {max(events_of.values(), default=0)} "
            f"events each, in version order: {'yes' if not late else 'no'}"
            + (
                f" ({len(late_retried)} events retried after failing came after later ones)"
                if late_retried
                else ""
            ),
            flush=True,
        )
        checked, bad = self.verified
        if bad or not checked:
            self.fail(f"{bad} of {checked} sampled signatures did not verify")
        print(
            f"check signatures: {checked:,} sampled deliveries verified with standardwebhooks, "
            f"{bad} bad",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--events", type=int, default=5000, help="changes per storm, receiver up and down"
    )
    parser.add_argument(
        "--latency", type=int, default=500, help="redeems, then as many spends, one at a time"
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in a storm")
    parser.add_argument(
        "--spend-share", type=float, default=0.1, help="share of a storm's changes that spend"
    )
    parser.add_argument(
        "--spend-tokens", type=int, default=16, help="tokens the spends take from, in turn"
    )
    parser.add_argument(
        "--verify-every", type=int, default=10, help="verify every Nth delivery's signature"
    )
    parser.add_argument(
        "--retry-schedule",
        default=ONE_SECOND_SCHEDULE,
        help="the daemon's --webhook-retry-schedule (default: 50 steps of 1 s)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=120, help="seconds to wait for all events"
    )
    parser.add_argument("--seed", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver is not None:
        asyncio.run(_receive(args.receiver))
        return 0
    if args.seed is not None:
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.task import react

        data_dir, pids, tokens = Path(args.seed[0]), int(args.seed[1]), int(args.seed[2])
        react(lambda reactor: ensureDeferred(_seed(reactor, data_dir, pids, tokens)))
    if args.events < 1 or args.clients < 1 or args.latency < 0 or args.verify_every < 1:
        parser.error("--events and --clients must be positive, --latency not negative")
    if not 0 <= args.spend_share < 1:
        parser.error("--spend-share must be in [0, 1)")
    plan = Plan(
        events=args.events,
        latency=args.latency,
        clients=args.clients,
        spend_share=args.spend_share,
        spend_tokens=max(args.spend_tokens, 0),
        verify_every=args.verify_every,
        retry_schedule=args.retry_schedule,
        drain_timeout=args.drain_timeout,
    )
    print(
        f"webhooks bench: {os.cpu_count()} CPUs, SQLite, one node; storms of {plan.events:,} "
        f"changes by {plan.clients} clients; retry schedule "
        f"{'50 x 1 s' if plan.retry_schedule == ONE_SECOND_SCHEDULE else plan.retry_schedule}",
        flush=True,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="anonticket-webhooks-") as workdir:
        bench = Bench(plan, Path(workdir))
        try:
            bench.run()
        except BaseException:
            if bench.daemon is not None:
                say(f"daemon log:\n{bench.daemon.tail()}")
            raise
    say(f"done in {time.monotonic() - started:.0f} s")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
