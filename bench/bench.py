"""Benchmark the real daemon: HTTP scenarios against a bare-Klein baseline, monitor ingest, and
storage scale (issues #6 and #13; the method and the figures are in docs/performance.md).

Run it through ``bench/run``, which sets up the venv and installs wrk first.  Everything runs on
loopback in a temporary directory: the real ``twistd -n anonticket`` with tcp endpoints and
SQLite, seeded through the store; wrk with one thread (bench/scenario.lua) as load generator.
Each table row gets a freshly started daemon, so what one scenario leaves behind (memory, caches)
never weighs on the next and its peak RSS is its own.  Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any, TypeVar

from anonticket.limits import INTERNAL_MAX_CONNECTIONS

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "scenario.lua"
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).parent / "twistd")
PY_SPY = str(Path(sys.executable).parent / "py-spy")

SCENARIOS = ("unknown", "success", "retry", "introspect", "mixed", "spend", "spend-hot")
# Spends go to the internal site, every other scenario to the public one.
INTERNAL_SCENARIOS = frozenset({"spend", "spend-hot"})
SPEND_AMOUNT = 1  # atomic units a spend takes: a seeded token holds 10^12, never used up here
HOT_CONNECTIONS = 64  # spend-hot's connection count unless --connections is given (issue #13)
# "<status>/<body status or error code>" of a correct answer; anything else is an error.  An
# unknown PID is a 404 by design.
EXPECTED = {
    "unknown": {"404/payment_not_found"},
    "success": {"200/success"},
    "retry": {"200/already_claimed"},
    "introspect": {"200/active"},
    "mixed": {"200/active", "200/already_claimed", "404/payment_not_found"},
    "spend": {"200/active"},
    "spend-hot": {"200/active"},
}
BASELINE_EXPECTED = {"200/ok"}
# Issue #6 and #13 targets: requests/s as a share of the baseline's; p99 at most 1.5x the
# baseline's (3x for spend-hot).
TARGET_RATIO = {
    "unknown": 0.85,
    "success": 0.50,
    "introspect": 0.75,
    "mixed": 0.70,
    "spend": 0.40,
}
P99_FACTOR = 1.5
P99_FACTORS = {"spend-hot": 3.0}
MONITOR_TARGET = 5_000  # credited transfers/s
SCALE_RSS_TARGET = 80.0  # MB with 1,000,000 payments stored

# Both sets of defaults; an option given on the command line wins over either.
DEFAULTS = {
    "duration": 10,
    "warmup": 3,
    "connections": "16,64",
    "payments": 200_000,
    "claimed": 10_000,
    "monitor_transfers": 100_000,
    "monitor_heights": 10_000,
    "scale_payments": 1_000_000,
}
QUICK = {
    "duration": 1,
    "warmup": 1,
    "connections": "16",
    "payments": 10_000,
    "claimed": 1_000,
    "monitor_transfers": 5_000,
    "monitor_heights": 500,
    "scale_payments": 20_000,
}
# Success requests a run can use up at most, per second: lists this many unclaimed PIDs per
# second of success runs (well above what one Python process claims).
MAX_CLAIMS_PER_SECOND = 10_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: nothing we start may outlive an interrupted bench.
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)


class Process:
    """A child serving on a loopback port, its output in ``log``; ready once it accepts."""

    def __init__(self, argv: list[str], log: Path, port: int) -> None:
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.runs: list[Run] = []  # every wrk run against it, warm-ups included
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        self.wait_listening(port)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def target(self, scenario: str) -> str:
        """The URL wrk loads for a scenario."""
        return self.url

    def wait_listening(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                tail = self.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"bench: the process logging to {self.log} exited:\n{tail}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"bench: nothing listening on port {port} after {timeout:.0f} s")

    @property
    def pid(self) -> int:
        """The serving process: the child when a profiler runs it."""
        if self.stop_signal == signal.SIGINT:
            children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text()
            if children.split():
                return int(children.split()[0])
        return self.popen.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def peak_rss_mb(self) -> float:
        """VmHWM: the resident set's high-water mark since the process started."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    stop_signal = signal.SIGTERM

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(
    method: str, url: str, body: bytes | None = None, extra: dict[str, str] | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    headers.update(extra or {})
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Daemon(Process):
    """The real ``twistd -n anonticket`` on loopback tcp endpoints, SQLite in ``data_dir``."""

    def __init__(self, data_dir: Path, *extra: str, profile: Path | None = None) -> None:
        self.public, self.internal = free_port(), free_port()
        argv = [
            TWISTD, "-n", "--pidfile=", "anonticket",
            "--data-dir", str(data_dir),
            "--database", f"sqlite:///{data_dir / 'anonticket.sqlite3'}",
            "--public", f"tcp:{self.public}:interface=127.0.0.1",
            "--internal", f"tcp:{self.internal}:interface=127.0.0.1",
            *extra,
        ]  # fmt: skip
        if profile is not None:
            # py-spy runs the daemon as its child (attaching to a running process needs ptrace
            # rights a container often lacks) and writes its samples when it gets SIGINT.
            argv = [PY_SPY, "record", "--rate", "250", "--format", "raw", "--output",
                    str(profile), "--", *argv]  # fmt: skip
            self.stop_signal = signal.SIGINT
        super().__init__(argv, data_dir.parent / f"{data_dir.name}-daemon.log", self.public)
        self.wait_listening(self.internal)

    def target(self, scenario: str) -> str:
        return self.internal_url if scenario in INTERNAL_SCENARIOS else self.url

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal}"

    def internal_get(self, path: str) -> bytes:
        return http("GET", f"{self.internal_url}{path}")[1]

    def metric(self, series: str) -> float:
        return self.metrics(series).get(series, 0.0)

    def metrics(self, prefix: str) -> dict[str, float]:
        """The series of /metrics whose name (with labels) starts with ``prefix``."""
        lines = self.internal_get("/metrics").decode().splitlines()
        return {
            name: float(value)
            for line in lines
            if line.startswith(prefix)
            for name, value in [line.rsplit(" ", 1)]
        }

    def token_view(self, token: str) -> dict[str, Any]:
        """The internal view of a token (balance, version, credited, spent, ...)."""
        view: dict[str, Any] = json.loads(self.internal_get(f"/api/v1/token/{token}"))
        return view


