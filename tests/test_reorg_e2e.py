"""End to end: double spends, reorgs, late reports and wallet restarts on a real two-node chain.

Two genuine ``monerod --regtest`` nodes that can be split and joined (``Regtest(nodes=2)``),
genuine monero-wallet-rpc processes talking to node A (the shop's view-only wallet among them)
and the real ``twistd -n anonticket`` daemon reading that view-only wallet with N = 2.  A double
spend is two transactions from one key image: the payment goes to A, the conflicting one to B,
each node mines its own fork, and the join makes A reorganise onto B's longer chain.

What must hold (docs/monitor.md, "Reversals"): money the chain took back is never redeemable
(redeem answers 202 while the wallet still shows the transaction, 404 once it is gone; never
200); a claimed payment that is taken back is taken off its token, which reads ``suspended``;
a payment mined again is put back exactly once; a payment a wallet reports late, far below the
re-check window, is still credited; a wallet restart changes nothing.

The chain side of every scenario is asserted too (the double spend really happened, A really
reorganised, the wallet reports what the scenario needs), so a failure says which side broke.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from .daemonproc import Daemon
from .monero_regtest import A, B, DoubleSpend, Regtest, WalletRPC, available

pytestmark = pytest.mark.skipif(not available(), reason="monerod/monero-wallet-rpc not installed")

N = 2  # --min-confirmations
XMR = 10**12
WAIT = 30.0  # seconds any awaited condition gets
T = TypeVar("T")


@dataclass
class Chain:
    rt: Regtest
    payer: WalletRPC
    merchant: WalletRPC
    watch: WalletRPC  # the merchant's view-only wallet: what the daemon reads
    # Every PID, txid, amount and token the tests create, for the privacy check at the end.
    secrets: set[str] = field(default_factory=set)

    def new_payment_address(self) -> tuple[str, str]:
        while (pid := secrets.token_hex(8)) == "0" * 16:
            pass
        self.secrets.add(pid)
        return pid, self.merchant.make_integrated_address(pid)

    def double_spend(self, address: str) -> DoubleSpend:
        pair = self.rt.double_spend(self.payer, address)
        self.secrets.update({pair.payment.txid, pair.conflict.txid, str(pair.payment.amount)})
        return pair

    def pay(self, address: str, amount: int) -> str:
        self.payer.refresh()
        txid = self.payer.transfer(address, amount)
        self.secrets.update({txid, str(amount)})
        return txid

    def wallet_view(
        self, txid: str, wallet: WalletRPC | None = None, *, refresh: bool = True
    ) -> list[dict[str, Any]]:
        """What the (view-only) wallet reports for ``txid`` among ``in`` and ``pool``, by
        default once refreshed (the daemon's monitor refreshes it too, but perhaps not yet)."""
        wallet = wallet or self.watch
        if refresh:
            wallet.refresh()
        return [e for e in wallet.transfers() if e["txid"] == txid]


def monitor_args(wallet: WalletRPC) -> list[str]:
    return [
        "--wallet-rpc",
        wallet.url,
        "--min-confirmations",
        str(N),
        "--poll-interval",
        "0.2",
    ]


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with Regtest(nodes=2) as rt:
        payer = rt.wallet("payer")
        merchant = rt.wallet("merchant")
        watch = rt.view_only_wallet(merchant, "merchant-watch")
        rt.fund(payer)
        yield Chain(rt, payer, merchant, watch)


def _check_stopped(daemon: Daemon) -> None:
    code = daemon.stop()
    log = daemon.log_text()
    assert "Traceback" not in log, log
    assert code in (0, -15), log


@pytest.fixture(scope="module")
def daemon(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon on SQLite, reading the merchant's view-only wallet; shared by the scenarios
    (each uses PIDs of its own)."""
    d = Daemon(tmp_path_factory.mktemp("reorg") / "data", *monitor_args(chain.watch)).start()
    d.wait_for_height(chain.rt.daemon_height())
    yield d
    _check_stopped(d)


@contextlib.contextmanager
def extra_daemon(path: Path, *args: str) -> Iterator[Daemon]:
    d = Daemon(path, *args).start()
    try:
        yield d
    except BaseException:
        d.stop()
        raise
    _check_stopped(d)


@pytest.fixture(autouse=True)
def joined_and_clean(chain: Chain) -> Iterator[None]:
    """Every scenario starts and ends on joined nodes with empty pools (a losing tx stays in
    monerod's pool for good: it must not leak into the next scenario)."""
    rt = chain.rt
    rt.join()
    yield
    rt.join()
    for node in (A, B):
        rt.flush_txpool(node=node)


# -- helpers ------------------------------------------------------------------------------------


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    deadline = time.monotonic() + WAIT
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {WAIT:.0f} s")
        time.sleep(0.1)


def _request(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def redeem(daemon: Daemon, pid: str) -> tuple[int, Any]:
    return _request(daemon.public_url + "/api/v1/redeem", {"pid": pid})


def token(daemon: Daemon, service_token: str) -> dict[str, Any]:
    code, body = _request(f"{daemon.public_url}/api/v1/token/{service_token}")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def metric(daemon: Daemon, name: str, state: str) -> float:
    return daemon.metric(f'anonticket_monitor_{name}_total{{state="{state}"}}')


def ok_polls(daemon: Daemon) -> float:
    return daemon.metric('anonticket_monitor_polls_total{outcome="ok"}')


def more_polls(daemon: Daemon, polls: int = 3) -> None:
    start = ok_polls(daemon)
    wait_until(lambda: ok_polls(daemon), lambda n: n >= start + polls, f"{polls} more polls")


def seen_pending(daemon: Daemon, pid: str) -> None:
    """Until the daemon has recorded the payment as pending (its wallet listed it in the pool)."""
    _code, body = wait_until(lambda: redeem(daemon, pid), lambda r: r[0] == 202, "pending")
    assert body["status"] == "pending" and body["required"] == N


def claim(daemon: Daemon, pid: str, amount: int) -> str:
    code, body = redeem(daemon, pid)
    assert code == 200 and body["status"] == "success", body
    assert body["balance"] == amount
    return str(body["service_token"])


def expected_answer(view: list[dict[str, Any]]) -> int:
    """202 while the wallet lists the taken-back tx (in the pool), 404 once it lists nothing."""
    assert [e["type"] for e in view] in ([], ["pool"]), view
    return 202 if view else 404


def never_redeemable(chain: Chain, daemon: Daemon, pid: str, expected: int) -> None:
    """Redeem over a few polls, then N + 2 more blocks and a few polls again: always
    ``expected``, never 200."""
    for _round in range(2):
        start = ok_polls(daemon)
        while ok_polls(daemon) < start + 3:
            code, body = redeem(daemon, pid)
            assert code != 200, f"taken-back money redeemed: {body}"
            assert code == expected, (code, body)
            if code == 404:
                assert body["code"] == "payment_not_found", body
            else:
                assert body["status"] == "pending", body
            time.sleep(0.1)
        daemon.wait_for_height(chain.rt.mine(N + 2))


def pay_on_a(chain: Chain, daemon: Daemon, pid: str, pair: DoubleSpend) -> tuple[int, int]:
    """Split; the payment to A, the conflicting tx to B; the daemon sees the payment in A's
    pool, then A mines it to N confirmations and the daemon acts on that height (redeem would
    now answer 200).  Returns (block count at the split = the payment's height, A's count)."""
    rt = chain.rt
    base = rt.split()
    rt.send_raw_transaction(pair.payment.blob, node=A)
    rt.send_raw_transaction(pair.conflict.blob, node=B)
    assert pair.payment.txid not in rt.pool_txids(node=B)
    seen_pending(daemon, pid)
    a_count = rt.confirm(pair.payment.txid, N, node=A)
    assert rt.tx_height(pair.payment.txid, node=A) == base and a_count == base + N
    daemon.wait_for_height(a_count)
    return base, a_count


def conflict_wins(chain: Chain, pair: DoubleSpend, base: int, a_count: int, lead: int) -> int:
    """B mines a chain ``lead`` blocks longer than A's, its first block holding the conflicting
    tx; join; A must reorganise onto it and lose the payment.  Returns the new block count."""
    rt = chain.rt
    rt.confirm(pair.conflict.txid, 1, node=B)
    b_count = rt.mine(a_count + lead - rt.daemon_height(node=B), node=B)
    assert b_count == a_count + lead
    b_top = rt.top_hash(node=B)
    assert rt.join() == b_count
    assert rt.top_hash(node=A) == b_top
    assert rt.tx_height(pair.payment.txid, node=A) is None
    assert rt.tx_height(pair.conflict.txid, node=A) == base
    loser = rt.pool_entry(pair.payment.txid, node=A)
    assert loser is not None and loser["double_spend_seen"] is False
    chain.watch.refresh()
    return b_count


@contextlib.contextmanager
def paused(daemon: Daemon) -> Iterator[None]:
    """SIGSTOP the daemon for a few seconds (it makes no wallet call meanwhile), then SIGCONT:
    to order what the test does to the wallet against the monitor's polls."""
    assert daemon.process is not None
    pid = daemon.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class TokenSampler(threading.Thread):
    """Reads a token on the public site every 50 ms until stopped: (status, balance) pairs."""

    def __init__(self, daemon: Daemon, service_token: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{daemon.public_url}/api/v1/token/{service_token}"
        self.samples: list[tuple[str, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(OSError, ValueError):
                code, body = _request(self.url)
                if code == 200:
                    self.samples.append((body["status"], body["balance"]))
            time.sleep(0.05)

    def stop(self) -> list[tuple[str, int]]:
        self.halt.set()
        self.join()
        return self.samples


# -- scenarios ----------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [1, 9], ids=["longer-by-1", "longer-by-9"])
def test_double_spent_unredeemed_payment_is_never_redeemable(
    chain: Chain, daemon: Daemon, lead: int
) -> None:
    """(a), (b): the payment had N confirmations on A (redeem would have answered 200) when B's
    chain, 1 or 9 blocks longer and holding the conflicting tx, won."""
    pid, address = chain.new_payment_address()
    pair = chain.double_spend(address)
    base, a_count = pay_on_a(chain, daemon, pid, pair)
    unclaimed = metric(daemon, "reversals", "unclaimed")

    b_count = conflict_wins(chain, pair, base, a_count, lead)
    view = chain.wallet_view(pair.payment.txid)
    print(f"lead {lead}: view-only wallet reports the losing payment as {view}")
    assert view == []  # the wallet had seen it in the pool: it lists it nowhere now
    daemon.wait_for_height(b_count)
    more_polls(daemon)
    never_redeemable(chain, daemon, pid, expected_answer(view))
    assert metric(daemon, "reversals", "unclaimed") >= unclaimed + 1


@pytest.mark.parametrize(
    ("backend", "lead"),
    [("sqlite", 1), ("sqlite", 9), ("postgresql", 9)],
    ids=["sqlite-longer-by-1", "sqlite-longer-by-9", "postgresql-longer-by-9"],
)
def test_double_spend_after_redeem_suspends_the_token(
    chain: Chain,
    daemon: Daemon,
    backend: str,
    lead: int,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """(c): the payment was redeemed (200, token T) before the double-spending chain won."""
    with contextlib.ExitStack() as stack:
        if backend == "postgresql":
            database = request.getfixturevalue("pg_server").new_database()
            node = stack.enter_context(
                extra_daemon(tmp_path / "pg", "--database", database, *monitor_args(chain.watch))
            )
            node.wait_for_height(chain.rt.daemon_height())
        else:
            node = daemon
        pid, address = chain.new_payment_address()
        pair = chain.double_spend(address)
        amount = pair.payment.amount
        base, a_count = pay_on_a(chain, node, pid, pair)
        service_token = claim(node, pid, amount)
        chain.secrets.add(service_token)
        before = token(node, service_token)
        assert (before["status"], before["balance"]) == ("active", amount)
        claimed = metric(node, "reversals", "claimed")
        log_offset = len(node.log_text())

        b_count = conflict_wins(chain, pair, base, a_count, lead)
        view = chain.wallet_view(pair.payment.txid)
        print(f"{backend}, lead {lead}: view-only wallet reports the losing payment as {view}")
        assert view == []
        node.wait_for_height(b_count)
        after = wait_until(
            lambda: token(node, service_token),
            lambda t: t["status"] == "suspended",
            "token status after the double spend",
        )
        assert after["balance"] == before["balance"] - amount
        assert metric(node, "reversals", "claimed") >= claimed + 1
        # One log line says so, without the PID, the txid or the amount.
        log = node.log_text()
        assert re.search(r"revers", log[log_offset:], re.IGNORECASE), log[log_offset:]
        for secret in (pid, pair.payment.txid, pair.conflict.txid, str(amount), service_token):
            assert secret not in log, secret
        # And it stays so: the losing tx is never mined, nothing comes back.
        for _ in range(2):
            node.wait_for_height(chain.rt.mine(N + 2))
            more_polls(node)
            now = token(node, service_token)
            assert (now["status"], now["balance"]) == ("suspended", before["balance"] - amount)


def test_honest_reorg_of_a_redeemed_payment_restores_it_exactly_once(
    chain: Chain, daemon: Daemon
) -> None:
    """(d): the block of a redeemed payment is replaced by a longer chain without it; the tx
    goes back to the pool and is mined and confirmed again."""
    rt = chain.rt
    pid, address = chain.new_payment_address()
    amount = 2 * XMR + secrets.randbelow(10**9)
    txid = chain.pay(address, amount)
    seen_pending(daemon, pid)
    daemon.wait_for_height(rt.confirm(txid, N))
    service_token = claim(daemon, pid, amount)
    chain.secrets.add(service_token)
    reversed_before = metric(daemon, "reversals", "claimed")
    restored_before = metric(daemon, "restorations", "claimed")
    sampler = TokenSampler(daemon, service_token)
    sampler.start()
    try:
        mined_at = rt.tx_height(txid)
        assert mined_at is not None
        count = rt.reorg(mined_at - 1, flush=False)  # N blocks replaced by N + 1 without it
        assert rt.tx_height(txid) is None and txid in rt.pool_txids(node=A)
        chain.watch.refresh()
        print(f"honest reorg: view-only wallet reports the payment as {chain.wallet_view(txid)}")
        daemon.wait_for_height(count)
        wait_until(
            lambda: token(daemon, service_token)["status"],
            lambda s: s == "suspended",
            "token status while its payment is out of the chain",
        )
        assert metric(daemon, "reversals", "claimed") >= reversed_before + 1

        count = rt.confirm(txid, N)  # mined again, at a new height
        assert rt.tx_height(txid) not in (None, mined_at)
        daemon.wait_for_height(count)
        wait_until(
            lambda: token(daemon, service_token),
            lambda t: (t["status"], t["balance"]) == ("active", amount),
            "token after the payment was confirmed again",
        )
        assert metric(daemon, "restorations", "claimed") >= restored_before + 1
        for _ in range(2):
            daemon.wait_for_height(rt.mine(N + 1))
            more_polls(daemon)
            assert token(daemon, service_token)["balance"] == amount
        code, body = redeem(daemon, pid)
        assert code == 200, body
        assert (body["status"], body["service_token"], body["balance"]) == (
            "already_claimed",
            service_token,
            amount,
        )
    finally:
        samples = sampler.stop()
    print(f"honest reorg: {len(samples)} token samples, states {sorted(set(samples))}")
    assert samples and max(balance for _, balance in samples) <= amount
    assert {status for status, _ in samples} <= {"active", "suspended"}
    assert ("suspended", 0) in samples and samples[-1] == ("active", amount)


@pytest.mark.parametrize("scan", ["refreshed-first", "pool-scanned-first"])
def test_double_spend_loser_back_in_the_pool(chain: Chain, daemon: Daemon, scan: str) -> None:
    """(e): two payments reach A only mined (its wallet never saw them unconfirmed), one is
    redeemed; then B's chain with both conflicting txs wins.  monerod puts the losers back
    into A's pool, and the view-only wallet lists them as pool entries again.

    What amount it lists depends on when the wallet first scans the pool after the reorg:
    after a refresh, the payment's amount; before it (the reorg landed between a poll's
    ``refresh`` and its ``get_transfers``), 0, for good.  The daemon is paused meanwhile so
    that each order happens for sure; both must end the same way."""
    rt = chain.rt
    pid1, address1 = chain.new_payment_address()
    pid2, address2 = chain.new_payment_address()
    pair1, pair2 = chain.double_spend(address1), chain.double_spend(address2)
    base = rt.daemon_height()
    a_count = rt.mine_unseen([pair1.payment.blob, pair2.payment.blob], N)
    for pair in (pair1, pair2):
        assert rt.tx_height(pair.payment.txid) == base
        assert [e["type"] for e in chain.wallet_view(pair.payment.txid)] == ["in"]
    daemon.wait_for_height(a_count)
    service_token = claim(daemon, pid1, pair1.payment.amount)
    chain.secrets.add(service_token)
    before = token(daemon, service_token)
    claimed = metric(daemon, "reversals", "claimed")

    rt.split()
    assert rt.pop_blocks(a_count - base, node=B) == base  # B alone goes back below them
    for pair in (pair1, pair2):
        rt.send_raw_transaction(pair.conflict.blob, node=B)
    rt.confirm(pair1.conflict.txid, 1, node=B)
    rt.confirm(pair2.conflict.txid, 1, node=B)
    b_count = rt.mine(a_count + 2 - rt.daemon_height(node=B), node=B)
    with paused(daemon):
        assert rt.join() == b_count
        for pair in (pair1, pair2):
            assert rt.tx_height(pair.payment.txid) is None
            assert rt.tx_height(pair.conflict.txid) == base
            loser = rt.pool_entry(pair.payment.txid)
            assert loser is not None
            assert (loser["kept_by_block"], loser["double_spend_seen"]) == (True, False)
        quirk = False
        if scan == "pool-scanned-first":
            for pair in (pair1, pair2):
                stale = chain.wallet_view(pair.payment.txid, refresh=False)
                seen = sorted((e["type"], e["amount"]) for e in stale)
                # Usually the stale mined entry beside a pool entry worth 0 (the case this test
                # is for); sometimes the wallet has already caught up and lists the pool entry
                # with its amount.  Either way the daemon must end the same.
                assert seen in (
                    [("in", pair.payment.amount), ("pool", 0)],
                    [("pool", pair.payment.amount)],
                ), seen
                quirk = quirk or ("pool", 0) in seen
            print(f"pool-scanned-first: the amount-0 quirk {'seen' if quirk else 'not seen'}")
        chain.watch.refresh()
        for pair in (pair1, pair2):
            view = chain.wallet_view(pair.payment.txid)
            print(
                f"pool-returned loser ({scan}): view-only wallet reports "
                f"{[(e['type'], e['height'], e['amount'], e['double_spend_seen']) for e in view]}"
            )
            amounts = {pair.payment.amount, 0} if quirk else {pair.payment.amount}
            assert [(e["type"], e["double_spend_seen"]) for e in view] == [("pool", False)]
            assert view[0]["amount"] in amounts

    daemon.wait_for_height(b_count)
    try:
        after = wait_until(
            lambda: token(daemon, service_token),
            lambda t: t["status"] == "suspended",
            "token status after the double spend",
        )
    except AssertionError as failure:
        code, body = redeem(daemon, pid2)  # and the unclaimed one?
        raise AssertionError(f"{failure}; the unclaimed loser's redeem: {code} {body}") from None
    assert after["balance"] == before["balance"] - pair1.payment.amount
    assert metric(daemon, "reversals", "claimed") >= claimed + 1
    more_polls(daemon)
    never_redeemable(chain, daemon, pid2, 202)
    assert token(daemon, service_token)["status"] == "suspended"


def test_payment_reported_late_far_below_the_window_is_credited(
    chain: Chain, tmp_path: Path
) -> None:
    """(f): the daemon watches a view-only wallet restored from the block after payment P, so
    it never reports P; long after, the wallet is replaced by one with the same keys restored
    from 0, on the same port, which reports P for the first time far below the window."""
    rt = chain.rt
    pid, address = chain.new_payment_address()
    amount = XMR + secrets.randbelow(10**9)
    txid = chain.pay(address, amount)
    rt.confirm(txid, 1)
    mined_at = rt.tx_height(txid)
    assert mined_at is not None
    late = rt.view_only_wallet(chain.merchant, "late-watch", restore_height=mined_at + 1)
    assert chain.wallet_view(txid, late) == []
    with extra_daemon(tmp_path / "late", *monitor_args(late)) as node:
        count = rt.mine(2 * N + 6)  # P is now far below the re-check window (2N blocks)
        node.wait_for_height(count)
        more_polls(node)
        assert redeem(node, pid)[0] == 404
        assert node.health()["cursor"] > mined_at + 2 * N

        port = late.port
        late.stop()
        replaced = time.monotonic()
        full = rt.view_only_wallet(chain.merchant, "late-watch-full", port=port)
        up = time.monotonic()
        assert [e["height"] for e in chain.wallet_view(txid, full)] == [mined_at]
        deadline = up + 60
        while (result := redeem(node, pid))[0] != 200:
            assert result[0] in (202, 404), result
            assert time.monotonic() < deadline, f"P never credited: {result} {node.health()}"
            time.sleep(0.1)
        credited = time.monotonic()
        print(
            f"late report: credited {credited - up:.1f} s after the replacement wallet was up "
            f"({credited - replaced:.1f} s after the old one stopped)"
        )
        body = result[1]
        assert body["status"] == "success" and body["balance"] == amount
        chain.secrets.add(body["service_token"])
        full.stop()


def test_wallet_rpc_restart_changes_nothing(chain: Chain, daemon: Daemon) -> None:
    """(g): the view-only wallet-rpc the daemon reads is restarted (same wallet file, same
    port) while the daemon polls, with a claimed, an unclaimed and a pending payment."""
    rt = chain.rt
    payments: dict[str, tuple[str, int]] = {}
    for name in ("claimed", "unclaimed", "pending"):
        pid, address = chain.new_payment_address()
        amount = XMR // 2 + secrets.randbelow(10**9)
        payments[name] = (pid, amount)
        txid = chain.pay(address, amount)
        seen_pending(daemon, pid)
        if name != "pending":
            daemon.wait_for_height(rt.confirm(txid, N))
    pid, amount = payments["claimed"]
    service_token = claim(daemon, pid, amount)
    chain.secrets.add(service_token)
    counters = {
        (name, state): metric(daemon, name, state)
        for name in ("reversals", "restorations")
        for state in ("claimed", "unclaimed")
    }
    old_pid = chain.watch.pid
    rt.restart_wallet(chain.watch, down=1.0)
    assert chain.watch.pid != old_pid
    daemon.wait_for_height(rt.daemon_height())
    more_polls(daemon)
    assert redeem(daemon, payments["pending"][0])[0] == 202
    daemon.wait_for_height(rt.mine(N))
    more_polls(daemon)

    code, body = redeem(daemon, pid)
    assert (code, body["status"], body["balance"]) == (200, "already_claimed", amount)
    now = token(daemon, service_token)
    assert (now["status"], now["balance"]) == ("active", amount)
    for name in ("unclaimed", "pending"):
        other_pid, other_amount = payments[name]
        code, body = redeem(daemon, other_pid)
        assert (code, body["status"], body["balance"]) == (200, "success", other_amount)
        chain.secrets.add(body["service_token"])
    for key, value in counters.items():
        assert metric(daemon, *key) == value, key


def test_no_secret_reached_a_log_line_or_a_metric(chain: Chain, daemon: Daemon) -> None:
    """Runs last: every PID, txid, amount and token of this module against what was logged."""
    assert chain.secrets, "the tests above ran nothing to check"
    metrics = daemon.get("/metrics")[1].decode()
    log = daemon.log_text()
    for secret in chain.secrets:
        assert secret not in log, secret
        for line in metrics.splitlines():
            if "{" in line:
                assert secret not in line.split("}")[0], line
