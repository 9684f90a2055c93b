"""A private Monero regtest chain for tests: genuine ``monerod`` (one, or several that can fork
and rejoin) and any number of genuine ``monero-wallet-rpc`` processes, all on free loopback
ports, all files in one temporary directory.

Standard library only; it installs nothing.  The API is synchronous and blocking.  Code that runs
inside the Twisted reactor must call it through ``deferToThread``; every object serialises its
own calls with a lock, so one caller at a time from any thread is fine.

    with Regtest() as rt:
        payer = rt.wallet("payer")
        merchant = rt.wallet("merchant")
        watch = rt.view_only_wallet(merchant, "merchant-watch")
        rt.fund(payer)                                   # 100 coinbase outputs, 40 unlocked
        addr = merchant.make_integrated_address("0123456789abcdef")
        txid = payer.transfer(addr, 10**12)              # 1 XMR; in the pool at once
        rt.mine(1)                                       # 1 confirmation (after refresh)
        merchant.refresh()

Two nodes, a double spend and the reorg that settles it (wallets talk to node A):

    with Regtest(nodes=2) as rt:
        ...                                              # wallets and fund() as above
        pair = rt.double_spend(payer, addr)              # two txs, one key image, unrelayed
        rt.split()                                       # no p2p connection left
        rt.send_raw_transaction(pair.payment.blob, node=A)
        rt.send_raw_transaction(pair.conflict.blob, node=B)
        count = rt.confirm(pair.payment.txid, 2, node=A) # A: the payment, 2 confirmations
        rt.confirm(pair.conflict.txid, 1, node=B)
        rt.mine(count + 1 - rt.daemon_height(node=B), node=B)   # B: one block longer
        rt.join()                                        # A reorganises onto B's chain
        assert rt.tx_height(pair.payment.txid) is None   # back in A's pool, never mined

Facts about the real daemon and wallet that this module relies on (Monero 0.18.0.0):

* Heights.  A block's *height* is its index (genesis = 0).  The daemon's ``get_height`` and the
  wallet's ``get_height`` are block *counts* (top index + 1).  ``mine()``, ``fund()`` and
  ``reorg()`` return the block count.  A tx mined in the last block of a chain of count C has
  height C - 1 and, once the wallet is refreshed, ``confirmations`` 1.
* Blocks are mined by default to :data:`BURN_ADDRESS`, a valid address whose keys were thrown
  away, so no test wallet sees coinbase entries unless a test asks for them with ``to_address``
  (a coinbase to a wallet shows up in ``get_transfers`` as ``"type": "block"``).
* Wallets do not notice new blocks by themselves: background auto-refresh is switched off in
  every wallet this module opens (unless ``auto_refresh=`` is given), so call ``refresh()``.
* Several nodes: ``out_peers`` / ``in_peers`` 0 make monerod drop its connections (split), 8
  lets it reconnect (join) within about a second; the node on the shorter fork then
  reorganises onto the longer one.  A tx given to a split node stays with it (it cannot
  relay, so it is "fluffed" at once and can be mined; regtest mines Dandelion++ stem txs too).
  After a double-spend reorg the losing tx is back in the loser's pool (``kept_by_block``,
  ``double_spend_seen`` false), reaches the other node's pool too at the next connection, and
  is never mined.  A wallet that had seen that tx in the pool no longer lists it at all; one
  that first met it mined lists it as ``pool`` again, with its amount if the wallet refreshed
  before it scanned the pool, with amount 0 (for good) if it scanned the pool first (it then
  lists the tx as ``in`` *and* ``pool`` until its refresh).  ``submit_block`` cannot carry a
  tx the node has not got in its pool, hence :meth:`Regtest.mine_unseen` syncs over p2p.
* Every child runs with ``PR_SET_PDEATHSIG`` = SIGKILL, so none survives the test process.
  Linux delivers that signal when the *thread* that forked the child ends, so all children are
  forked by one helper thread that lives as long as the :class:`Regtest` (callers in short-lived
  pool threads therefore cannot kill their own wallets by finishing).
* Every child runs with ``cwd`` and ``HOME`` set to the work directory, so nothing is written
  outside it (wallet-rpc writes ``monero-wallet-rpc.<port>.login`` into its cwd, and both
  programs default to files under ``~``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .children import Forker, dies_with_parent

MONEROD = "monerod"
WALLET_RPC = "monero-wallet-rpc"
HOST = "127.0.0.1"

RPC_TIMEOUT = 60.0  # seconds for one RPC call
START_TIMEOUT = 60.0  # seconds until a started process answers RPC
STOP_GRACE = 5.0  # seconds to wait after a polite stop, and again after SIGTERM

#: Mainnet-format address (regtest uses mainnet prefixes) generated once by a throw-away
#: monero-wallet-rpc whose wallet file was deleted: nobody holds its keys.  Default miner.
BURN_ADDRESS = (
    "44ZiQEDmVaXPAETtxKzDRgAkkXngByC91P7hBjtBRDd4Fa4"
    "NooLUipddGgD4Q8PmBMcZvx43QrsjQeCr6Rah9NDUH3Z8kAp"
)

#: Coinbase outputs unlock after this many blocks (CRYPTONOTE_MINED_MONEY_UNLOCK_WINDOW).
COINBASE_UNLOCK = 60
#: A first transfer needs enough unlocked outputs on the chain for ring size 16 decoys:
#: with 61 or 70 blocks the wallet says "not enough outputs to use", with 75 it works.
MIN_SPENDABLE_CHAIN = 85
#: generateblocks is called in chunks of this many blocks (~14 blocks/s, well within the timeout).
MINE_CHUNK = 100

#: Node indexes of a :class:`Regtest` with several nodes.  Every wallet talks to node A.
A = 0
B = 1
_NODE_NAMES = "abcdefgh"
#: out_peers / in_peers of joined nodes (0 while split).
JOINED_PEERS = 8
#: Seconds for joined nodes to agree on the top block, or split nodes to drop their peers.
SYNC_TIMEOUT = 60.0
#: Flags of a refused send_raw_transaction reply.
_TX_REJECTIONS = (
    "double_spend",
    "invalid_input",
    "invalid_output",
    "low_mixin",
    "overspend",
    "fee_too_low",
    "too_big",
    "too_few_outputs",
    "sanity_check_failed",
)


class RPCError(Exception):
    """A JSON-RPC error object, a non-OK ``status``, or an HTTP error, from daemon or wallet."""

    def __init__(self, code: int, message: str, method: str = "") -> None:
        self.code = code
        self.message = message
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}[{code}] {message}")


class AuthError(RPCError):
    """HTTP digest authentication was refused (wrong or missing login).  ``code`` is 401."""


def available() -> bool:
    """True if both ``monerod`` and ``monero-wallet-rpc`` are on PATH."""
    return shutil.which(MONEROD) is not None and shutil.which(WALLET_RPC) is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^,\s]*))')


def _digest_challenges(headers: list[str]) -> list[dict[str, str]]:
    """Every ``Digest`` challenge in the WWW-Authenticate header(s), as lower-case key dicts.
    epee sends two (algorithm=MD5 and algorithm=MD5-sess), possibly in one header."""
    found = []
    for chunk in re.split(r"\bDigest\s+", ", ".join(headers)):
        params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(chunk)}
        if "nonce" in params:
            found.append(params)
    return found


class _Client:
    """JSON over one keep-alive ``http.client`` connection, with HTTP digest (MD5, qop=auth).

    epee ties the digest nonce to the TCP connection, which is why urllib's digest handler (it
    sends ``Connection: close``) never gets in.  Here the challenge and the authenticated retry
    travel on the same connection; later requests reuse the nonce with a growing ``nc``.  A new
    connection starts without credentials and picks up a fresh challenge."""

    def __init__(
        self,
        port: int,
        login: tuple[str, str] | None = None,
        host: str = HOST,
        timeout: float = RPC_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.login = login
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False  # the current connection has already carried a full exchange
        self._challenge: dict[str, str] | None = None
        self._nc = 0
        self._ids = 0

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._reused = False
        self._challenge = None
        self._nc = 0

    def _authorization(self, path: str) -> str:
        assert self.login is not None and self._challenge is not None
        user, password = self.login
        ch = self._challenge
        self._nc += 1
        nc = f"{self._nc:08x}"
        cnonce = secrets.token_hex(8)
        ha1 = _md5(f"{user}:{ch.get('realm', '')}:{password}")
        ha2 = _md5(f"POST:{path}")
        response = _md5(f"{ha1}:{ch['nonce']}:{nc}:{cnonce}:auth:{ha2}")
        fields = [
            f'username="{user}"',
            f'realm="{ch.get("realm", "")}"',
            f'nonce="{ch["nonce"]}"',
            f'uri="{path}"',
            "algorithm=MD5",
            f'response="{response}"',
            "qop=auth",
            f"nc={nc}",
            f'cnonce="{cnonce}"',
        ]
        if "opaque" in ch:
            fields.append(f'opaque="{ch["opaque"]}"')
        return "Digest " + ", ".join(fields)

    def post(self, path: str, body: object, timeout: float | None = None) -> Any:
        """POST ``body`` as JSON to ``path``; return the decoded JSON reply (HTTP 200 only)."""
        data = json.dumps(body).encode()
        with self._lock:
            status, reason, payload = self._exchange(path, data, timeout or self.timeout)
        if status != 200:
            text = payload[:300].decode(errors="replace")
            raise RPCError(
                status, f"HTTP {status} {reason} from {self.host}:{self.port}{path} {text}"
            )
        try:
            return json.loads(payload)
        except ValueError as e:
            raise RPCError(-32700, f"not JSON from {path}: {payload[:200]!r}") from e

    def _exchange(self, path: str, data: bytes, timeout: float) -> tuple[int, str, bytes]:
        fresh = False  # self._challenge was received during this call
        refusals = 0
        reconnects = 0
        for _round in range(6):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            conn = self._conn
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            else:
                conn.timeout = timeout
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            answered_fresh = False
            if self.login is not None and self._challenge is not None:
                headers["Authorization"] = self._authorization(path)
                answered_fresh = fresh
            reused = self._reused
            try:
                conn.request("POST", path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server dropped an idle keep-alive connection before reading the request:
                # reconnect once.  A fresh connection failing like this is a real error.
                self._drop()
                if reused and reconnects == 0:
                    reconnects += 1
                    continue
                raise
            except BaseException:
                self._drop()
                raise
            self._reused = True
            if response.will_close:
                self._drop()  # also forgets the challenge: epee binds the nonce to the connection
            if response.status != 401:
                return response.status, response.reason, payload
            if self.login is None:
                raise AuthError(
                    401, f"{self.host}:{self.port} requires an HTTP digest login; none given"
                )
            usable = [
                c
                for c in _digest_challenges(response.msg.get_all("WWW-Authenticate") or [])
                if c.get("algorithm", "MD5").upper() == "MD5" and "auth" in c.get("qop", "auth")
            ]
            if not usable:
                raise AuthError(401, f"no usable digest challenge from {self.host}:{self.port}")
            if answered_fresh:
                # Our answer to a challenge received during this very call was refused; only a
                # "stale" nonce deserves one more try.
                refusals += 1
                if usable[0].get("stale", "").lower() != "true" or refusals > 1:
                    self._drop()
                    break
            if self._conn is not None:
                self._challenge = usable[0]
                self._nc = 0
                fresh = True
        raise AuthError(
            401,
            f"HTTP digest authentication as {self.login[0] if self.login else None!r} refused by "
            f"{self.host}:{self.port} (wrong user name or password?)",
        )

    def jsonrpc(self, method: str, params: object = None, timeout: float | None = None) -> Any:
        """Call a JSON-RPC method at ``/json_rpc``; return ``result`` or raise :class:`RPCError`."""
        with self._lock:
            self._ids += 1
            ident = self._ids
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": str(ident), "method": method}
        if params is not None:
            body["params"] = params
        try:
            reply = self.post("/json_rpc", body, timeout)
        except RPCError as e:
            e.method = e.method or method
            raise
        if not isinstance(reply, dict):
            raise RPCError(-32600, f"unexpected reply {reply!r}", method)
        error = reply.get("error")
        if error:
            raise RPCError(int(error.get("code", 0)), str(error.get("message", "")), method)
        result = reply.get("result", {})
        if isinstance(result, dict) and result.get("status") not in (None, "OK"):
            raise RPCError(0, f"status {result['status']!r}", method)
        return result


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<{path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


class _Child:
    """A started program: its Popen, log file and captured stdout/stderr."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path, out: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.out = out

    @property
    def pid(self) -> int:
        return self.popen.pid

    def diagnostics(self) -> str:
        return (
            f"--- {self.log} (tail) ---\n{_tail(self.log)}\n"
            f"--- {self.out} (tail) ---\n{_tail(self.out, 15)}"
        )

    def wait_gone(self, grace: float = STOP_GRACE) -> None:
        """Wait ``grace`` s for the process to exit, then SIGTERM, then SIGKILL; always reaps."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=grace if sig != signal.SIGKILL else None)
                return
            except subprocess.TimeoutExpired:
                continue


class WalletRPC:
    """A client of one monero-wallet-rpc process (one open wallet).

    Built by :meth:`Regtest.wallet`; it can also attach to any running wallet-rpc:
    ``WalletRPC(port, login=("user", "pass"))`` (then :meth:`stop` only sends ``stop_wallet``)."""

    def __init__(
        self,
        port: int,
        *,
        login: tuple[str, str] | None = None,
        name: str = "",
        host: str = HOST,
        timeout: float = RPC_TIMEOUT,
    ) -> None:
        self.port = port
        self.host = host
        self.login = login
        self.name = name
        self._rpc = _Client(port, login, host, timeout)
        self._child: _Child | None = None
        #: The wallet file open in it, and its background refresh period (None: off), when a
        #: :class:`Regtest` opened it (what :meth:`Regtest.restart_wallet` reopens).
        self.filename: str | None = None
        self.auto_refresh: int | None = None

    def __repr__(self) -> str:
        return f"<WalletRPC {self.name!r} {self.host}:{self.port}>"

    @property
    def url(self) -> str:
        """The JSON-RPC endpoint, e.g. for a monitor under test."""
        return f"http://{self.host}:{self.port}/json_rpc"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def log_file(self) -> Path | None:
        return self._child.log if self._child else None

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Call a wallet JSON-RPC method; return its ``result``.  ``timeout=`` overrides 60 s."""
        return self._rpc.jsonrpc(method, params, **kw)  # type: ignore[no-any-return]

    @property
    def address(self) -> str:
        """Primary address (account 0, index 0) of the open wallet."""
        return str(self.call("get_address", {"account_index": 0})["address"])

    def refresh(self) -> dict[str, Any]:
        """Fetch new blocks from the daemon; ``{"blocks_fetched": n, "received_money": b}``."""
        return self.call("refresh")

    def height(self) -> int:
        """The wallet's synced block count (daemon-style height), not a block index."""
        return int(self.call("get_height")["height"])

    def transfer(self, address: str, amount: int, *, priority: int = 0) -> str:
        """Send ``amount`` atomic units (1 XMR = 10**12) to ``address``; return the tx hash.

        After a reorg the wallet may pick outputs the daemon now sees as double spends and the
        daemon rejects the tx (wallet log: ``error::tx_rejected``): then refresh and retry once."""
        params = {"destinations": [{"address": address, "amount": amount}], "priority": priority}
        try:
            result = self.call("transfer", params)
        except RPCError as e:
            if "reject" not in e.message.lower():
                raise
            self.refresh()
            result = self.call("transfer", params)
        return str(result["tx_hash"])

    def make_integrated_address(
        self, payment_id_hex: str, standard_address: str | None = None
    ) -> str:
        """Integrated address for an 8-byte (16 hex) payment id, of this wallet or of
        ``standard_address``.  The wallet accepts ``0000000000000000``: never issue that id."""
        params = {"payment_id": payment_id_hex}
        if standard_address is not None:
            params["standard_address"] = standard_address
        return str(self.call("make_integrated_address", params)["integrated_address"])

    def split_integrated_address(self, address: str) -> tuple[str, str]:
        """``(standard_address, payment_id_hex)`` of an integrated address."""
        r = self.call("split_integrated_address", {"integrated_address": address})
        return str(r["standard_address"]), str(r["payment_id"])

    def view_key(self) -> str:
        """The secret view key (hex)."""
        return str(self.call("query_key", {"key_type": "view_key"})["key"])

    def transfers(self, **params: Any) -> list[dict[str, Any]]:
        """``get_transfers`` flattened into one list (default ``in`` and ``pool``)."""
        params = params or {"in": True, "pool": True}
        result = self.call("get_transfers", params)
        return [entry for kind in result.values() if isinstance(kind, list) for entry in kind]

    def close(self) -> None:
        """Close the HTTP connection (the process keeps running)."""
        self._rpc.close()

    def stop(self) -> None:
        """``stop_wallet`` (saves, exits), then SIGTERM / SIGKILL if still running.  Idempotent."""
        self._request_stop()
        if self._child is not None:
            self._child.wait_gone()
        self._rpc.close()

    def _request_stop(self) -> None:
        if self._child is not None and self._child.popen.poll() is not None:
            return
        try:
            self.call("stop_wallet", timeout=STOP_GRACE)
        except (RPCError, OSError, http.client.HTTPException):
            # e.g. -13 "No wallet file" when none is open: the process keeps running.
            if self._child is not None and self._child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self._child.popen.send_signal(signal.SIGTERM)
        self._rpc.close()