class Baseline(Process):
    """bench/baseline.py answering as many bytes as the daemon does."""

    def __init__(self, log: Path, post_size: int, get_size: int, tuned: bool = False) -> None:
        port = free_port()
        argv = [PYTHON, str(BENCH / "baseline.py"), str(port)]
        argv += ["--post-size", str(post_size), "--get-size", str(get_size)]
        argv += ["--tuned"] if tuned else []
        super().__init__(argv, log, port)


P = TypeVar("P", bound=Process)


@contextmanager
def running(process: P) -> Iterator[P]:
    try:
        yield process
    finally:
        process.stop()


# --- seeding and wrk ------------------------------------------------------------------------


@dataclass
class Seeded:
    """A data directory seeded through the store (bench/seed.py), and the wrk input files."""

    data: Path
    inputs: Path
    available: int  # unclaimed PIDs listed for the success scenario
    seconds: float  # how long seeding took
    consumed: int = 0  # of which success runs have claimed so far: the next run starts after

    @classmethod
    def make(cls, tmp: Path, name: str, payments: int, claimed: int, listed: int) -> Seeded:
        data, inputs = tmp / f"{name}-data", tmp / f"{name}-inputs"
        say(f"seeding {payments:,} payments ({claimed:,} of them redeemed) ...")
        started = time.monotonic()
        subprocess.run(
            [PYTHON, str(BENCH / "seed.py"), str(data), str(inputs), "--payments", str(payments),
             "--claimed", str(claimed), "--list-max", str(listed)],
            check=True,
        )  # fmt: skip
        took = time.monotonic() - started
        return cls(data, inputs, min(listed, payments - claimed), took)

    def files(self, scenario: str) -> tuple[Path | None, Path | None]:
        """The (PIDs, tokens) files a scenario's wrk script reads."""
        unclaimed, claimed, tokens, hot = (self.inputs / f"{n}.txt" for n in SEEDED_FILES)
        return {
            "unknown": (None, None),
            "success": (unclaimed, None),
            "retry": (claimed, None),
            "introspect": (None, tokens),
            "mixed": (claimed, tokens),
            "spend": (None, tokens),
            "spend-hot": (None, hot),
        }[scenario]

    @property
    def hot_token(self) -> str:
        """The one token spend-hot spends from."""
        return (self.inputs / "hot.txt").read_text().strip()


