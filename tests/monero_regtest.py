"""A private Monero regtest chain for tests: one genuine ``monerod`` and any number of genuine
``monero-wallet-rpc`` processes, all on free loopback ports, all files in one temporary directory.

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


class Regtest:
    """A temporary regtest chain: ``monerod --regtest --offline --fixed-difficulty 1`` plus
    monero-wallet-rpc processes.  Use as a context manager or call :meth:`start` / :meth:`stop`.

    ``workdir``: use (and keep) this directory instead of a fresh temporary one.
    ``keep_logs``: do not delete the temporary work dir at :meth:`stop` (its path is printed)."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        keep_logs: bool = False,
        log_level: int = 0,
        miner_address: str = BURN_ADDRESS,
    ) -> None:
        self._own_dir = workdir is None
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="monero-regtest-"))
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep_logs = keep_logs
        self.log_level = log_level
        self.miner_address = miner_address
        self.daemon_port: int | None = None
        self.wallets: list[WalletRPC] = []
        self._daemon_child: _Child | None = None
        self._daemon: _Client | None = None
        self._children: list[_Child] = []
        self._lock = threading.RLock()
        self._spawner: Forker | None = None
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Regtest:
        if self._daemon is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        """PIDs of every child started so far (daemon first)."""
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
        """Start monerod and wait until ``get_info`` answers."""
        with self._lock:
            if self._daemon is not None:
                return self
            try:
                self._start_daemon()
            except BaseException:
                self.stop()
                raise
            return self

    def _start_daemon(self) -> None:
        node = self.workdir / "node"
        for _attempt in range(3):
            port, p2p = free_port(), free_port()
            # fmt: off
            argv = [
                MONEROD, "--regtest", "--offline", "--fixed-difficulty", "1",
                "--data-dir", str(node),
                "--log-file", str(self.workdir / "monerod.log"),
                "--log-level", str(self.log_level),
                "--rpc-bind-ip", HOST, "--rpc-bind-port", str(port),
                "--p2p-bind-ip", HOST, "--p2p-bind-port", str(p2p),
                "--no-igd", "--no-zmq", "--rpc-ssl", "disabled",
                "--disable-dns-checkpoints", "--check-updates", "disabled",
                "--non-interactive",
            ]
            # fmt: on
            child = self._spawn("monerod", argv)
            client = _Client(port)
            if self._await_rpc(child, functools.partial(client.jsonrpc, "get_info"), "monerod"):
                self._daemon_child, self._daemon, self.daemon_port = child, client, port
                return
            child.wait_gone(1.0)  # exited early: most likely the port was taken; try another
        raise RuntimeError("monerod exited during start-up 3 times\n" + child.diagnostics())

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
            if self._daemon is not None and self._daemon_child is not None:
                if self._daemon_child.popen.poll() is None:
                    with contextlib.suppress(RPCError, OSError, http.client.HTTPException):
                        self._daemon.post("/stop_daemon", {}, timeout=STOP_GRACE)
                self._daemon.close()
                self._daemon_child.wait_gone(4 * STOP_GRACE)
            for child in self._children:  # anything else (e.g. a failed start)
                child.wait_gone(0.5)
            if self._spawner is not None:
                self._spawner.close()
            if self._own_dir and not self.keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)
            elif self.keep_logs:
                print(f"monero regtest logs kept in {self.workdir}")

    # -- daemon -------------------------------------------------------------------------------

    def _client(self) -> _Client:
        if self._daemon is None:
            raise RuntimeError("Regtest not started")
        return self._daemon

    @property
    def daemon_address(self) -> str:
        """``127.0.0.1:<port>`` of monerod's RPC, for ``--daemon-address``."""
        return f"{HOST}:{self.daemon_port}"

    def daemon_rpc(
        self,
        path_or_method: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A daemon call: ``"/path"`` posts JSON to that endpoint (``/stop_daemon``,
        ``/get_transaction_pool_hashes``, ``/pop_blocks`` ...) and returns the whole reply;
        anything else is a ``/json_rpc`` method (``flush_txpool``, ``get_block_header_by_height``
        ...) and returns its ``result``.  A ``status`` other than OK raises :class:`RPCError`."""
        client = self._client()
        if path_or_method.startswith("/"):
            reply = client.post(path_or_method, params or {}, timeout)
            if isinstance(reply, dict) and reply.get("status") not in (None, "OK"):
                raise RPCError(0, f"status {reply['status']!r}", path_or_method)
            return reply  # type: ignore[no-any-return]
        return client.jsonrpc(path_or_method, params, timeout)  # type: ignore[no-any-return]

    def daemon_height(self) -> int:
        """The daemon's block count (top block index + 1)."""
        return int(self.daemon_rpc("/get_height")["height"])

    def block_hash(self, height: int) -> str:
        """Hash of the main-chain block at index ``height``."""
        header = self.daemon_rpc("get_block_header_by_height", {"height": height})
        return str(header["block_header"]["hash"])

    def pool_txids(self) -> list[str]:
        """Hashes of the txs in the daemon's pool."""
        return list(self.daemon_rpc("/get_transaction_pool_hashes").get("tx_hashes", []))

    def flush_txpool(self, txids: list[str] | None = None) -> None:
        """Drop ``txids`` (default: everything) from the daemon's pool."""
        self.daemon_rpc("flush_txpool", {"txids": txids} if txids else {})

    def mine(self, n: int, to_address: str | None = None) -> int:
        """Mine ``n`` blocks (``generateblocks``) paying ``to_address``, by default
        :attr:`miner_address` (:data:`BURN_ADDRESS`, which no test wallet owns).  Returns the new
        block count (``generateblocks``' ``result.height`` is the last index, i.e. one less)."""
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
            )
            height = int(result["height"]) + 1
            n -= chunk
        return height

    def reorg(
        self,
        fork_below_height: int,
        blocks: int | None = None,
        *,
        to_address: str | None = None,
        flush: bool = True,
    ) -> int:
        """Replace every block above index ``fork_below_height`` with ``blocks`` new ones
        (default: one more than it replaces) built by ``generateblocks`` with ``prev_block`` =
        the hash of block ``fork_below_height``.  The alternative chain is longer, so monerod
        reorganizes to it (``REORGANIZE SUCCESS``), and the txs of the removed blocks go back to
        its pool.  With ``flush`` (default) exactly those txs are then flushed from the pool so
        they cannot be mined again; with ``flush=False`` the next block mines them again.

        To undo a tx mined at height H: ``reorg(H - 1)``.  Returns the new block count.
        Wallets see the change only after ``refresh()``."""
        old_count = self.daemon_height()
        replaced = old_count - 1 - fork_below_height
        if fork_below_height < 0 or replaced < 1:
            raise ValueError(
                f"fork_below_height must be below the top block {old_count - 1} and >= 0"
            )
        if blocks is None:
            blocks = replaced + 1
        if blocks <= replaced:
            raise ValueError(f"need more than {replaced} blocks to out-grow the current chain")
        first_old = self.block_hash(fork_below_height + 1)
        pool_before = set(self.pool_txids())
        self.daemon_rpc(
            "generateblocks",
            {
                "amount_of_blocks": blocks,
                "wallet_address": to_address or self.miner_address,
                "prev_block": self.block_hash(fork_below_height),
            },
            timeout=RPC_TIMEOUT + blocks,
        )
        new_count = self.daemon_height()
        if (
            new_count != fork_below_height + 1 + blocks
            or self.block_hash(fork_below_height + 1) == first_old
        ):
            raise RuntimeError(
                f"monerod did not reorganize (count {old_count} -> {new_count})\n"
                + (self._daemon_child.diagnostics() if self._daemon_child else "")
            )
        if flush:
            back = [txid for txid in self.pool_txids() if txid not in pool_before]
            if back:
                self.flush_txpool(back)
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

    # -- wallets ------------------------------------------------------------------------------

    def wallet(
        self,
        name: str,
        login: tuple[str, str] | None = None,
        create: bool = True,
        *,
        auto_refresh: int | None = None,
    ) -> WalletRPC:
        """Start a monero-wallet-rpc connected to the daemon (``--trusted-daemon``) and, with
        ``create``, ``create_wallet`` ``name`` (password "") in it.  ``login`` turns on HTTP
        digest auth (``--rpc-login user:pass``), else ``--disable-rpc-login``.  With
        ``create=False`` no wallet is open (call ``generate_from_keys``, ``open_wallet`` ...).
        Background refresh is switched off unless ``auto_refresh`` gives a period in seconds."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad wallet name {name!r}")
        client = self._client()
        wallets_dir = self.workdir / "wallets"
        wallets_dir.mkdir(exist_ok=True)
        with self._lock:
            for _attempt in range(3):
                port = free_port()
                # fmt: off
                argv = [
                    WALLET_RPC,
                    "--daemon-address", f"{HOST}:{client.port}", "--trusted-daemon",
                    "--daemon-ssl", "disabled",
                    "--rpc-bind-ip", HOST, "--rpc-bind-port", str(port), "--rpc-ssl", "disabled",
                    "--wallet-dir", str(wallets_dir),
                    "--shared-ringdb-dir", str(self.workdir / "ringdb"),
                    "--log-file", str(self.workdir / f"wallet-{name}-{port}.log"),
                    "--log-level", str(self.log_level),
                    "--non-interactive",
                ]
                # fmt: on
                argv += (
                    ["--rpc-login", f"{login[0]}:{login[1]}"] if login else ["--disable-rpc-login"]
                )
                child = self._spawn(f"wallet-{name}-{port}", argv)
                wallet = WalletRPC(port, login=login, name=name)
                wallet._child = child
                try:
                    ok = self._await_rpc(child, functools.partial(wallet.call, "get_version"), name)
                except BaseException:
                    child.wait_gone(1.0)
                    raise
                if ok:
                    break
                child.wait_gone(1.0)
            else:
                raise RuntimeError(
                    f"wallet-rpc {name} exited during start-up\n" + child.diagnostics()
                )
            self.wallets.append(wallet)
        try:
            if create:
                wallet.call(
                    "create_wallet", {"filename": name, "password": "", "language": "English"}
                )
                self._set_auto_refresh(wallet, auto_refresh)
        except BaseException:
            wallet.stop()
            raise
        return wallet

    @staticmethod
    def _set_auto_refresh(wallet: WalletRPC, period: int | None) -> None:
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
    ) -> WalletRPC:
        """A new wallet-rpc with a watch-only wallet of ``of`` (``generate_from_keys`` with its
        address and secret view key, ``restore_height`` 0), refreshed.  It sees incoming
        transfers (including pool entries) exactly like ``of``, but cannot spend."""
        address, view_key = of.address, of.view_key()
        wallet = self.wallet(name, login, create=False)
        try:
            wallet.call(
                "generate_from_keys",
                {
                    "filename": name,
                    "address": address,
                    "viewkey": view_key,
                    "password": "",
                    "restore_height": 0,
                    "autosave_current": True,
                },
            )
            self._set_auto_refresh(wallet, auto_refresh)
            wallet.refresh()
        except BaseException:
            wallet.stop()
            raise
        return wallet
