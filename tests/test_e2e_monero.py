"""End to end against the genuine monerod and monero-wallet-rpc on a private regtest chain.

The daemon under test is the real ``twistd -n anonticket`` process, its monitor reading the
merchant's *view-only* wallet through HTTP Digest (``--rpc-login``); the payer pays integrated
addresses made by ``anonticket-client new`` and redeems with ``anonticket-client redeem``.  Every
test drives blocks explicitly; nothing waits on wall-clock block times.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from .daemonproc import Daemon, client
from .monero_regtest import Regtest, WalletRPC, available

pytestmark = pytest.mark.skipif(not available(), reason="monerod/monero-wallet-rpc not installed")

N = 10  # --min-confirmations
XMR = 10**12
LOGIN = ("monitor", "digest-s3cret")


class Chain:
    def __init__(self, rt: Regtest, payer: WalletRPC, merchant: WalletRPC, watch: WalletRPC):
        self.rt, self.payer, self.merchant, self.watch = rt, payer, merchant, watch
        # Every secret and payment detail the tests create, for the privacy check at the end.
        self.secrets: set[str] = set()

    def pay(self, address: str, amount: int) -> str:
        txid = self.payer.transfer(address, amount)
        self.secrets.update({txid, str(amount)})
        return txid

    def mine(self, n: int) -> int:
        height = self.rt.mine(n)
        self.payer.refresh()
        return height

    def new_payment_address(self) -> tuple[str, str]:
        code, out = client("new", "--address", self.merchant.address)
        assert code == 0, out
        # Byte for byte what the wallet itself makes for this payment id.
        assert self.merchant.make_integrated_address(out["pid"]) == out["integrated_address"]
        assert self.merchant.split_integrated_address(out["integrated_address"]) == (
            self.merchant.address,
            out["pid"],
        )
        self.secrets.add(out["pid"])
        return out["pid"], out["integrated_address"]


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with Regtest() as rt:
        payer = rt.wallet("payer")
        merchant = rt.wallet("merchant")
        watch = rt.view_only_wallet(merchant, "merchant-watch", login=LOGIN)
        rt.fund(payer, blocks=160)
        yield Chain(rt, payer, merchant, watch)


def monitor_args(chain: Chain) -> list[str]:
    """A daemon whose monitor reads the merchant's view-only wallet through Digest, quickly."""
    return [
        "--wallet-rpc",
        chain.watch.url,
        "--wallet-rpc-login",
        ":".join(LOGIN),
        "--min-confirmations",
        str(N),
        "--poll-interval",
        "0.2",
    ]


@pytest.fixture(scope="module")
def daemon(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path_factory.mktemp("e2e") / "data",
        *monitor_args(chain),
    ).start()
    d.wait_for_height(chain.rt.daemon_height())
    yield d
    code = d.stop()
    log = d.log_text()
    assert "Traceback" not in log, log
    assert code in (0, -15), log


TOKENS: set[str] = set()


def redeem(daemon: Daemon, pid: str) -> tuple[int, Any]:
    code, body = client("redeem", pid, "--url", daemon.public_url)
    if isinstance(body, dict) and "service_token" in body:
        TOKENS.add(body["service_token"])
    return code, body


def settle(chain: Chain, daemon: Daemon, blocks: int) -> int:
    """Mine blocks and wait until the monitor has polled at the new height."""
    height = chain.mine(blocks)
    daemon.wait_for_height(height)
    return height