SEEDED_FILES = ("unclaimed", "claimed", "tokens", "hot")


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    sent: int  # requests generated (PIDs used), completed or not
    statuses: dict[str, int]
    others: float  # CPU (in cores) used by processes other than wrk and the server meanwhile

    def errors(self, expected: set[str]) -> int:
        wrong = sum(n for key, n in self.statuses.items() if key not in expected)
        return self.socket_errors + wrong


def busy_cpu_seconds() -> float:
    """CPU time all processes have used, from the first line of /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # less idle and iowait


def children_cpu_seconds() -> float:
    """CPU time of the children that have exited (wrk, once subprocess.run returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(
    server: Process, scenario: str, connections: int, seconds: int, seeded: Seeded, log: Path
) -> Run:
    pids, tokens = seeded.files(scenario)
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(LUA),
        server.target(scenario),
        "--", scenario, str(seeded.consumed), str(pids or "-"), str(tokens or "-"),
        str(random.randrange(1, 2**31)), str(SPEND_AMOUNT),
    ]  # fmt: skip
    # What other processes used meanwhile tells how noisy the machine was for this run.
    before = busy_cpu_seconds(), server.cpu_seconds(), children_cpu_seconds()
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    wall = time.monotonic() - started
    ours = server.cpu_seconds() - before[1] + children_cpu_seconds() - before[2]  # + wrk
    others = max(0.0, (busy_cpu_seconds() - before[0] - ours) / wall)
    with open(log, "a") as out:
        out.write(" ".join(argv) + "\n" + done.stdout + done.stderr + "\n")
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench: wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    data = json.loads(lines[-1].removeprefix("BENCH "))
    run = Run(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        socket_errors=sum(data[k] for k in ("connect", "read", "write", "timeout")),
        sent=data["sent"],
        statuses=data["statuses"],
        others=others,
    )
    server.runs.append(run)
    return run


def measure(
    args: argparse.Namespace, server: Process, scenario: str, conns: int, seeded: Seeded, log: Path
) -> Run:
    """A warm-up run, then the measured run (its figures are returned)."""
    result: Run | None = None
    for seconds in (args.warmup, args.duration):
        if seconds > 0:
            result = wrk(server, scenario, conns, seconds, seeded, log)
            if scenario == "success" and isinstance(server, Daemon):  # claims are for good
                seeded.consumed += result.sent
    if seeded.consumed > seeded.available:
        say(f"warning: success ran past the {seeded.available:,} listed PIDs (extra requests "
            "are retries, counted as errors); raise --payments")  # fmt: skip
    assert result is not None
    return result


def measure_daemon(
    args: argparse.Namespace, scenario: str, conns: int, seeded: Seeded, log: Path
) -> tuple[Run, float, SpendCheck | None]:
    """Warm-up and measured run against a freshly started daemon: (the run, its peak RSS, and
    for the spend scenarios what the daemon did with the spends)."""
    profile = None if args.profile is None else args.profile / f"{scenario}-{conns}.txt"
    with running(Daemon(seeded.data, "--no-monitor", profile=profile)) as daemon:
        hot = seeded.hot_token if scenario == "spend-hot" else None
        before = daemon.token_view(hot) if hot else None
        run = measure(args, daemon, scenario, conns, seeded, log)
        check = None
        if scenario in INTERNAL_SCENARIOS:
            check = SpendCheck.after_runs(daemon, hot, before)
        return run, daemon.peak_rss_mb(), check


T = TypeVar("T")


def settled(read: Callable[[], T], pause: float = 0.2, timeout: float = 10) -> T:
    """What ``read()`` gives once two calls ``pause`` apart agree: the daemon has finished the
    requests wrk sent but stopped waiting for at the end of a run."""
    value = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(pause)
        value, last = read(), value
        if value == last:
            break
    return value