@dataclass
class _Node:
    """One monerod of a :class:`Regtest`."""

    index: int
    child: _Child
    client: _Client
    rpc_port: int
    p2p_port: int

    @property
    def name(self) -> str:
        return _NODE_NAMES[self.index]


@dataclass(frozen=True)
class SignedTx:
    """A signed transaction that no daemon has seen yet (built with ``do_not_relay``)."""

    txid: str
    blob: str  #: hex, for :meth:`Regtest.send_raw_transaction`
    address: str  #: its destination
    amount: int  #: atomic units the destination receives
    fee: int


@dataclass(frozen=True)
class DoubleSpend:
    """Two transactions spending the same output (one key image): once either is mined, the
    other is a double spend.  See :meth:`Regtest.double_spend`."""

    key_image: str
    payment: SignedTx
    conflict: SignedTx


class Regtest:
    """A temporary regtest chain: ``monerod --regtest --offline --fixed-difficulty 1`` plus
    monero-wallet-rpc processes.  Use as a context manager or call :meth:`start` / :meth:`stop`.

    ``workdir``: use (and keep) this directory instead of a fresh temporary one.
    ``keep_logs``: do not delete the temporary work dir at :meth:`stop` (its path is printed).
    ``nodes``: with 2 (or more) the chain is kept by that many monerods that are *not*
    ``--offline``: p2p bound to 127.0.0.1, each with every other as its only peers
    (``--add-exclusive-node``), so they can be split (:meth:`split`), mine separate forks, and
    be joined again (:meth:`join`): the shorter side then reorganises onto the longer chain.
    Node :data:`A` (index 0) is the one every wallet talks to; daemon methods take ``node=``
    (default A).  While joined, :meth:`mine` and :meth:`reorg` return only once every node has
    the new top block."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        keep_logs: bool = False,
        log_level: int = 0,
        miner_address: str = BURN_ADDRESS,
        nodes: int = 1,
    ) -> None:
        if not 1 <= nodes <= len(_NODE_NAMES):
            raise ValueError(f"nodes must be 1 to {len(_NODE_NAMES)}")
        self._own_dir = workdir is None
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="monero-regtest-"))
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep_logs = keep_logs
        self.log_level = log_level
        self.miner_address = miner_address
        self.node_count = nodes
        #: RPC port of node A (what every wallet's ``--daemon-address`` points at).
        self.daemon_port: int | None = None
        self.wallets: list[WalletRPC] = []
        self._nodes: list[_Node] = []
        self._split = False
        self._reserved_key_images: set[str] = set()
        self._children: list[_Child] = []
        self._lock = threading.RLock()
        self._spawner: Forker | None = None
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Regtest:
        if not self._nodes:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        """PIDs of every child started so far (daemons first)."""
        return [c.pid for c in self._children]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.workdir), "LC_ALL": "C"}

    def _spawn(self, name: str, argv: list[str]) -> _Child:
        """Fork ``argv`` from the spawner thread, stdout/stderr into ``<name>.out``."""
        if self._stopped:
            raise RuntimeError("this Regtest has been stopped")
        if self._spawner is None:
            self._spawner = Forker("monero-regtest-spawner")
        log = self.workdir / f"{name}.log"
        out = self.workdir / f"{name}.out"

        def fork() -> subprocess.Popen[bytes]:
            with open(out, "ab") as sink:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=self._env(),
                    preexec_fn=dies_with_parent(),
                    close_fds=True,
                )

        child = _Child(name, self._spawner.call(fork), log, out)
        self._children.append(child)
        return child

    def _await_rpc(self, child: _Child, probe: Callable[[], object], what: str) -> bool:
        """Poll ``probe`` until it answers.  False if the process exited (e.g. port taken)."""
        deadline = time.monotonic() + START_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if child.popen.poll() is not None:
                return False
            try:
                probe()
                return True
            except AuthError:
                raise
            except (OSError, RPCError, http.client.HTTPException) as e:
                last = e
            time.sleep(0.1)
        child.wait_gone(1.0)
        raise RuntimeError(
            f"{what} did not answer within {START_TIMEOUT:.0f} s (last error: {last!r})\n"
            + child.diagnostics()
        )

    def start(self) -> Regtest:
        """Start monerod (every node) and wait until ``get_info`` answers; with several nodes,
        also until they are connected and agree on the top block."""
        with self._lock:
            if self._nodes:
                return self
            try:
                self._start_nodes()
                if self.node_count > 1:
                    self.wait_synced()
            except BaseException:
                self.stop()
                raise
            return self

    def _node_argv(self, index: int, rpc: int, p2p: int, peers: list[int]) -> list[str]:
        suffix = "" if index == 0 else f"-{_NODE_NAMES[index]}"
        # fmt: off
        argv = [
            MONEROD, "--regtest", "--fixed-difficulty", "1",
            "--data-dir", str(self.workdir / f"node{suffix}"),
            "--log-file", str(self.workdir / f"monerod{suffix}.log"),
            "--log-level", str(self.log_level),
            "--rpc-bind-ip", HOST, "--rpc-bind-port", str(rpc),
            "--p2p-bind-ip", HOST, "--p2p-bind-port", str(p2p),
            "--no-igd", "--no-zmq", "--rpc-ssl", "disabled",
            "--disable-dns-checkpoints", "--check-updates", "disabled",
            "--non-interactive",
        ]
        # fmt: on
        if not peers:
            argv.insert(2, "--offline")  # a lone node: no p2p at all
        for port in peers:
            argv += ["--add-exclusive-node", f"{HOST}:{port}"]
        return argv

    def _start_nodes(self) -> None:
        count = self.node_count
        failed: _Child | None = None
        for _attempt in range(3):
            ports: list[int] = []
            while len(ports) < 2 * count:
                if (port := free_port()) not in ports:
                    ports.append(port)
            rpcs, p2ps = ports[:count], ports[count:]
            started: list[tuple[_Child, _Client]] = []
            for i in range(count):
                peers = [p for j, p in enumerate(p2ps) if j != i]
                name = "monerod" if i == 0 else f"monerod-{_NODE_NAMES[i]}"
                child = self._spawn(name, self._node_argv(i, rpcs[i], p2ps[i], peers))
                started.append((child, _Client(rpcs[i])))
            failed = None
            for child, client in started:
                probe = functools.partial(client.jsonrpc, "get_info")
                if not self._await_rpc(child, probe, child.name):
                    failed = child
                    break
            if failed is None:
                self._nodes = [
                    _Node(i, child, client, rpcs[i], p2ps[i])
                    for i, (child, client) in enumerate(started)
                ]
                self.daemon_port = rpcs[0]
                return
            # One exited early: most likely a port was taken.  Stop them all, try new ports.
            for child, client in started:
                client.close()
                child.wait_gone(1.0)
        assert failed is not None
        raise RuntimeError("monerod exited during start-up 3 times\n" + failed.diagnostics())

    def stop(self) -> None:
        """Stop every wallet-rpc and monerod (polite stop, then SIGTERM, then SIGKILL, by PID),
        reap them all, and delete the work dir unless ``keep_logs`` or a given ``workdir``."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for wallet in self.wallets:  # ask all first: they exit in parallel
                wallet._request_stop()
            for wallet in self.wallets:
                if wallet._child is not None:
                    wallet._child.wait_gone()
            for node in self._nodes:
                if node.child.popen.poll() is None:
                    with contextlib.suppress(RPCError, OSError, http.client.HTTPException):
                        node.client.post("/stop_daemon", {}, timeout=STOP_GRACE)
            for node in self._nodes:
                node.client.close()
                node.child.wait_gone(4 * STOP_GRACE)
            for child in self._children:  # anything else (e.g. a failed start)
                child.wait_gone(0.5)
            if self._spawner is not None:
                self._spawner.close()
            if self._own_dir and not self.keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.keep_logs:
                print(f"monero regtest logs kept in {self.workdir}")

    # -- daemon -------------------------------------------------------------------------------

    def _node(self, node: int) -> _Node:
        if not self._nodes:
            raise RuntimeError("Regtest not started")
        if not 0 <= node < len(self._nodes):
            raise ValueError(f"no node {node}: this Regtest has {len(self._nodes)}")
        return self._nodes[node]

    def _client(self, node: int = A) -> _Client:
        return self._node(node).client

    @property
    def daemon_address(self) -> str:
        """``127.0.0.1:<port>`` of node A's RPC, for ``--daemon-address``."""
        return self.node_address(A)

    def node_address(self, node: int) -> str:
        """``127.0.0.1:<port>`` of a node's RPC."""
        return f"{HOST}:{self._node(node).rpc_port}"

    def node_log(self, node: int = A) -> Path:
        """The node's ``--log-file``."""
        suffix = "" if node == 0 else f"-{_NODE_NAMES[node]}"
        return self.workdir / f"monerod{suffix}.log"

    def daemon_rpc(
        self,
        path_or_method: str,
        params: dict[str, Any] | list[Any] | None = None,
        timeout: float | None = None,
        *,
        node: int = A,
    ) -> dict[str, Any]:
        """A daemon call: ``"/path"`` posts JSON to that endpoint (``/stop_daemon``,
        ``/get_transaction_pool_hashes``, ``/pop_blocks`` ...) and returns the whole reply;
        anything else is a ``/json_rpc`` method (``flush_txpool``, ``get_block_header_by_height``
        ...) and returns its ``result``.  A ``status`` other than OK raises :class:`RPCError`."""
        client = self._client(node)
        if path_or_method.startswith("/"):
            reply = client.post(path_or_method, params or {}, timeout)
            if isinstance(reply, dict) and reply.get("status") not in (None, "OK"):
                raise RPCError(0, f"status {reply['status']!r}", path_or_method)
            return reply  # type: ignore[no-any-return]
        return client.jsonrpc(path_or_method, params, timeout)  # type: ignore[no-any-return]

    def daemon_height(self, *, node: int = A) -> int:
        """The daemon's block count (top block index + 1)."""
        return int(self.daemon_rpc("/get_height", node=node)["height"])

    def block_hash(self, height: int, *, node: int = A) -> str:
        """Hash of the main-chain block at index ``height``."""
        header = self.daemon_rpc("get_block_header_by_height", {"height": height}, node=node)
        return str(header["block_header"]["hash"])

    def info(self, *, node: int = A) -> dict[str, Any]:
        """The node's ``get_info`` (``height``, ``top_block_hash``, ``synchronized``,
        ``outgoing_connections_count`` ...)."""
        return self.daemon_rpc("get_info", node=node)

    def top_hash(self, *, node: int = A) -> str:
        """Hash of the node's top block."""
        return str(self.info(node=node)["top_block_hash"])

    def pool_txids(self, *, node: int = A) -> list[str]:
        """Hashes of the txs in the daemon's pool."""
        return list(self.daemon_rpc("/get_transaction_pool_hashes", node=node).get("tx_hashes", []))

    def pool_entry(self, txid: str, *, node: int = A) -> dict[str, Any] | None:
        """The daemon's ``get_transaction_pool`` entry of ``txid`` (``double_spend_seen``,
        ``kept_by_block``, ``relayed`` ...), or None if it is not in the pool."""
        reply = self.daemon_rpc("/get_transaction_pool", node=node)
        for entry in reply.get("transactions") or []:
            if entry.get("id_hash") == txid:
                return entry  # type: ignore[no-any-return]
        return None

    def tx_height(self, txid: str, *, node: int = A) -> int | None:
        """Index of the block of the node's main chain that holds ``txid``; None if the tx is
        only in its pool, only in an alternative block, or unknown to it."""
        reply = self.daemon_rpc("/get_transactions", {"txs_hashes": [txid]}, node=node)
        for tx in reply.get("txs") or []:
            if tx.get("tx_hash") == txid and not tx.get("in_pool"):
                return int(tx["block_height"])
        return None

    def flush_txpool(self, txids: list[str] | None = None, *, node: int = A) -> None:
        """Drop ``txids`` (default: everything) from the daemon's pool."""
        self.daemon_rpc("flush_txpool", {"txids": txids} if txids else {}, node=node)

    def send_raw_transaction(self, tx_blob: str, *, node: int = A) -> None:
        """Submit a signed tx (hex) to one node's pool, as a wallet would.  Split nodes keep it
        to themselves.  A rejection (e.g. ``double spend``) raises :class:`RPCError` whose
        message has the daemon's reasons."""
        reply = self._client(node).post(
            "/send_raw_transaction", {"tx_as_hex": tx_blob, "do_not_relay": False}
        )
        if not isinstance(reply, dict) or reply.get("status") != "OK":
            reply = reply if isinstance(reply, dict) else {}
            flags = [k for k in _TX_REJECTIONS if reply.get(k)]
            raise RPCError(
                0,
                f"node {_NODE_NAMES[node]} rejected the tx: status {reply.get('status')!r}, "
                f"reason {reply.get('reason', '')!r}, {flags}",
                "send_raw_transaction",
            )

    def mine(self, n: int, to_address: str | None = None, *, node: int = A) -> int:
        """Mine ``n`` blocks (``generateblocks``) on ``node`` paying ``to_address``, by default
        :attr:`miner_address` (:data:`BURN_ADDRESS`, which no test wallet owns).  Returns the new
        block count (``generateblocks``' ``result.height`` is the last index, i.e. one less).
        Joined nodes: returns once every node has the new top block."""
        if n < 1:
            raise ValueError("n must be >= 1")
        address = to_address or self.miner_address
        height = -1
        while n > 0:
            chunk = min(n, MINE_CHUNK)
            result = self.daemon_rpc(
                "generateblocks",
                {"amount_of_blocks": chunk, "wallet_address": address},
                timeout=RPC_TIMEOUT + chunk,
                node=node,
            )
            height = int(result["height"]) + 1
            n -= chunk
        self._settle()
        return height

    def confirm(self, txid: str, confirmations: int, *, node: int = A) -> int:
        """Mine on ``node`` until ``txid`` (in its pool, or already mined) has ``confirmations``
        confirmations there (block count - tx height); returns the block count.  A tx handed
        to monerod moments ago may miss the next block template (its relay is asynchronous):
        a block without it is followed by another, up to 20."""
        if confirmations < 1:
            raise ValueError("confirmations must be >= 1")
        for _attempt in range(20):
            if self.tx_height(txid, node=node) is not None:
                break
            if txid not in self.pool_txids(node=node):
                raise RuntimeError(f"{txid} is neither mined on nor in the pool of node {node}")
            self.mine(1, node=node)
        height = self.tx_height(txid, node=node)
        if height is None:
            raise RuntimeError(f"node {node} did not mine {txid} in 20 blocks")
        count = self.daemon_height(node=node)
        if count - height < confirmations:
            count = self.mine(confirmations - (count - height), node=node)
        return count

    def reorg(
        self,
        fork_below_height: int,
        blocks: int | None = None,
        *,
        to_address: str | None = None,
        flush: bool = True,
        node: int = A,
    ) -> int:
        """Replace every block above index ``fork_below_height`` with ``blocks`` new ones
        (default: one more than it replaces) built by ``generateblocks`` with ``prev_block`` =
        the hash of block ``fork_below_height``.  The alternative chain is longer, so monerod
        reorganizes to it (``REORGANIZE SUCCESS``), and the txs of the removed blocks go back to
        its pool.  With ``flush`` (default) exactly those txs are then flushed from the pool so
        they cannot be mined again; with ``flush=False`` the next block mines them again.

        To undo a tx mined at height H: ``reorg(H - 1)``.  Returns the new block count.
        Wallets see the change only after ``refresh()``.  Joined nodes all follow (and, with
        ``flush``, the txs are flushed from every node's pool)."""
        old_count = self.daemon_height(node=node)
        replaced = old_count - 1 - fork_below_height
        if fork_below_height < 0 or replaced < 1:
            raise ValueError(
                f"fork_below_height must be below the top block {old_count - 1} and >= 0"
            )
        if blocks is None:
            blocks = replaced + 1
        if blocks <= replaced:
            raise ValueError(f"need more than {replaced} blocks to out-grow the current chain")
        first_old = self.block_hash(fork_below_height + 1, node=node)
        pool_before = set(self.pool_txids(node=node))
        self.daemon_rpc(
            "generateblocks",
            {
                "amount_of_blocks": blocks,
                "wallet_address": to_address or self.miner_address,
                "prev_block": self.block_hash(fork_below_height, node=node),
            },
            timeout=RPC_TIMEOUT + blocks,
            node=node,
        )
        new_count = self.daemon_height(node=node)
        if (
            new_count != fork_below_height + 1 + blocks
            or self.block_hash(fork_below_height + 1, node=node) == first_old
        ):
            raise RuntimeError(
                f"monerod did not reorganize (count {old_count} -> {new_count})\n"
                + self._node(node).child.diagnostics()
            )
        if flush:
            back = [txid for txid in self.pool_txids(node=node) if txid not in pool_before]
            if back:
                self.flush_txpool(back, node=node)
            self._settle()
            if back and not self._split:
                for other in range(len(self._nodes)):
                    stray = [t for t in self.pool_txids(node=other) if t in back]
                    if stray:
                        self.flush_txpool(stray, node=other)
        else:
            self._settle()
        return new_count

    def fund(self, wallet: WalletRPC, blocks: int = 100) -> int:
        """Mine ``blocks`` coinbase outputs to ``wallet``, then, if needed, more blocks to the
        miner address until the first of them is unlocked (60 blocks) and the chain has enough
        unlocked outputs for ring decoys; refresh the wallet.  With the default 100 blocks on a
        fresh chain no extra block is needed and 40 outputs are spendable at once (each transfer
        uses ~2; change unlocks after 10 blocks).  Returns the new block count."""
        start = self.daemon_height()
        count = self.mine(blocks, wallet.address)
        extra = max(start + COINBASE_UNLOCK + 1 - count, MIN_SPENDABLE_CHAIN - count, 0)
        if extra:
            count = self.mine(extra)
        wallet.refresh()
        return count

    # -- several nodes ----------------------------------------------------------------------

    @property
    def is_split(self) -> bool:
        """True between :meth:`split` and :meth:`join`."""
        return self._split

    def _need_nodes(self) -> None:
        if len(self._nodes) < 2:
            raise RuntimeError("this needs a Regtest(nodes=2) (or more)")

    def _settle(self) -> None:
        """Joined nodes: wait until all of them have the same top block."""
        if len(self._nodes) > 1 and not self._split:
            self.wait_synced()

    def connections(self, *, node: int = A) -> list[dict[str, Any]]:
        """The node's p2p connections (``get_connections``)."""
        return list(self.daemon_rpc("get_connections", node=node).get("connections") or [])

    def _set_peers(self, count: int) -> None:
        for i in range(len(self._nodes)):
            self.daemon_rpc("/out_peers", {"out_peers": count}, node=i)
            self.daemon_rpc("/in_peers", {"in_peers": count}, node=i)

    def split(self, timeout: float = SYNC_TIMEOUT) -> int:
        """Cut the nodes apart: ``out_peers`` and ``in_peers`` 0 on every node (monerod drops
        the connections it has), then wait until none has a connection left.  From now on a
        tx or block given to one node stays there.  Joined nodes are first waited for until
        they agree on the top block, so every fork starts from the same chain.  Returns that
        block count."""
        self._need_nodes()
        if not self._split:
            self.wait_synced(timeout)
        self._set_peers(0)
        self._split = True
        deadline = time.monotonic() + timeout
        while any(self.connections(node=i) for i in range(len(self._nodes))):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes still connected {timeout:.0f} s after split()")
            time.sleep(0.05)
        return self.daemon_height()

    def join(self, timeout: float = SYNC_TIMEOUT) -> int:
        """Reconnect split nodes (``out_peers`` / ``in_peers`` 8) and wait until they agree on
        the top block (:meth:`wait_synced`): a node on a shorter fork reorganises onto the
        longest chain; txs of its blocks that are not in that chain go back to its pool.  Two
        forks of *equal* length never converge by themselves: mine one more block on one side
        first.  Returns the common block count.  Harmless on joined nodes."""
        self._need_nodes()
        self._set_peers(JOINED_PEERS)
        self._split = False
        return self.wait_synced(timeout)

    def wait_synced(self, timeout: float = SYNC_TIMEOUT) -> int:
        """Until every node has a peer, reports ``synchronized`` and has the same height and
        top block hash as the others; returns that block count."""
        self._need_nodes()
        deadline = time.monotonic() + timeout
        while True:
            infos = [self.info(node=i) for i in range(len(self._nodes))]
            if (
                len({(i["height"], i["top_block_hash"]) for i in infos}) == 1
                and all(i.get("synchronized") for i in infos)
                and all(
                    i.get("outgoing_connections_count", 0) + i.get("incoming_connections_count", 0)
                    for i in infos
                )
            ):
                return int(infos[0]["height"])
            if time.monotonic() > deadline:
                state = [
                    {
                        k: i.get(k)
                        for k in (
                            "height",
                            "top_block_hash",
                            "synchronized",
                            "outgoing_connections_count",
                            "incoming_connections_count",
                        )
                    }
                    for i in infos
                ]
                raise RuntimeError(
                    f"nodes did not agree within {timeout:.0f} s: {state}\n"
                    + "\n".join(node.child.diagnostics() for node in self._nodes)
                )
            time.sleep(0.05)

    def pop_blocks(self, n: int, *, node: int = A, flush: bool = True) -> int:
        """Take the top ``n`` blocks off ``node``'s chain (``pop_blocks``); their txs go back to
        its pool and, with ``flush`` (default), are then flushed from it.  Meant for a node
        split from the others (joined, the next sync puts the blocks back).  Returns the new
        block count."""
        if n < 1:
            raise ValueError("n must be >= 1")
        pool_before = set(self.pool_txids(node=node))
        count = int(self.daemon_rpc("/pop_blocks", {"nblocks": n}, node=node)["height"])
        if flush:
            back = [txid for txid in self.pool_txids(node=node) if txid not in pool_before]
            if back:
                self.flush_txpool(back, node=node)
        return count

    def mine_unseen(
        self, tx_blobs: list[str], confirmations: int = 1, *, node: int = A, via: int = B
    ) -> int:
        """Get ``tx_blobs`` mined into ``node``'s chain without them ever entering ``node``'s
        pool: split the nodes, hand the txs to ``via`` alone, mine there until they have
        ``confirmations``, then join, so that ``node`` receives the blocks, txs included, by
        p2p sync.  A wallet watching ``node`` thus first meets them mined, like txs it missed
        while they were unconfirmed; wallet2 treats such a tx differently when a reorg puts it
        back into the pool (it lists it as ``pool`` again, where a tx it had seen in the pool
        is no longer listed at all).  Returns the common block count after the join."""
        self._need_nodes()
        self.split()
        txids = []
        for blob in tx_blobs:
            before = set(self.pool_txids(node=via))
            self.send_raw_transaction(blob, node=via)
            txids += [t for t in self.pool_txids(node=via) if t not in before]
        for txid in txids:
            self.confirm(txid, confirmations, node=via)
        if self.daemon_height(node=via) <= self.daemon_height(node=node):
            self.mine(1, node=via)  # the longer chain wins the join
        return self.join()

    def double_spend(
        self,
        payer: WalletRPC,
        address: str,
        other_address: str | None = None,
        *,
        key_image: str | None = None,
    ) -> DoubleSpend:
        """Two signed, unrelayed txs spending the same unlocked output of ``payer`` (key image
        ``key_image``, by default one not used by an earlier call): ``payment`` sweeps it to
        ``address``, ``conflict`` to ``other_address`` (default: the payer's own address).
        Each is valid alone; once one is mined the other is a double spend.  Relay them with
        :meth:`send_raw_transaction` (neither is recorded by the wallet: ``do_not_relay``).

        Several nodes are joined first and waited for until they agree, so that every ring
        member (decoy) exists on both sides of a later split."""
        if len(self._nodes) > 1:
            self.join()
        payer.refresh()
        if key_image is None:
            key_image = self._spendable_key_image(payer)
        self._reserved_key_images.add(key_image)
        payment = self._sweep_unrelayed(payer, key_image, address)
        conflict = self._sweep_unrelayed(payer, key_image, other_address or payer.address)
        return DoubleSpend(key_image, payment, conflict)

    def _spendable_key_image(self, payer: WalletRPC) -> str:
        available = payer.call("incoming_transfers", {"transfer_type": "available"})
        for entry in sorted(available.get("transfers") or [], key=lambda e: e["global_index"]):
            image = entry.get("key_image") or ""
            if (
                image
                and entry.get("unlocked")
                and not entry.get("frozen")
                and not entry.get("spent")
                and image not in self._reserved_key_images
            ):
                return str(image)
        raise RuntimeError(f"{payer} has no unlocked output left for a double spend")

    @staticmethod
    def _sweep_unrelayed(payer: WalletRPC, key_image: str, address: str) -> SignedTx:
        r = payer.call(
            "sweep_single",
            {
                "address": address,
                "key_image": key_image,
                "do_not_relay": True,
                "get_tx_hex": True,
            },
        )
        return SignedTx(
            str(r["tx_hash"]), str(r["tx_blob"]), address, int(r["amount"]), int(r["fee"])
        )

    # -- wallets ------------------------------------------------------------------------------

    def _launch_wallet_rpc(
        self, name: str, login: tuple[str, str] | None, port: int | None
    ) -> WalletRPC:
        """Start a monero-wallet-rpc process (no wallet open) and wait until it answers.  A
        fixed ``port`` that is still taken (a process that just exited) is retried for ~10 s."""
        wallets_dir = self.workdir / "wallets"
        wallets_dir.mkdir(exist_ok=True)
        attempts = 3 if port is None else 20
        with self._lock:
            for _attempt in range(attempts):
                use = port if port is not None else free_port()
                # fmt: off
                argv = [
                    WALLET_RPC,
                    "--daemon-address", self.daemon_address, "--trusted-daemon",
                    "--daemon-ssl", "disabled",
                    "--rpc-bind-ip", HOST, "--rpc-bind-port", str(use), "--rpc-ssl", "disabled",
                    "--wallet-dir", str(wallets_dir),
                    "--shared-ringdb-dir", str(self.workdir / "ringdb"),
                    "--log-file", str(self.workdir / f"wallet-{name}-{use}.log"),
                    "--log-level", str(self.log_level),
                    "--non-interactive",
                ]
                # fmt: on
                argv += (
                    ["--rpc-login", f"{login[0]}:{login[1]}"] if login else ["--disable-rpc-login"]
                )
                child = self._spawn(f"wallet-{name}-{use}", argv)
                wallet = WalletRPC(use, login=login, name=name)
                wallet._child = child
                try:
                    ok = self._await_rpc(child, functools.partial(wallet.call, "get_version"), name)
                except BaseException:
                    child.wait_gone(1.0)
                    raise
                if ok:
                    return wallet
                child.wait_gone(1.0)
                if port is not None:
                    time.sleep(0.5)
            raise RuntimeError(f"wallet-rpc {name} exited during start-up\n" + child.diagnostics())

    def wallet(
        self,
        name: str,
        login: tuple[str, str] | None = None,
        create: bool = True,
        *,
        auto_refresh: int | None = None,
        port: int | None = None,
    ) -> WalletRPC:
        """Start a monero-wallet-rpc connected to node A (``--trusted-daemon``) and, with
        ``create``, ``create_wallet`` ``name`` (password "") in it.  ``login`` turns on HTTP
        digest auth (``--rpc-login user:pass``), else ``--disable-rpc-login``.  With
        ``create=False`` no wallet is open (call ``generate_from_keys``, ``open_wallet`` ...).
        Background refresh is switched off unless ``auto_refresh`` gives a period in seconds.
        ``port``: listen there (e.g. to stand in for a stopped wallet-rpc) instead of a free
        port."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad wallet name {name!r}")
        self._client()
        wallet = self._launch_wallet_rpc(name, login, port)
        self.wallets.append(wallet)
        try:
            if create:
                wallet.call(
                    "create_wallet", {"filename": name, "password": "", "language": "English"}
                )
                wallet.filename = name
                self._set_auto_refresh(wallet, auto_refresh)
        except BaseException:
            wallet.stop()
            raise
        return wallet

    @staticmethod
    def _set_auto_refresh(wallet: WalletRPC, period: int | None) -> None:
        wallet.auto_refresh = period
        if period is None:
            wallet.call("auto_refresh", {"enable": False})
        else:
            wallet.call("auto_refresh", {"enable": True, "period": period})

    def view_only_wallet(
        self,
        of: WalletRPC,
        name: str,
        login: tuple[str, str] | None = None,
        *,
        auto_refresh: int | None = None,
        restore_height: int = 0,
        port: int | None = None,
    ) -> WalletRPC:
        """A new wallet-rpc with a watch-only wallet of ``of`` (``generate_from_keys`` with its
        address and secret view key), refreshed.  It sees incoming transfers (including pool
        entries) exactly like ``of``, but cannot spend.  ``restore_height``: the wallet scans
        only blocks from that index on (it never reports a transfer below it).  ``port``: as
        for :meth:`wallet`."""
        address, view_key = of.address, of.view_key()
        wallet = self.wallet(name, login, create=False, port=port)
        try:
            wallet.call(
                "generate_from_keys",
                {
                    "filename": name,
                    "address": address,
                    "viewkey": view_key,
                    "password": "",
                    "restore_height": restore_height,
                    "autosave_current": True,
                },
            )
            wallet.filename = name
            self._set_auto_refresh(wallet, auto_refresh)
            wallet.refresh()
        except BaseException:
            wallet.stop()
            raise
        return wallet

    def restart_wallet(self, wallet: WalletRPC, *, down: float = 0.0) -> WalletRPC:
        """Restart ``wallet``'s monero-wallet-rpc: ``stop_wallet`` (which saves the wallet
        file), ``down`` seconds with nothing listening, then a new process on the same port and
        login that opens the same file (``open_wallet``), with background refresh as before.
        Returns ``wallet``, now talking to the new process."""
        if wallet.filename is None or wallet not in self.wallets:
            raise ValueError(f"{wallet} is not a wallet this Regtest opened")
        wallet.stop()
        if down > 0:
            time.sleep(down)
        fresh = self._launch_wallet_rpc(wallet.name, wallet.login, wallet.port)
        fresh.close()
        wallet._child = fresh._child
        wallet._rpc.close()
        try:
            wallet.call("open_wallet", {"filename": wallet.filename, "password": ""})
            self._set_auto_refresh(wallet, wallet.auto_refresh)
        except BaseException:
            wallet.stop()
            raise
        return wallet