def test_pay_pending_then_redeemable_exactly_at_n_confirmations(chain, daemon):
    pid, address = chain.new_payment_address()
    assert redeem(daemon, pid)[0] == 4  # nothing paid yet: 404
    txid = chain.pay(address, 3 * XMR // 2)
    # In the pool: the monitor sees it at its next poll.
    deadline = time.monotonic() + 10
    while (result := redeem(daemon, pid))[0] == 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result == (3, {"status": "pending", "confirmations": 0, "required": N})
    settle(chain, daemon, 1)
    assert redeem(daemon, pid) == (3, {"status": "pending", "confirmations": 1, "required": N})
    settle(chain, daemon, N - 2)
    assert redeem(daemon, pid) == (3, {"status": "pending", "confirmations": N - 1, "required": N})
    settle(chain, daemon, 1)  # exactly N confirmations
    code, body = redeem(daemon, pid)
    assert code == 0 and body["status"] == "success" and body["balance"] == 3 * XMR // 2
    code, again = redeem(daemon, pid)
    assert code == 0 and again == {**body, "status": "already_claimed"}
    code, status = client("status", body["service_token"], "--url", daemon.public_url)
    assert code == 0 and status["status"] == "active" and status["balance"] == 3 * XMR // 2
    assert txid not in daemon.log_text() and pid not in daemon.log_text()


def test_a_second_payment_to_the_same_pid_tops_the_token_up(chain, daemon):
    pid, address = chain.new_payment_address()
    chain.pay(address, XMR)
    settle(chain, daemon, N)
    code, first = redeem(daemon, pid)
    assert code == 0 and first["status"] == "success" and first["balance"] == XMR
    chain.pay(address, XMR // 4)
    settle(chain, daemon, N)
    code, topped = redeem(daemon, pid)
    assert code == 0 and topped["status"] == "already_claimed"
    assert topped["service_token"] == first["service_token"]
    assert topped["balance"] == XMR + XMR // 4


def test_a_payment_to_the_plain_address_is_never_redeemable(chain, daemon):
    before = daemon.metric('anonticket_monitor_skipped_transfers_total{reason="no_payment_id"}')
    chain.pay(chain.merchant.address, XMR)
    settle(chain, daemon, N + 1)
    # The wallet reports it with the dummy payment id 0000000000000000: skipped, not stored.
    after = daemon.metric('anonticket_monitor_skipped_transfers_total{reason="no_payment_id"}')
    assert after == before + 1
    assert redeem(daemon, "0000000000000000")[0] == 2  # and the all-zero PID is refused


def test_a_payment_below_min_amount_is_never_redeemable(chain, daemon):
    pid, address = chain.new_payment_address()
    chain.pay(address, 10**10 - 1)  # one atomic unit below 0.01 XMR
    settle(chain, daemon, N + 1)
    code, body = redeem(daemon, pid)
    assert code == 4 and "minimum" in str(body)


def test_a_reorg_before_n_confirmations_credits_nothing(chain, daemon):
    pid, address = chain.new_payment_address()
    chain.pay(address, 2 * XMR)
    mined_at = settle(chain, daemon, 3) - 3  # the tx is in block index mined_at
    assert redeem(daemon, pid)[0] == 3
    # Replace the tx's block and everything above with a longer chain without it.
    height = chain.rt.reorg(mined_at - 1)
    chain.payer.refresh()
    daemon.wait_for_height(height)
    settle(chain, daemon, N + 1)
    assert redeem(daemon, pid)[0] == 4  # pending forgotten: the payment does not exist
    # Nothing credited was touched: no reversal of any kind.
    for state in ("claimed", "unclaimed"):
        assert daemon.metric(f'anonticket_monitor_reversals_total{{state="{state}"}}') == 0


def _cursor(daemon: Daemon) -> int | None:
    db = sqlite3.connect(Path(daemon.data_dir) / "anonticket.sqlite3")
    try:
        row = db.execute("SELECT value FROM monitor_state WHERE name = 'cursor'").fetchone()
        return None if row is None else int(row[0])
    finally:
        db.close()


def test_sigkill_mid_scan_and_restart_credits_every_payment_exactly_once(chain, daemon):
    rng = random.Random(5)
    payments: dict[str, int] = {}
    daemon.kill()  # the monitor falls behind while payments arrive
    try:
        for _ in range(6):
            pid, address = chain.new_payment_address()
            amount = rng.randrange(2 * 10**10, 4 * 10**11)
            chain.pay(address, amount)
            payments[pid] = amount
            chain.mine(3)
        height = chain.mine(N)
        # Restart and kill it again while it scans the backlog: the monitor's first poll starts
        # as the daemon starts listening, so these delays land before and inside it; the last
        # kill comes right after the batch committed.
        before = _cursor(daemon)
        cursors = []
        for delay in (0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.2):
            daemon.start()
            time.sleep(delay)
            daemon.kill()
            cursors.append(_cursor(daemon))
        daemon.start()
        deadline = time.monotonic() + 30
        while _cursor(daemon) != height - N and time.monotonic() < deadline:
            time.sleep(0.005)
        daemon.kill()
        cursors.append(_cursor(daemon))
    finally:
        daemon.start()
    # Killed before its batch committed, the daemon left the cursor where it was; after, at the
    # target.  Never anywhere in between: the batch and the cursor are one transaction.
    assert cursors[0] == before and cursors[-1] == height - N, cursors
    assert set(cursors) <= {before, height - N}, cursors
    daemon.wait_for_height(height)
    balances = {}
    for pid, amount in payments.items():
        code, body = redeem(daemon, pid)
        assert code == 0, body
        balances[pid] = body["balance"]
        assert body["balance"] == amount
    # The database agrees: every claimed payment belongs to a token, nothing counted twice.
    db = sqlite3.connect(Path(daemon.data_dir) / "anonticket.sqlite3")
    claimed, tokens = db.execute(
        "SELECT (SELECT sum(amount) FROM payments WHERE status = 2), "
        "(SELECT sum(balance) FROM tokens)"
    ).fetchone()
    assert claimed == tokens
    dup = db.execute(
        "SELECT count(*) FROM (SELECT txid FROM payments GROUP BY txid, subaddr_major, "
        "subaddr_minor HAVING count(*) > 1)"
    ).fetchone()[0]
    assert dup == 0


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_two_nodes_on_one_postgresql_credit_every_payment_exactly_once(chain, pg_server, tmp_path):
    database = pg_server.new_database()
    monitor_node = Daemon(
        tmp_path / "a",
        "--database",
        database,
        *monitor_args(chain),
    ).start()
    try:
        # Every node must share the secret key: PIDs and tokens are stored as tags keyed by it.
        (tmp_path / "b").mkdir(mode=0o700)
        key = tmp_path / "b" / "secret.key"
        key.write_bytes((tmp_path / "a" / "secret.key").read_bytes())
        key.chmod(0o600)
        api_node = Daemon(tmp_path / "b", "--database", database, "--no-monitor").start()
        try:
            payments = {}
            for i in range(6):
                pid, address = chain.new_payment_address()
                payments[pid] = (i + 1) * 10**11
                chain.pay(address, payments[pid])
            height = chain.mine(N)
            monitor_node.wait_for_height(height)
            # The API node reads new payment rows into its known-PID filter every second.
            time.sleep(2)
            urls = [monitor_node.public_url, api_node.public_url] * 4
            jobs = [(pid, url) for pid in payments for url in urls]
            random.Random(3).shuffle(jobs)
            with ThreadPoolExecutor(max_workers=12) as pool:
                results = list(
                    pool.map(
                        lambda job: (job[0], *_post(job[1] + "/api/v1/redeem", {"pid": job[0]})),
                        jobs,
                    )
                )
            assert {code for _, code, _ in results} == {200}
            for pid, amount in payments.items():
                mine = [body for p, _, body in results if p == pid]
                assert [b["status"] for b in mine].count("success") == 1
                assert {b["service_token"] for b in mine} == {mine[0]["service_token"]}
                assert {b["balance"] for b in mine} == {amount}
            # A revoke on one node: that node answers "revoked" at once; the other, which had
            # the token in its cache, within its next sync of token changes (about a second).
            token = results[0][2]["service_token"]
            for node in (monitor_node, api_node):
                assert _get(f"{node.public_url}/api/v1/token/{token}")["status"] == "active"
            code, _ = _post(f"{monitor_node.internal_url}/api/v1/token/{token}/revoke", {})
            assert code == 200
            revoked_at = time.monotonic()
            assert _get(f"{monitor_node.public_url}/api/v1/token/{token}")["status"] == "revoked"
            while _get(f"{api_node.public_url}/api/v1/token/{token}")["status"] != "revoked":
                assert time.monotonic() - revoked_at < 3.5, "the API node kept answering active"
                time.sleep(0.05)
            # The API node sees the monitor node's cursor through the shared database.
            assert api_node.health()["cursor"] == monitor_node.health()["cursor"]
            assert api_node.health()["monitor"] == "disabled"
        finally:
            assert api_node.stop() in (0, -15)
    finally:
        assert monitor_node.stop() in (0, -15)
    for node in (monitor_node, api_node):
        assert "Traceback" not in node.log_text()


@pytest_twisted.ensureDeferred
async def test_the_wallet_client_tells_view_only_spend_capable_and_monerod_apart(chain):
    """The start-up warnings rest on this: asked of the genuine programs, nothing changed."""
    from twisted.internet import reactor

    from anonticket.wallet import WalletClient

    answers = {}
    for name, url, login in (
        ("view_only", chain.watch.url, LOGIN),
        ("spend_capable", chain.merchant.url, chain.merchant.login),
        ("monerod", f"http://{chain.rt.daemon_address}", None),
    ):
        client = WalletClient(reactor, url.removesuffix("/json_rpc"), login=login, timeout=10)
        try:
            answers[name] = await client.identify()
        finally:
            await client.close()
    assert answers == {k: k for k in answers}
    assert chain.watch.height() > 0 and chain.merchant.height() > 0  # both still answer


def test_json_logs_of_a_daemon_whose_wallet_login_is_in_a_file(chain, tmp_path):
    """What a log shipper reads: every line one JSON object; the lines an operator looks for
    after a start; no factory noise; no payment detail.  The wallet's login comes from a file,
    as a systemd credential gives it (never on the command line)."""
    login = tmp_path / "wallet-rpc-login"
    login.write_text(":".join(LOGIN) + "\n")
    args = [a for a in monitor_args(chain) if a not in ("--wallet-rpc-login", ":".join(LOGIN))]
    d = Daemon(
        tmp_path / "data",
        *args,
        "--wallet-rpc-login-file",
        str(login),
        "--log-format",
        "json",
    ).start()
    try:
        assert d.process is not None
        cmdline = Path(f"/proc/{d.process.pid}/cmdline").read_bytes()
        assert LOGIN[1].encode() not in cmdline  # what every local user sees in ps
        d.wait_for_height(chain.rt.daemon_height())
        pid, address = chain.new_payment_address()
        chain.pay(address, XMR)
        settle(chain, d, N)
        code, body = redeem(d, pid)
        assert code == 0 and body["status"] == "success", body
    finally:
        assert d.stop() in (0, -15)
    records = [json.loads(line) for line in d.log_text().splitlines()]
    for record in records:
        assert {"time", "level", "namespace", "message"} <= record.keys(), record
        assert record["level"] in ("info", "warn"), record
    messages = [r["message"] for r in records]
    assert any(m.startswith("first wallet poll succeeded") for m in messages), messages
    assert "the wallet at --wallet-rpc is view-only, as it should be" in messages
    assert not any("factory" in m or " starting on " in m for m in messages), messages
    text = d.log_text()
    for secret in (pid, body["service_token"], LOGIN[1], str(XMR)):
        assert secret not in text, secret


def test_no_secret_reached_a_log_line_or_a_metric(chain, daemon):
    """Runs last: every PID, token, txid and amount of this module against what was logged."""
    assert chain.secrets and TOKENS, "the tests above ran nothing to check"
    metrics = daemon.get("/metrics")[1].decode()
    log = daemon.log_text()
    for secret in chain.secrets | TOKENS:
        assert secret not in log, secret
        for line in metrics.splitlines():
            if "{" in line:  # a label set: no secret in any label
                assert secret not in line.split("}")[0], line
    # The data dir and its keys have the documented modes.
    assert (daemon.data_dir.stat().st_mode & 0o777) == 0o700
    assert ((daemon.data_dir / "secret.key").stat().st_mode & 0o777) == 0o600