@dataclass
class SpendCheck:
    """What the daemon did with a spend row's requests, over all its runs (warm-up included):
    its spend outcomes from /metrics and, for spend-hot, the hot token before and after.

    The exactly-once check: every spend is one version of the token, so the balance must have
    dropped by exactly ``SPEND_AMOUNT`` per version (and ``spent`` grown as much), and the
    spends made lie between the 200 answers wrk counted and the requests it sent: wrk stops
    waiting for the requests in flight when a run ends, which the daemon has already read and
    still makes (each key once).  That no two spends took the same balance (a lost update) the
    wrk script checks on every 200 answer: all their balances differ.
    """

    outcomes: dict[str, int]  # anonticket_spend_requests_total by outcome
    answered: int  # 200/active answers wrk counted
    sent: int  # requests wrk sent, answered or not
    duplicates: int  # 200 answers showing a balance an earlier one of their run showed
    before: dict[str, Any] | None = None  # the hot token's internal view
    after: dict[str, Any] | None = None

    @classmethod
    def after_runs(
        cls, daemon: Daemon, hot: str | None, before: dict[str, Any] | None
    ) -> SpendCheck:
        after = settled(lambda: daemon.token_view(hot)) if hot else None
        series = "anonticket_spend_requests_total{outcome="
        outcomes = {
            name.removeprefix(series).strip('"}'): int(value)
            for name, value in settled(lambda: daemon.metrics(series)).items()
            if value
        }
        runs = daemon.runs
        return cls(
            outcomes,
            answered=sum(run.statuses.get("200/active", 0) for run in runs),
            sent=sum(run.sent for run in runs),
            duplicates=sum(run.statuses.get("200/duplicate_balance", 0) for run in runs),
            before=before,
            after=after,
        )

    @property
    def spends(self) -> int | None:
        """Spends made on the hot token: one version each."""
        if self.before is None or self.after is None:
            return None
        return int(self.after["version"]) - int(self.before["version"])

    @property
    def exact(self) -> bool:
        if self.before is None or self.after is None or self.spends is None:
            return True  # spend: nothing to compare
        drop = self.before["balance"] - self.after["balance"]
        spent = self.after["spent"] - self.before["spent"]
        amount = self.spends * SPEND_AMOUNT
        in_range = self.answered <= self.spends <= self.sent
        return drop == spent == amount and in_range and not self.duplicates

    def report(self) -> list[str]:
        counts = ", ".join(f"{k} {n:,}" for k, n in sorted(self.outcomes.items())) or "none"
        lines = [
            f"spend outcomes counted by the daemon (/metrics): {counts}; wrk counted "
            f"{self.answered:,} answers 200/active of {self.sent:,} requests sent"
        ]
        if self.before is not None and self.after is not None and self.spends is not None:
            before, after = self.before, self.after
            seen = (
                f"{self.duplicates:,} balances shown twice"
                if self.duplicates
                else "every balance different"
            )
            lines.append(
                f"exactly once: the hot token's version +{self.spends:,}, balance "
                f"{before['balance']:,} -> {after['balance']:,} "
                f"(-{before['balance'] - after['balance']:,}; {SPEND_AMOUNT} a spend), spent "
                f"+{after['spent'] - before['spent']:,}; {self.answered:,} spends answered 200 "
                f"({seen}) + {self.spends - self.answered:,} in flight when wrk stopped "
                f"waiting (at most {self.sent - self.answered:,}): "
                + ("exact" if self.exact else "MISMATCH")
            )
        return lines


# --- the HTTP scenarios ---------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    connections: int
    run: Run
    base: Run | None
    rss_mb: float
    tuned: Run | None = None  # the baseline with the daemon's settings (baseline.py --tuned)
    spends: SpendCheck | None = None  # the spend scenarios: what the daemon did with them

    @property
    def errors(self) -> int:
        return self.run.errors(EXPECTED[self.scenario])

    @property
    def ratio(self) -> float | None:
        return None if self.base is None else self.run.rps / self.base.rps

    @property
    def p99_ratio(self) -> float | None:
        return None if self.base is None else self.run.p99_ms / self.base.p99_ms

    @property
    def tuned_ratio(self) -> float | None:
        return None if self.tuned is None else self.run.rps / self.tuned.rps

    @property
    def tuned_p99_ratio(self) -> float | None:
        return None if self.tuned is None else self.run.p99_ms / self.tuned.p99_ms

    def misses(self) -> list[str]:
        missed = []
        target = TARGET_RATIO.get(self.scenario)
        if target is not None and self.ratio is not None and self.ratio < target:
            missed.append(f"req/s<{target:.0%}")
        factor = P99_FACTORS.get(self.scenario, P99_FACTOR)
        if self.p99_ratio is not None and self.p99_ratio > factor:
            missed.append(f"p99>{factor}x")
        floors = [b for b in (self.base, self.tuned) if b is not None]
        if self.errors or any(b.errors(BASELINE_EXPECTED) for b in floors):
            missed.append("errors")
        if self.spends is not None and not self.spends.exact:
            missed.append("exactly-once")
        return missed


