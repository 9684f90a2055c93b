"""The regtest harness against the genuine monerod / monero-wallet-rpc, and the wallet behaviour a
payment monitor relies on: pool -> in, confirmations, the height filter, reorgs, digest auth;
two nodes that split, fork and rejoin, and what a double spend between them looks like."""

from __future__ import annotations

import ctypes
import http.client
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .monero_regtest import (
    BURN_ADDRESS,
    A,
    AuthError,
    B,
    Regtest,
    RPCError,
    WalletRPC,
    available,
)

pytestmark = pytest.mark.skipif(
    not available(),
    reason="monerod / monero-wallet-rpc not on PATH (Debian: apt-get install monero)",
)

XMR = 10**12
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Net:
    rt: Regtest
    payer: WalletRPC
    merchant: WalletRPC
    watch: WalletRPC


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with Regtest() as rt:
        payer = rt.wallet("payer")
        merchant = rt.wallet("merchant")
        watch = rt.view_only_wallet(merchant, "merchant-watch")
        rt.fund(payer)
        yield Net(rt, payer, merchant, watch)


def find(wallet: WalletRPC, txid: str, **params: Any) -> dict[str, Any] | None:
    """The wallet's get_transfers entry for ``txid`` (default categories: in + pool)."""
    matches = [e for e in wallet.transfers(**params) if e["txid"] == txid]
    assert len(matches) <= 1, matches
    return matches[0] if matches else None


def get(wallet: WalletRPC, txid: str, **params: Any) -> dict[str, Any]:
    entry = find(wallet, txid, **params)
    assert entry is not None, f"{txid} not listed by {wallet}"
    return entry


