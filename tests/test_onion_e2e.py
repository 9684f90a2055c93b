"""The daemon as an onion service, for real.

* With defaults, ``twistd -n anonticket`` launches its own tor and prints an onion address that
  survives a restart (here with ``DisableNetwork 1`` through ``--tor-config``: this machine must
  not touch the public Tor network).
* End to end over a private Tor network on loopback (tests/tor_privnet.py): the real daemon
  publishes its public site through one of the network's tors (``--tor-control``) and through a
  tor it launches itself (``--tor-config`` with the network's torrc lines); a client redeems a
  payment and reads the token's status through the ``.onion`` with ``anonticket-client --socks``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from anonticket.domain import PaymentId
from anonticket.store import Store

from . import tor_privnet
from .conftest import reactor, transfer
from .daemonproc import Daemon, client, run_client

pytestmark = pytest.mark.skipif(
    not tor_privnet.available(), reason="needs tor and tor-gencert (Debian package tor)"
)


def onion_state(daemon: Daemon) -> str:
    for line in daemon.get("/metrics")[1].decode().splitlines():
        m = re.match(r'anonticket_onion_state\{anonticket_onion_state="(\w+)"\} 1\.0', line)
        if m:
            return m.group(1)
    raise AssertionError("no onion state")


def wait_state(daemon: Daemon, state: str, timeout: float) -> float:
    started = time.monotonic()
    while onion_state(daemon) != state:
        assert time.monotonic() - started < timeout, (onion_state(daemon), daemon.log_text())
        time.sleep(0.1)
    return time.monotonic() - started


def test_default_daemon_launches_tor_and_keeps_its_onion_address(tmp_path):
    torrc = tmp_path / "offline.torrc"
    torrc.write_text("DisableNetwork 1  # never the public Tor network from a test\n")
    daemon = Daemon(
        tmp_path / "data", "--no-monitor", "--tor-config", str(torrc), public="onion:80"
    )
    addresses = []
    for _ in range(2):
        daemon.start()
        hostname = daemon.data_dir / "onion_hostname"
        # Without network tor never bootstraps: not "publishing", and /healthz says why.
        wait_state(daemon, "bootstrapping", 30)
        address = hostname.read_text().strip()
        assert re.fullmatch(r"[a-z2-7]{56}\.onion", address)
        assert f"onion service {address} created" in daemon.log_text()
        code, raw = daemon.get("/healthz")
        health = json.loads(raw)
        assert code == 503 and health["status"] == "unavailable", health
        assert health["tor"]["state"] == "bootstrapping"
        assert 0 <= health["tor"]["bootstrap_percent"] < 100
        assert "cannot reach the Tor network" in health["reason"]
        assert health["store"] == "ok" and health["monitor"] == "disabled"  # the rest is up
        assert daemon.metric("anonticket_tor_bootstrap_percent") < 100
        addresses.append(address)
        assert daemon.stop() in (0, -15)
    assert addresses[0] == addresses[1]
    assert (daemon.data_dir / "onion.key").stat().st_mode & 0o777 == 0o600
    assert not (daemon.data_dir / "public.sock").exists()
    log = daemon.log_text()
    assert "Traceback" not in log and "Unhandled" not in log
    assert "tor exited" in log


@pytest.fixture(scope="module")
def network() -> Iterator[tor_privnet.TorNetwork]:
    with tor_privnet.TorNetwork() as net:
        net.client_tor()
        net.wait_ready(120)
        yield net


async def seed(data_dir: Path, pid: PaymentId, amount: int) -> None:
    data_dir.mkdir(mode=0o700, exist_ok=True)
    store = Store(reactor, f"sqlite:///{data_dir / 'anonticket.sqlite3'}", data_dir)
    store.open()
    try:
        await store.record_transfers([transfer(pid.raw, 1, amount=amount)], now=1)
    finally:
        store.close()


def redeem_over_tor(daemon: Daemon, network: tor_privnet.TorNetwork, pid: str) -> dict[str, Any]:
    url = "http://" + (daemon.data_dir / "onion_hostname").read_text().strip()
    socks = network.client_socks_endpoint
    deadline = time.monotonic() + 60
    while True:  # the descriptor may take a moment to reach the directories
        code, body = client("redeem", pid, "--url", url, "--socks", socks)
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert code == 0, body
    code, status = client("status", body["service_token"], "--url", url, "--socks", socks)
    assert code == 0 and status["status"] == "active", status
    assert isinstance(body, dict), body
    return body


@pytest.mark.parametrize("mode", ["attached", "launched"])
@pytest_twisted.ensureDeferred
async def test_redeem_and_status_through_the_onion(network, tmp_path, mode, capsys):
    pid = PaymentId.parse("0123456789abcdef")
    await seed(tmp_path / "data", pid, 7 * 10**11)
    if mode == "attached":
        args = ["--tor-control", network.service_tor()]
    else:
        torrc = tmp_path / "privnet.torrc"
        torrc.write_text("\n".join(network.torrc_lines_for_network()) + "\n")
        args = ["--tor-config", str(torrc)]
    daemon = Daemon(tmp_path / "data", "--no-monitor", *args, public="onion:80")
    # The daemon is another process: these blocking waits stall only this test's reactor.
    started = time.monotonic()
    daemon.start()
    try:
        published = wait_state(daemon, "published", 120)
        health = daemon.health()
        assert health["status"] == "ok", health
        assert health["tor"]["state"] == "published" and health["tor"]["bootstrap_percent"] == 100
        assert daemon.metric("anonticket_tor_bootstrap_percent") == 100
        body = redeem_over_tor(daemon, network, pid.hex)
        elapsed = time.monotonic() - started
    finally:
        code = daemon.stop()
    assert body["status"] == "success" and body["balance"] == 7 * 10**11
    assert code in (0, -15)
    log = daemon.log_text()
    assert "Traceback" not in log and pid.hex not in log and body["service_token"] not in log
    with capsys.disabled():
        print(
            f"\n[onion e2e] {mode}: published after {published:.1f}s, "
            f"redeem + status through the onion done {elapsed:.1f}s after start"
        )


@pytest_twisted.ensureDeferred
async def test_passes_bought_through_the_onion_verify_once(network, tmp_path, capsys):
    """A user with a funded token buys passes through the onion (the private Tor network) with
    anonticket-client; the service checks each once on the internal site."""
    pid = PaymentId.parse("0123456789abcdef")
    await seed(tmp_path / "data", pid, 10**6)
    daemon = Daemon(
        tmp_path / "data",
        "--no-monitor",
        "--tor-control",
        network.service_tor(),
        "--pass-price",
        "1000",
        public="onion:80",
    )
    daemon.start()
    store = tmp_path / "passes.json"
    try:
        wait_state(daemon, "published", 120)
        body = redeem_over_tor(daemon, network, pid.hex)
        url = "http://" + (daemon.data_dir / "onion_hostname").read_text().strip()
        started = time.monotonic()
        bought = run_client(
            "passes",
            "buy",
            body["service_token"],
            "--count",
            "5",
            "--url",
            url,
            "--socks",
            network.client_socks_endpoint,
            "--store",
            str(store),
            timeout=120,
        )
        took = time.monotonic() - started
        assert (bought.returncode, bought.stderr) == (0, ""), bought.stderr
        answers = []
        for _ in range(5):
            used = run_client("passes", "use", "--store", str(store))
            assert used.returncode == 0
            value = used.stdout.strip()[len('PrivateToken token="') : -1]
            answers.append(_verify(daemon, value))
            answers.append(_verify(daemon, value))
    finally:
        daemon.stop()
    assert answers == [200, 409] * 5
    log = daemon.log_text()
    assert "Traceback" not in log and body["service_token"] not in log
    with capsys.disabled():
        print(f"\n[onion e2e] 5 passes bought through the onion in {took:.1f}s (whole process)")


def _verify(daemon: Daemon, token: str) -> int:
    request = urllib.request.Request(
        daemon.internal_url + "/api/v1/passes/verify",
        data=json.dumps({"token": token}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