def probe_sizes(seeded: Seeded) -> dict[str, tuple[int, int]]:
    """Body sizes of the daemon's answers, so the baseline answers as many bytes:
    scenario -> (POST answer size, GET answer size)."""
    pid = (seeded.inputs / "claimed.txt").read_text().split()[0]
    token = (seeded.inputs / "tokens.txt").read_text().split()[0]
    with running(Daemon(seeded.data, "--no-monitor")) as daemon:
        url = daemon.url
        unknown = http("POST", f"{url}/api/v1/redeem", b'{"pid":"%016x"}' % random.getrandbits(63))
        retry = http("POST", f"{url}/api/v1/redeem", b'{"pid":"%s"}' % pid.encode())
        introspect = http("GET", f"{url}/api/v1/token/{token}")
        spend = http(
            "POST",
            f"{daemon.internal_url}/api/v1/token/{token}/spend",
            b'{"amount":%d}' % SPEND_AMOUNT,
            {"Idempotency-Key": f"bench-probe-{random.getrandbits(63):x}"},
        )
    statuses = (unknown[0], retry[0], introspect[0], spend[0])
    assert statuses == (404, 200, 200, 200), (unknown, retry, introspect, spend)
    success = retry[1].replace(b'"already_claimed"', b'"success"')
    get = len(introspect[1])
    return {
        "unknown": (len(unknown[1]), get),
        "success": (len(success), get),
        "retry": (len(retry[1]), get),
        "introspect": (len(retry[1]), get),
        "mixed": (len(retry[1]), get),
        "spend": (len(spend[1]), get),
        "spend-hot": (len(spend[1]), get),
    }


def connections_of(args: argparse.Namespace, scenario: str) -> list[int]:
    """The connection counts a scenario's rows run at: --connections, except that spend-hot
    runs at HOT_CONNECTIONS unless --connections was given."""
    if scenario == "spend-hot" and not args.connections_given:
        return [HOT_CONNECTIONS]
    connections: list[int] = args.connections
    return connections


def http_bench(args: argparse.Namespace, tmp: Path) -> list[Row]:
    success_seconds = (args.warmup + args.duration) * len(args.connections)
    listed = min(args.payments, MAX_CLAIMS_PER_SECOND * success_seconds)
    seeded = Seeded.make(tmp, "http", args.payments, args.claimed, listed)
    sizes = probe_sizes(seeded)
    log = tmp / "wrk.log"
    rows: list[Row] = []
    for scenario in args.scenarios:
        for conns in connections_of(args, scenario):
            say(f"{scenario} @ {conns} connections ...")
            run, rss, check = measure_daemon(args, scenario, conns, seeded, log)
            with running(Baseline(tmp / "baseline.log", *sizes[scenario])) as baseline:
                base = measure(args, baseline, scenario, conns, seeded, log)
            with running(Baseline(tmp / "tuned.log", *sizes[scenario], tuned=True)) as floor:
                tuned = measure(args, floor, scenario, conns, seeded, log)
            rows.append(Row(scenario, conns, run, base, rss, tuned, check))
    return rows


# --- surge admission ------------------------------------------------------------------------


@dataclass
class SurgeRow:
    connections: int
    limit: int  # --admission-limit (0: off)
    run: Run
    probe: dict[int, list[float]]  # the probe's latencies (ms) by HTTP status

    @property
    def refused(self) -> int:
        return self.run.statuses.get("503/overloaded", 0)

    @property
    def admitted(self) -> int:
        return self.run.statuses.get("200/success", 0)