def wait_for(wallet: WalletRPC, txid: str, **params: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (entry := find(wallet, txid, **params)) is None:
        assert time.monotonic() < deadline, f"{txid} never showed up at {wallet}"
        time.sleep(0.05)
    return entry


def new_payment_id() -> str:
    while (pid := secrets.token_hex(8)) == "0" * 16:  # the all-zero id is every plain payment's
        pass
    return pid


def pay(net: Net, amount: int) -> tuple[str, str]:
    """Payer -> a fresh integrated address of the merchant; (payment id, txid)."""
    pid = new_payment_id()
    txid = net.payer.transfer(net.merchant.make_integrated_address(pid), amount)
    return pid, txid


def refresh(*wallets: WalletRPC) -> None:
    for wallet in wallets:
        wallet.refresh()


def test_payment_from_pool_to_ten_confirmations(net: Net) -> None:
    rt, merchant, watch = net.rt, net.merchant, net.watch
    merchant_address = merchant.address
    assert merchant_address.startswith("4") and len(merchant_address) == 95  # mainnet prefix
    assert watch.address == merchant_address
    pid = new_payment_id()
    integrated = merchant.make_integrated_address(pid)
    assert integrated.startswith("4") and len(integrated) == 106
    assert merchant.split_integrated_address(integrated) == (merchant_address, pid)
    # The payer can build the same address from the merchant's standard address.
    assert net.payer.make_integrated_address(pid, merchant_address) == integrated

    amount = 1_500_000_000_000 + secrets.randbelow(10**9)
    txid = net.payer.transfer(integrated, amount)
    assert len(txid) == 64 and int(txid, 16) >= 0
    assert txid in rt.pool_txids()

    # 0-conf: get_transfers pool=true asks the daemon's pool itself, no refresh needed.
    for wallet in (merchant, watch):
        entry = wait_for(wallet, txid)
        assert entry["type"] == "pool"
        assert entry["payment_id"] == pid
        assert entry["amount"] == amount
        assert entry["height"] == 0
        assert "confirmations" not in entry  # absent, not 0
        assert entry["address"] == merchant_address
        assert entry["locked"] is True
        assert entry["fee"] > 0
        assert entry["double_spend_seen"] is False

    count = rt.mine(1)
    assert count == rt.daemon_height()
    # Without a refresh the wallet still reports the stale pool entry.
    assert get(merchant, txid)["type"] == "pool"
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        assert wallet.height() == count
        entry = get(wallet, txid)
        assert entry["type"] == "in"
        assert entry["height"] == count - 1  # the index of the block that holds it
        assert entry["confirmations"] == 1
        assert entry["payment_id"] == pid
        assert entry["amount"] == amount
        assert entry["locked"] is True
        assert find(wallet, txid, pool=True) is None
    payments = merchant.call("get_payments", {"payment_id": pid})["payments"]
    assert [(p["tx_hash"], p["amount"], p["block_height"]) for p in payments] == [
        (txid, amount, count - 1)
    ]

    assert rt.mine(9) == count + 9
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        entry = get(wallet, txid)
        assert (entry["type"], entry["height"], entry["confirmations"]) == ("in", count - 1, 10)
        assert entry["locked"] is False  # the 10-block lock is over
        by_txid = wallet.call("get_transfer_by_txid", {"txid": txid})["transfer"]
        assert (by_txid["payment_id"], by_txid["confirmations"]) == (pid, 10)


def test_height_filter_min_exclusive_max_inclusive(net: Net) -> None:
    rt, merchant = net.rt, net.merchant
    _pid, txid = pay(net, XMR)
    # Pool entries (height 0) are returned whatever the height filter says.
    top = rt.daemon_height()
    pool_filter = {"in": True, "pool": True, "filter_by_height": True, "min_height": top}
    assert wait_for(merchant, txid, **pool_filter)["type"] == "pool"

    height = rt.mine(1) - 1
    merchant.refresh()

    def listed(**bounds: int) -> bool:
        return find(merchant, txid, **{"in": True, "filter_by_height": True, **bounds}) is not None

    assert not listed(min_height=height)  # min is exclusive
    assert listed(min_height=height - 1)
    assert not listed(min_height=height - 2, max_height=height - 1)
    assert listed(min_height=height - 2, max_height=height)  # max is inclusive
    assert listed(min_height=0)


def test_coinbase_to_the_merchant_is_type_block(net: Net) -> None:
    rt, merchant = net.rt, net.merchant
    count = rt.mine(1, to_address=merchant.address)
    merchant.refresh()
    coinbase = [e for e in merchant.transfers() if e["height"] == count - 1]
    assert len(coinbase) == 1
    assert coinbase[0]["type"] == "block"
    assert coinbase[0]["payment_id"] == "0" * 16
    assert coinbase[0]["amount"] > 0
    assert coinbase[0]["confirmations"] == 1
    # The default miner is the burn address, which no test wallet owns.
    assert rt.miner_address == BURN_ADDRESS
    rt.mine(1)
    merchant.refresh()
    assert [e for e in merchant.transfers() if e["height"] == count] == []


def test_reorg_drops_the_transfer(net: Net) -> None:
    rt, merchant, watch = net.rt, net.merchant, net.watch
    pid, txid = pay(net, 2 * XMR)
    wait_for(
        merchant, txid
    )  # the merchant sees it in the pool; the watch-only wallet does not look
    height = rt.mine(1) - 1
    before = rt.mine(2)
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        assert get(wallet, txid)["confirmations"] == 3
    old_hash = rt.block_hash(height)

    # 1. Replace the tx's block and the two above it by 4 new blocks; the tx goes back to the
    #    daemon's pool (flush=False).
    count = rt.reorg(height - 1, flush=False)
    assert count == before + 1
    assert rt.block_hash(height) != old_hash
    assert txid in rt.pool_txids()
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        assert wallet.height() == count
        assert find(wallet, txid, **{"in": True}) is None
    # A wallet that had already seen the tx in the pool does not list it as pool again (wallet2
    # skips pool txs it scanned before): for the merchant it is simply gone until mined again.
    assert find(merchant, txid, **{"in": True, "pool": True, "out": True}) is None
    with pytest.raises(RPCError) as err:
        merchant.call("get_transfer_by_txid", {"txid": txid})
    assert err.value.code == -8  # "Transaction not found."
    # A wallet that never saw it in the pool lists it as a pool entry again.
    entry = get(watch, txid)
    assert (entry["type"], entry["height"], entry["payment_id"]) == ("pool", 0, pid)
    assert "confirmations" not in entry
    by_txid = watch.call("get_transfer_by_txid", {"txid": txid})["transfer"]
    assert (by_txid["type"], by_txid["height"]) == ("pool", 0)

    # 2. The next block mines it again, at a new height, confirmations start over.
    count = rt.mine(1)
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        entry = get(wallet, txid)
        assert (entry["type"], entry["height"], entry["confirmations"]) == ("in", count - 1, 1)
        assert entry["payment_id"] == pid
    assert count - 1 != height

    # 3. Reorg again, now flushing it from the pool: it disappears for good.
    rt.reorg(count - 2)
    assert txid not in rt.pool_txids()
    count = rt.mine(2)  # nothing brings it back
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        assert wallet.height() == count
        assert find(wallet, txid) is None
        assert wallet.call("get_payments", {"payment_id": pid}).get("payments", []) == []

    # The payer still works after the reorgs (transfer() refreshes and retries on tx_rejected).
    net.payer.refresh()
    _pid, txid2 = pay(net, XMR)
    assert wait_for(merchant, txid2)["type"] == "pool"


def test_view_only_wallet_restore_height_replacement_and_restart(net: Net) -> None:
    rt, merchant = net.rt, net.merchant
    _pid, txid = pay(net, XMR)
    mined_at = rt.mine(1) - 1
    rt.mine(1)
    # Restored from the block after the payment's, a view-only wallet never reports it.
    late = rt.view_only_wallet(merchant, "late-watch", restore_height=mined_at + 1)
    assert late.height() == rt.daemon_height()
    assert find(late, txid) is None
    port, old_pid = late.port, late.pid
    # Stand-in on the same port: the same keys restored from 0 report it.
    late.stop()
    full = rt.view_only_wallet(merchant, "full-watch", port=port)
    assert full.port == port and full.pid != old_pid
    assert get(full, txid)["height"] == mined_at
    # A restart reopens the same wallet file on the same port, refreshed as before.
    before = full.pid
    assert rt.restart_wallet(full) is full
    assert full.pid != before and full.port == port and full.filename == "full-watch"
    assert full.height() == rt.daemon_height()
    assert get(full, txid)["height"] == mined_at
    full.stop()


def test_rpc_errors_carry_code_and_message(net: Net) -> None:
    with pytest.raises(RPCError) as err:
        net.merchant.make_integrated_address("ab" * 32)  # long ids are obsolete
    assert (err.value.code, err.value.message) == (-5, "Invalid payment ID")
    assert err.value.method == "make_integrated_address"
    with pytest.raises(RPCError) as err:
        net.merchant.call("no_such_method")
    assert err.value.code == -32601
    with pytest.raises(RPCError) as err:
        net.rt.daemon_rpc("get_block_header_by_height", {"height": 10**6})
    assert err.value.code < 0
    assert net.watch.view_key() == net.merchant.view_key()
    with pytest.raises(RPCError) as err:
        net.watch.call("query_key", {"key_type": "spend_key"})
    assert err.value.code == -29  # watch-only: no spend key


def test_digest_login(net: Net) -> None:
    rt = net.rt
    guarded = rt.wallet("guarded", login=("user", "pass"))  # create_wallet went through digest
    try:
        assert guarded.call("get_version")["version"] == 65561
        assert len(guarded.address) == 95
        guarded.refresh()
        assert [guarded.height() for _ in range(3)] == [rt.daemon_height()] * 3  # nc 1, 2, 3 ...
        guarded.close()  # a new connection needs a new challenge
        assert guarded.height() == rt.daemon_height()

        # What the server sends without credentials: 401 with an MD5 qop=auth digest challenge.
        conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=10)
        conn.request("POST", "/json_rpc", body=b'{"jsonrpc":"2.0","id":"0","method":"get_height"}')
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 401
        challenges = " ".join(response.msg.get_all("WWW-Authenticate") or [])
        assert 'qop="auth"' in challenges and "algorithm=MD5" in challenges

        for login in [("user", "wrong"), ("someone", "pass")]:
            intruder = WalletRPC(guarded.port, login=login)
            with pytest.raises(AuthError, match="refused") as err:
                intruder.call("get_height")
            assert err.value.code == 401
            intruder.close()
        with pytest.raises(AuthError, match="requires an HTTP digest login"):
            WalletRPC(guarded.port).call("get_height")
    finally:
        guarded.stop()
    assert guarded._child is not None and guarded._child.popen.returncode is not None


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is a monero program (not a reaped, reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"monero" in cmdline and state != "Z"


def test_stop_leaves_no_process() -> None:
    with Regtest() as rt:
        plain = rt.wallet("plain", create=False)  # no wallet open: stop_wallet fails, SIGTERM
        # A wallet started from a thread that ends at once must survive it (PDEATHSIG is per
        # thread; the harness forks from its own long-lived thread).
        box: list[WalletRPC] = []
        worker = threading.Thread(target=lambda: box.append(rt.wallet("t", ("a", "b"), False)))
        worker.start()
        worker.join()
        time.sleep(0.3)
        assert box[0].call("get_version")["version"] == 65561
        assert plain.call("get_version")["version"] == 65561
        pids = rt.pids
        workdir = rt.workdir
        assert len(pids) == 3 and all(_running(pid) for pid in pids)
        assert (workdir / "monerod.log").exists()
    for pid in pids:
        assert not _running(pid), pid
    assert not workdir.exists()
    assert not list(Path.cwd().glob("monero-wallet-rpc.*.login"))
    rt.stop()  # idempotent


def test_children_die_with_a_killed_test_process(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed test process takes monerod and wallet-rpc with it.  This
    process becomes a child subreaper meanwhile, so the orphans are reparented to it and it can
    reap them and read how they died."""
    script = (
        "import os, signal, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.monero_regtest import Regtest\n"
        "rt = Regtest(sys.argv[2]).start()\n"
        "rt.wallet('w', create=False)\n"
        "print(*rt.pids, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, root, str(tmp_path / "rt")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == -signal.SIGKILL, done.stderr
        pids = [int(p) for p in done.stdout.split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 10
        for pid in pids:
            while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
                assert time.monotonic() < deadline, f"{pid} still running"
                time.sleep(0.05)
            assert os.WIFSIGNALED(status[1]) and os.WTERMSIG(status[1]) == signal.SIGKILL
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# -- two nodes ----------------------------------------------------------------------------------

N = 2  # confirmations in the double-spend tests


@pytest.fixture(scope="module")
def two() -> Iterator[Net]:
    """Two nodes; every wallet talks to node A.  The merchant's wallet looks at the pool, its
    view-only twin is refreshed only after blocks: one wallet that saw each payment
    unconfirmed, one that did not."""
    with Regtest(nodes=2) as rt:
        payer = rt.wallet("payer")
        merchant = rt.wallet("merchant")
        watch = rt.view_only_wallet(merchant, "merchant-watch")
        rt.fund(payer)
        yield Net(rt, payer, merchant, watch)


def test_two_nodes_split_fork_and_join(two: Net) -> None:
    rt = two.rt
    for node in (A, B):
        info = rt.info(node=node)
        assert info["offline"] is False and info["nettype"] == "fakechain"
        peers = rt.connections(node=node)
        assert peers and {c["host"] for c in peers} == {"127.0.0.1"}
    assert rt.top_hash(node=A) == rt.top_hash(node=B)
    # Joined, a block mined on one node is on the other when mine() returns.
    count = rt.mine(1, node=B)
    assert rt.daemon_height(node=A) == count and rt.top_hash(node=A) == rt.top_hash(node=B)

    base = rt.split()
    assert base == count and rt.is_split
    assert rt.connections(node=A) == [] and rt.connections(node=B) == []
    assert rt.mine(2, node=A) == base + 2
    assert rt.mine(3, node=B) == base + 3
    a_fork, b_top = rt.block_hash(base, node=A), rt.top_hash(node=B)
    assert a_fork != rt.block_hash(base, node=B)
    assert rt.daemon_height(node=A) == base + 2  # nothing crossed over

    assert rt.join() == base + 3 and not rt.is_split
    # A reorganised onto B's longer fork: its own two blocks are gone.
    assert rt.top_hash(node=A) == b_top
    assert rt.block_hash(base, node=A) == rt.block_hash(base, node=B) != a_fork
    assert rt.connections(node=A) and rt.connections(node=B)


def test_double_spend_pair_spends_one_output_twice(two: Net) -> None:
    rt = two.rt
    address = two.merchant.make_integrated_address(new_payment_id())
    first = rt.double_spend(two.payer, address)
    second = rt.double_spend(two.payer, address)
    for pair in (first, second):
        assert pair.payment.txid != pair.conflict.txid
        assert pair.payment.address == address and pair.conflict.address == two.payer.address
        assert pair.payment.amount > 0 and pair.payment.fee > 0
        # The same key image (32 bytes of the tx prefix) in both.
        assert pair.key_image in pair.payment.blob and pair.key_image in pair.conflict.blob
        # Nothing relayed either: no pool has them, no wallet lists them.
        for node in (A, B):
            assert not {pair.payment.txid, pair.conflict.txid} & set(rt.pool_txids(node=node))
        assert find(two.merchant, pair.payment.txid) is None
    assert first.key_image != second.key_image  # each call takes an output of its own
    # Relayed, the first of a pair is accepted and the second refused as a double spend.
    rt.send_raw_transaction(second.conflict.blob)
    with pytest.raises(RPCError, match="double_spend"):
        rt.send_raw_transaction(second.payment.blob)
    rt.mine(1)
    assert rt.tx_height(second.conflict.txid) == rt.daemon_height() - 1


def test_double_spend_reorg_drops_the_payment(two: Net) -> None:
    """B's conflicting tx wins by one block; the payment had N confirmations on A."""
    rt, merchant, watch = two.rt, two.merchant, two.watch
    pid = new_payment_id()
    pair = rt.double_spend(two.payer, merchant.make_integrated_address(pid))
    base = rt.split()
    rt.send_raw_transaction(pair.payment.blob, node=A)
    rt.send_raw_transaction(pair.conflict.blob, node=B)
    assert pair.payment.txid in rt.pool_txids(node=A)
    assert pair.payment.txid not in rt.pool_txids(node=B)
    assert pair.conflict.txid not in rt.pool_txids(node=A)
    assert wait_for(merchant, pair.payment.txid)["type"] == "pool"  # seen unconfirmed

    a_count = rt.confirm(pair.payment.txid, N, node=A)
    mined_at = rt.tx_height(pair.payment.txid, node=A)
    assert mined_at == base and a_count == base + N
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        entry = get(wallet, pair.payment.txid)
        assert (entry["type"], entry["confirmations"], entry["payment_id"]) == ("in", N, pid)
        assert entry["amount"] == pair.payment.amount
    # On A the conflicting tx is a double spend now.
    with pytest.raises(RPCError, match="double_spend"):
        rt.send_raw_transaction(pair.conflict.blob, node=A)

    rt.confirm(pair.conflict.txid, 1, node=B)
    b_count = rt.mine(a_count + 1 - rt.daemon_height(node=B), node=B)
    assert b_count == a_count + 1 and rt.tx_height(pair.conflict.txid, node=B) == base
    b_top = rt.top_hash(node=B)

    assert rt.join() == b_count
    assert rt.top_hash(node=A) == b_top
    assert rt.tx_height(pair.payment.txid, node=A) is None
    assert rt.tx_height(pair.conflict.txid, node=A) == base
    # The loser is back in A's pool (and reaches B's), not flagged, and never mined.
    pooled = rt.pool_entry(pair.payment.txid, node=A)
    assert pooled is not None
    assert pooled["kept_by_block"] is True and pooled["double_spend_seen"] is False
    refresh(merchant, watch)
    # The merchant had seen it in the pool: it lists it nowhere now.  Its view-only twin first
    # met it mined: it lists it as a pool entry again.
    assert find(merchant, pair.payment.txid, **{"in": True, "pool": True, "out": True}) is None
    entry = get(watch, pair.payment.txid)
    assert (entry["type"], entry["height"], entry["double_spend_seen"]) == ("pool", 0, False)
    assert "confirmations" not in entry
    count = rt.mine(2)
    refresh(merchant, watch)
    assert rt.tx_height(pair.payment.txid, node=A) is None
    assert pair.payment.txid in rt.pool_txids(node=A)
    assert find(merchant, pair.payment.txid) is None
    assert get(watch, pair.payment.txid)["type"] == "pool"
    assert watch.height() == count
    for node in (A, B):
        rt.flush_txpool(node=node)


def test_deep_double_spend_reorg_of_a_payment_never_seen_unconfirmed(two: Net) -> None:
    """The payment reaches A only mined (mine_unseen); B's conflicting chain is 9 longer."""
    rt, merchant, watch = two.rt, two.merchant, two.watch
    pair = rt.double_spend(two.payer, merchant.make_integrated_address(new_payment_id()))
    base = rt.daemon_height()
    a_count = rt.mine_unseen([pair.payment.blob], N + 1)
    assert not rt.is_split and a_count == base + N + 1
    assert rt.tx_height(pair.payment.txid, node=A) == base
    assert pair.payment.txid not in rt.pool_txids(node=A)
    refresh(merchant, watch)
    for wallet in (merchant, watch):
        assert get(wallet, pair.payment.txid)["confirmations"] == N + 1

    rt.split()
    assert rt.pop_blocks(N + 1, node=B) == base  # B alone goes back below the payment
    assert pair.payment.txid not in rt.pool_txids(node=B)
    rt.send_raw_transaction(pair.conflict.blob, node=B)
    rt.confirm(pair.conflict.txid, 1, node=B)
    b_count = rt.mine(a_count + 9 - rt.daemon_height(node=B), node=B)
    assert rt.join() == b_count == a_count + 9
    assert rt.tx_height(pair.payment.txid, node=A) is None
    assert rt.tx_height(pair.conflict.txid, node=A) == base
    assert pair.payment.txid in rt.pool_txids(node=A)
    # The view-only wallet refreshes first: the payment is gone from "in" and listed as a pool
    # entry with its amount.
    watch.refresh()
    entry = get(watch, pair.payment.txid)
    assert (entry["type"], entry["double_spend_seen"]) == ("pool", False)
    assert entry["amount"] == pair.payment.amount
    # The merchant's wallet scans the pool before it refreshes (what a monitor's get_transfers
    # does when the reorg lands between its refresh and its read): it still lists the payment
    # as mined, *and* as a pool entry of amount 0 (wallet2 had already received those
    # outputs); the refresh then drops the mined entry, the amount stays 0.
    stale = [
        (e["type"], e["amount"]) for e in merchant.transfers() if e["txid"] == pair.payment.txid
    ]
    assert sorted(stale) == [("in", pair.payment.amount), ("pool", 0)]
    merchant.refresh()
    entry = get(merchant, pair.payment.txid)
    assert (entry["type"], entry["amount"], entry["double_spend_seen"]) == ("pool", 0, False)
    merchant.refresh()
    assert get(merchant, pair.payment.txid)["amount"] == 0
    for node in (A, B):
        rt.flush_txpool(node=node)


def test_two_node_stop_leaves_no_process() -> None:
    with Regtest(nodes=2) as rt:
        pids, workdir = rt.pids, rt.workdir
        assert len(pids) == 2 and all(_running(pid) for pid in pids)
        assert rt.node_log(B).exists() and rt.node_address(A) != rt.node_address(B)
    for pid in pids:
        assert not _running(pid), pid
    assert not workdir.exists()