class Probe(threading.Thread):
    """One more client beside wrk: first claims one after another on its own connection,
    timing each answer by its status, so admitted (200) and refused (503) requests get their
    own latencies (wrk's figures mix them)."""

    def __init__(self, port: int, pids: list[str]) -> None:
        super().__init__(daemon=True)
        self._port, self._pids = port, pids
        self.stop = threading.Event()
        self.latencies: dict[int, list[float]] = {}

    def run(self) -> None:
        conn = HTTPConnection("127.0.0.1", self._port, timeout=30)
        for pid in self._pids:
            if self.stop.is_set():
                break
            body = b'{"pid":"%s"}' % pid.encode()
            started = time.perf_counter()
            try:
                conn.request("POST", "/api/v1/redeem", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
            except (OSError, HTTPException):
                conn.close()
                conn = HTTPConnection("127.0.0.1", self._port, timeout=30)
                continue
            elapsed = (time.perf_counter() - started) * 1000
            self.latencies.setdefault(response.status, []).append(elapsed)
        conn.close()


def surge_bench(args: argparse.Namespace, tmp: Path) -> list[SurgeRow]:
    """First claims (every one a database write) at the sustainable load (the highest
    --connections) and at 10 times it, with admission control at its default and off; a probe
    client beside wrk times admitted and refused answers apart."""
    sustainable = max(args.connections)
    plan = [
        (sustainable, 1000),
        (10 * sustainable, 1000),
        (10 * sustainable, 100),
        (10 * sustainable, 0),
    ]
    seconds = (args.warmup + args.duration) * len(plan)
    reserve = 50_000  # PIDs kept for the probes, from the end of the list
    listed = min(args.payments, MAX_CLAIMS_PER_SECOND * seconds + reserve)
    seeded = Seeded.make(tmp, "surge", args.payments, args.claimed, listed)
    unclaimed = (seeded.inputs / "unclaimed.txt").read_text().split()
    probe_pids = unclaimed[-reserve:]
    seeded.available -= reserve
    log = tmp / "surge-wrk.log"
    rows = []
    for i, (conns, limit) in enumerate(plan):
        say(f"surge: success @ {conns} connections, --admission-limit {limit} ...")
        daemon = Daemon(seeded.data, "--no-monitor", "--admission-limit", str(limit))
        with running(daemon):
            share = len(probe_pids) // len(plan)
            probe = Probe(daemon.public, probe_pids[i * share : (i + 1) * share])
            probe.start()
            try:
                run = measure(args, daemon, "success", conns, seeded, log)
            finally:
                probe.stop.set()
                probe.join(60)
        rows.append(SurgeRow(conns, limit, run, probe.latencies))
    return rows


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latencies(row: SurgeRow, status: int) -> str:
    values = row.probe.get(status, [])
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    return "-" if p50 is None else f"{fmt(p50)} / {fmt(p99)} ({len(values):,})"


def report_surge(rows: list[SurgeRow]) -> str:
    header = ["conns", "admission", "req/s", "admitted/s", "refused %", "wrk p99 ms"]
    header += ["probe 200 p50/p99 ms", "probe 503 p50/p99 ms", "other errors"]
    body = []
    for r in rows:
        other = r.run.errors({"200/success", "503/overloaded"})
        total = max(1, sum(r.run.statuses.values()))
        seconds = r.run.sent / r.run.rps if r.run.rps else 1.0

        body.append([
            str(r.connections), str(r.limit) if r.limit else "off", fmt(r.run.rps, ",.0f"),
            fmt(r.admitted / seconds, ",.0f"), fmt(100 * r.refused / total, ".1f"),
            fmt(r.run.p99_ms), _latencies(r, 200), _latencies(r, 503), str(other),
        ])  # fmt: skip
    return table(header, body)


# --- monitor ingest -------------------------------------------------------------------------


@dataclass
class Ingest:
    transfers: int
    heights: int
    credited: int
    seconds: float
    rss_mb: float

    @property
    def rate(self) -> float:
        return self.credited / self.seconds


def monitor_bench(args: argparse.Namespace, tmp: Path) -> Ingest:
    """The daemon's monitor catching up on a stand-in wallet's history: from the wallet's first
    call until the internal /healthz shows the cursor at the top."""
    port, stats = free_port(), tmp / "wallet-stats.json"
    n, top = args.monitor_transfers, args.monitor_heights
    say(f"monitor ingest: {n:,} transfers over {top:,} blocks ...")
    wallet_argv = [PYTHON, str(BENCH / "fakewallet.py"), str(port), str(stats)]
    wallet_argv += ["--transfers", str(n), "--heights", str(top), "--confirmations", "10"]
    with running(Process(wallet_argv, tmp / "fakewallet.log", port)):
        daemon = Daemon(
            tmp / "monitor-data",
            "--wallet-rpc", f"http://127.0.0.1:{port}",
            "--poll-interval", "1",
            "--min-confirmations", "10",
        )  # fmt: skip
        with running(daemon):
            deadline = time.monotonic() + 600
            health: dict[str, object] = {}
            while time.monotonic() < deadline and health.get("cursor") != top:
                time.sleep(0.05)
                health = json.loads(daemon.internal_get("/healthz"))
            if health.get("cursor") != top:
                raise SystemExit(f"bench: the monitor did not catch up: {health}")
            finished = time.time()
            credited = daemon.metric('anonticket_monitor_transfers_total{outcome="credited"}')
            first_call = json.loads(stats.read_text())["first_call"]
            return Ingest(n, top, int(credited), finished - first_call, daemon.peak_rss_mb())


# --- storage scale --------------------------------------------------------------------------


@dataclass
class Scale:
    seeded: Seeded
    payments: int
    db_mb: float
    rows: list[Row]


def scale_bench(args: argparse.Namespace, tmp: Path) -> Scale:
    """Redeem latency and the daemon's memory with many payments stored."""
    listed = MAX_CLAIMS_PER_SECOND * (args.warmup + args.duration) * len(args.connections)
    seeded = Seeded.make(tmp, "scale", args.scale_payments, 1_000, listed)
    db_mb = sum(f.stat().st_size for f in seeded.data.glob("anonticket.sqlite3*")) / 2**20
    rows = []
    for scenario in ("success", "unknown"):
        for conns in args.connections:
            say(f"scale: {scenario} @ {conns} connections ...")
            run, rss, _ = measure_daemon(args, scenario, conns, seeded, tmp / "wrk.log")
            rows.append(Row(scenario, conns, run, None, rss))
    return Scale(seeded, args.scale_payments, db_mb, rows)


# --- report ---------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, aligned so that it reads as well in a terminal."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def report_http(rows: list[Row]) -> str:
    header = [
        "scenario", "conns", "req/s", "p50 ms", "p99 ms", "errors", "base req/s", "base p99 ms",
        "ratio", "p99/base", "tuned req/s", "tuned p99 ms", "ratio tuned", "p99/tuned",
        "peak RSS MB", "others CPU", "targets",
    ]  # fmt: skip
    body = [
        [
            r.scenario, str(r.connections), fmt(r.run.rps, ",.0f"), fmt(r.run.p50_ms),
            fmt(r.run.p99_ms), str(r.errors), fmt(r.base.rps, ",.0f"), fmt(r.base.p99_ms),
            fmt(r.ratio), fmt(r.p99_ratio),
            fmt(r.tuned.rps if r.tuned else None, ",.0f"),
            fmt(r.tuned.p99_ms if r.tuned else None), fmt(r.tuned_ratio), fmt(r.tuned_p99_ratio),
            fmt(r.rss_mb, ".1f"),
            fmt(max(r.run.others, r.base.others, r.tuned.others if r.tuned else 0)),
            "MISS " + ", ".join(r.misses()) if r.misses() else "met",
        ]
        for r in rows
        if r.base is not None
    ]  # fmt: skip
    answers = [
        "",
        "ratio: req/s over the baseline's (bare Klein, Twisted's defaults: issue #6's targets); "
        "tuned: the same baseline with the daemon's settings (GC heap freeze, no form parsing), "
        "so 'ratio tuned' is only the work the daemon adds; others CPU: cores busy with "
        "processes other than wrk and the server under test during any of the row's runs "
        "(0 on a quiet machine)",
        "",
        "answers (daemon | baseline):",
    ]
    for r in rows:
        daemon = ", ".join(f"{k} {n:,}" for k, n in sorted(r.run.statuses.items()))
        base = ", ".join(f"{k} {n:,}" for k, n in sorted(r.base.statuses.items())) if r.base else ""
        extra = f", {r.run.socket_errors} socket errors" if r.run.socket_errors else ""
        answers.append(f"  {r.scenario} @ {r.connections}: {daemon}{extra} | {base}")
        if r.spends is not None:
            answers += [f"    {line}" for line in r.spends.report()]
    return table(header, body) + "\n" + "\n".join(answers)


def report_ingest(ingest: Ingest) -> str:
    met = ingest.rate >= MONITOR_TARGET and ingest.credited == ingest.transfers
    return table(
        ["transfers", "blocks", "credited", "catch-up s", "credited/s", "peak RSS MB", "target"],
        [[
            f"{ingest.transfers:,}", f"{ingest.heights:,}", f"{ingest.credited:,}",
            fmt(ingest.seconds), fmt(ingest.rate, ",.0f"), fmt(ingest.rss_mb, ".1f"),
            f"{'met' if met else 'MISS'} (>= {MONITOR_TARGET:,}/s)",
        ]],
    )  # fmt: skip


def report_scale(scale: Scale) -> str:
    header = ["scenario", "conns", "req/s", "p50 ms", "p99 ms", "errors", "peak RSS MB"]
    header += ["others CPU", "target"]
    body = [
        [
            r.scenario, str(r.connections), fmt(r.run.rps, ",.0f"), fmt(r.run.p50_ms),
            fmt(r.run.p99_ms), str(r.errors), fmt(r.rss_mb, ".1f"), fmt(r.run.others),
            "met" if r.rss_mb <= SCALE_RSS_TARGET else f"MISS (RSS > {SCALE_RSS_TARGET:.0f} MB)",
        ]
        for r in scale.rows
    ]  # fmt: skip
    note = (
        f"{scale.payments:,} payments stored (seeded through the store in "
        f"{scale.seeded.seconds:.0f} s); database {scale.db_mb:.0f} MB"
    )
    return note + "\n\n" + table(header, body)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    return (
        f"machine: {os.cpu_count()} CPUs, {models[0] if models else platform.machine()}; "
        f"Python {platform.python_version()}; {wrk_version.split('[')[0].strip()} (-t1); "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )


# --- main -----------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--duration", type=int, help="seconds per measured run (default 10)")
    add("--warmup", type=int, help="seconds of warm-up before each (default 3; 0: none)")
    add("--connections", help='comma list of wrk connection counts (default "16,64"; '
        f"spend-hot: {HOT_CONNECTIONS} unless given; at most {INTERNAL_MAX_CONNECTIONS} for the "
        "spend scenarios, the internal site's cap)")  # fmt: skip
    add("--payments", type=int, help="payments seeded for the HTTP scenarios (default 200,000)")
    add("--claimed", type=int, help="of which redeemed up front (default 10,000)")
    add("--scenarios", default=",".join(SCENARIOS), help="comma list (default: all; '' none)")
    add("--quick", action="store_true",
        help="tiny sizes, 1 s runs, 16 connections (spend-hot: 64); the smoke test")  # fmt: skip
    add("--monitor", action="store_true", help="also run the monitor ingest benchmark")
    add("--monitor-transfers", type=int, help="default 100,000")
    add("--monitor-heights", type=int, help="blocks they are spread over (default 10,000)")
    add("--surge", action="store_true", help="also run the surge admission benchmark (first "
        "claims at the highest --connections and at 10 times it)")  # fmt: skip
    add("--scale", action="store_true", help="also run the storage scale benchmark")
    add("--scale-payments", type=int, help="default 1,000,000")
    add("--keep", action="store_true", help="keep the temporary directory (logs, databases)")
    add("--profile", type=Path, metavar="DIR", help="run each HTTP row's daemon under py-spy "
        "(pip install py-spy) and write its samples to DIR/<scenario>-<conns>.txt (collapsed "
        "stacks); the figures of a profiled run are slowed by the sampling")  # fmt: skip
    args = parser.parse_args(argv)
    args.connections_given = args.connections is not None
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.connections = [int(c) for c in str(args.connections).split(",") if c]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    for scenario in INTERNAL_SCENARIOS.intersection(args.scenarios):
        if max(connections_of(args, scenario)) > INTERNAL_MAX_CONNECTIONS:
            parser.error(
                f"{scenario} loads the internal site, which holds at most "
                f"{INTERNAL_MAX_CONNECTIONS} connections: lower --connections"
            )
    if args.profile is not None:
        if not Path(PY_SPY).exists():
            parser.error(f"--profile needs py-spy in the venv ({PY_SPY}): pip install py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    if not 0 < args.claimed < args.payments:
        parser.error("--claimed must be positive and below --payments")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if shutil.which("wrk") is None:
        say("bench: wrk is not installed; bench/run installs it (apt-get install wrk)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="anonticket-bench-"))
    sections = [machine()]
    try:
        if args.scenarios:
            rows = http_bench(args, tmp)
            sections.append(
                f"HTTP scenarios: {args.payments:,} payments stored; wrk -t1, {args.warmup} s "
                f"warm-up, then {args.duration} s measured; baseline = bench/baseline.py\n\n"
                + report_http(rows)
            )
        if args.surge:
            sections.append("surge admission\n\n" + report_surge(surge_bench(args, tmp)))
        if args.monitor:
            sections.append("monitor ingest\n\n" + report_ingest(monitor_bench(args, tmp)))
        if args.scale:
            sections.append("storage scale\n\n" + report_scale(scale_bench(args, tmp)))
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    sections.append(f"load average after: {os.getloadavg()[0]:.2f}")
    print("\n\n".join(sections), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
