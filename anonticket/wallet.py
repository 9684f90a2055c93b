"""Async JSON-RPC client for monero-wallet-rpc, on treq, with its own HTTP Digest client.

Every failure reaches callers as one `WalletError` whose `kind` is a small fixed set (usable as a
Prometheus label), and whose message is printable ASCII whatever the wallet sent.  Neither treq
nor Twisted has a Digest *client*, and epee's server is strict about it: the nonce lives on the
keep-alive TCP connection and `nc` must equal the server's own per-nonce counter.  So
authenticated calls are serialized behind a lock, over one persistent connection, and a 401 is
answered by taking the new challenge and retrying once.

A wallet must not be able to take the reactor either (issue #10): small calls have a small body
cap, and ``get_transfers``, the one answer that is legitimately large, is decoded in slices with
a bound on its entries (:mod:`anonticket.jsonslices`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionClosed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from anonticket.httpbody import BodyTooLarge, BytesProducer, read_capped
from anonticket.jsonslices import (
    MalformedJson,
    TooManyEntries,
    WrongShape,
    rpc_answer,
    run_sliced,
)

T = TypeVar("T")

# Entries of one get_transfers answer (in + pool) that are decoded at most: the real bound on
# its memory (~2 KB decoded an entry: ~40 MB) and on its decoding time (~0.2 s, in slices).
# Above it the answer is refused as too_large and the monitor asks for fewer heights.
MAX_TRANSFER_ENTRIES: Final = 20_000
# Byte cap of a get_transfers answer.  An entry is ~600 bytes, ~900 pretty-printed, so the entry
# limit is reached near 18 MB; 32 MiB leaves room for long notes, while the body is held twice
# for a moment as it is read (its chunks, then their join): 64 MiB at most.  Above it the answer
# is too_large as well: fewer heights make it smaller.
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
# Byte cap of every other call.  refresh and get_height answer under 100 bytes; json.loads of a
# whole body runs on the reactor, and 64 KiB of the worst JSON (`[{},{},...]`) takes ~4 ms there.
MAX_CALL_BODY_BYTES: Final = 64 * 1024
_CLIP = 100  # longest piece of server-provided text that may appear in an error message

WalletErrorKind = Literal[
    "unreachable", "timeout", "http_error", "bad_response", "rpc_error", "auth", "too_large"
]

# Failures of the connection itself (OSError covers DNS and raw socket errors).
_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    OSError,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestNotSent,
    RequestGenerationFailed,
)
# A POST on a pooled connection the server has just closed fails like this; safe to repeat once.
_STALE_CONNECTION = (ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent)

# Strongest first; the -sess variants only add a cnonce to HA1.
_ALGORITHMS = {"SHA-256": "sha256", "SHA-256-SESS": "sha256", "MD5": "md5", "MD5-SESS": "md5"}
_RANK: Final = {name: i for i, name in enumerate(_ALGORITHMS)}
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})\s*(?:,|$)')
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _printable(text: str) -> str:
    """``text`` with every character but printable ASCII escaped (``\\n``, ``\\x1b``,
    ``\\u2028``): what a wallet sends cannot end a log line, forge the next one or drive a
    terminal."""
    return _UNPRINTABLE.sub(lambda found: ascii(found[0])[1:-1], text)


# JSON-RPC error codes monero-wallet-rpc answers with (wallet_rpc_server_error_codes.h).
WATCH_ONLY = -29
METHOD_NOT_FOUND = -32601


class WalletError(Exception):
    """Any failure talking to the wallet.  The message never holds the RPC password, holds at
    most ~100 characters of anything the server sent, and is printable ASCII."""

    def __init__(self, kind: WalletErrorKind, message: str, code: int | None = None) -> None:
        # Escaped here as well as in _clip: no message can carry a control character, whichever
        # path built it.
        message = _printable(message)
        super().__init__(f"wallet {kind}: {message}")
        self.kind: WalletErrorKind = kind
        self.message = message
        self.code = code


def _challenges(values: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Parse WWW-Authenticate values: one or more `scheme k=v, k="v"` challenges each."""
    found: list[tuple[str, dict[str, str]]] = []
    for value in values:
        params: dict[str, str] | None = None
        pos = 0
        while pos < len(value):
            match = _PARAM.match(value, pos)
            if match is not None and params is not None:
                raw = match[2]
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                params[match[1].lower()] = raw
            else:
                match = _SCHEME.match(value, pos)
                if match is None:
                    break  # malformed remainder; keep what was understood
                params = {}
                found.append((match[1].lower(), params))
            pos = match.end()
    return found


@dataclass
class _Digest:
    """One accepted server challenge and our use count of its nonce."""

    realm: str
    nonce: str
    algorithm: str
    opaque: str | None
    nc: int = 0

    @classmethod
    def choose(cls, values: list[str]) -> _Digest | None:
        best: _Digest | None = None
        for scheme, p in _challenges(values):
            algorithm = p.get("algorithm", "MD5")
            qops = {q.strip().lower() for q in p.get("qop", "").split(",")}
            usable = algorithm.upper() in _ALGORITHMS and "auth" in qops
            if scheme != "digest" or not usable or "nonce" not in p or "realm" not in p:
                continue
            found = cls(p["realm"], p["nonce"], algorithm, p.get("opaque"))
            if best is None or _RANK[algorithm.upper()] < _RANK[best.algorithm.upper()]:
                best = found
        return best

    def authorization(self, user: str, password: str, method: str, uri: str) -> bytes:
        name = _ALGORITHMS[self.algorithm.upper()]

        def h(*parts: str) -> str:
            return hashlib.new(name, ":".join(parts).encode()).hexdigest()

        self.nc += 1
        nc, cnonce = f"{self.nc:08x}", secrets.token_hex(16)
        ha1 = h(user, self.realm, password)
        if self.algorithm.upper().endswith("-SESS"):
            ha1 = h(ha1, self.nonce, cnonce)
        response = h(ha1, self.nonce, nc, cnonce, "auth", h(method, uri))
        fields = [
            f'username="{_quote(user)}"',
            f'realm="{_quote(self.realm)}"',
            f'nonce="{_quote(self.nonce)}"',
            f'uri="{_quote(uri)}"',
            f"algorithm={self.algorithm}",
            f'response="{response}"',
            "qop=auth",
            f"nc={nc}",
            f'cnonce="{cnonce}"',
        ]
        if self.opaque is not None:
            fields.append(f'opaque="{_quote(self.opaque)}"')
        return ("Digest " + ", ".join(fields)).encode("utf-8")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _cancelled(exc: BaseException) -> bool:
    """Twisted reports a cancelled request as ResponseNeverReceived([CancelledError]) etc.;
    such an error must propagate as a cancellation, never trigger a retry."""
    if isinstance(exc, CancelledError | ConnectingCancelledError):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


class WalletClient:
    """monero-wallet-rpc JSON-RPC over one persistent HTTP connection pool."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        login: tuple[str, str] | None = None,
        timeout: float = 10.0,
        pool: HTTPConnectionPool | None = None,
        *,
        max_body: int = MAX_BODY_BYTES,
        max_call_body: int = MAX_CALL_BODY_BYTES,
        max_entries: int = MAX_TRANSFER_ENTRIES,
    ) -> None:
        """``max_body`` caps the bytes of a get_transfers answer, ``max_call_body`` those of any
        other call, ``max_entries`` the entries of a get_transfers answer (in + pool)."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("wallet URL must be http(s)://host:port")
        self._reactor = reactor
        self._url = base_url.rstrip("/") + "/json_rpc"
        self._uri = urlsplit(self._url).path  # what the Digest `uri` field must repeat
        self._login = login
        self._timeout = timeout
        self._max_body = max_body
        self._max_call_body = max_call_body
        self._max_entries = max_entries
        self._own_pool = pool is None
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            # epee binds the Digest nonce to the TCP connection: keep exactly one.
            pool.maxPersistentPerHost = 1 if login else 2
        self._pool = pool
        self._http = HTTPClient(Agent(reactor, pool=pool), data_to_body_producer=BytesProducer)
        self._lock = DeferredLock() if login else None
        self._digest: _Digest | None = None

    async def close(self) -> None:
        if self._own_pool:
            await self._pool.closeCachedConnections()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call `method`; return its `result` object.  The timeout bounds the whole call: waiting
        for the lock, connecting, auth round trips, the retry and reading the body.  Cancelling
        the call (e.g. at shutdown) raises CancelledError, the only non-WalletError.

        The answer may be at most ``max_call_body`` bytes (64 KiB by default), since it is
        decoded at once on the reactor; use :meth:`get_transfers` for transfers."""
        return await self._bounded(method, self._call(method, params))

    async def _call(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        body = await self._fetch(method, params, self._max_call_body, self._body_over(method))
        return self._decode(method, body)

    async def _bounded(self, method: str, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` under the call timeout, with every failure a WalletError."""
        exchange = Deferred.fromCoroutine(work)
        exchange.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        try:
            return await exchange
        except (WalletError, CancelledError):
            raise
        except Exception as exc:
            # Callers handle one exception type; an unforeseen one is still logged in full.
            self._log.failure("Unexpected error calling the wallet ({method})", method=method)
            raise WalletError("unreachable", f"{method}: {type(exc).__name__}") from exc

    def _timed_out(self, result: object, timeout: float) -> NoReturn:
        raise WalletError("timeout", f"no complete answer within {timeout:g} s")

    async def refresh(self) -> dict[str, Any]:
        return await self.call("refresh")

    async def identify(self) -> str:
        """What answers at the wallet URL, asked without changing or revealing anything:
        ``view_only``, ``spend_capable`` (it holds the spend key), ``monerod`` (a node, not a
        wallet) or ``unknown`` (restricted RPC, a hardware wallet, an old version, no answer).

        ``describe_transfer`` with no transaction set checks "watch-only" before the missing
        argument (monero's wallet_rpc_server.cpp), so a view-only wallet answers -29 and a
        spend-capable one "no txset provided".  Not ``query_key`` (a spend-capable wallet
        would send its secret key) and not ``sign`` (monero-wallet-rpc 0.18 dies when a
        view-only wallet is asked to sign).
        """
        try:
            await self.call("describe_transfer", {})
        except WalletError as e:
            if e.code == WATCH_ONLY:
                return "view_only"
            if e.kind == "rpc_error" and "no txset" in e.message:
                return "spend_capable"
            if e.code != METHOD_NOT_FOUND:
                return "unknown"
        else:
            return "unknown"
        try:
            # monerod's JSON-RPC has get_block_count; monero-wallet-rpc does not.
            count = (await self.call("get_block_count")).get("count")
        except WalletError:
            return "unknown"
        return "monerod" if isinstance(count, int) else "unknown"

    async def get_height(self) -> int:
        height = (await self.call("get_height")).get("height")
        if not isinstance(height, int) or isinstance(height, bool) or height < 0:
            raise WalletError("bad_response", "get_height: height is not a non-negative integer")
        return height

    async def get_transfers(
        self, min_height: int, max_height: int, *, pool: bool = True
    ) -> list[dict[str, Any]]:
        """Incoming transfers at heights ``(min_height, max_height]``, then (with ``pool``) those
        in the pool: the entries of ``result["in"]`` then ``result["pool"]``.

        The answer is decoded in slices of a few milliseconds, each followed by a reactor turn,
        and the timeout covers the decoding too.  More than ``max_entries`` entries, or more
        than ``max_body`` bytes, raise ``WalletError("too_large")``: ask for fewer heights.
        """
        params: dict[str, Any] = {"in": True, "pool": pool, "filter_by_height": True}
        params.update(min_height=min_height, max_height=max_height)
        heights = f"heights ({min_height}, {max_height}]"
        return await self._bounded("get_transfers", self._transfers(params, heights))

    async def _transfers(self, params: dict[str, Any], heights: str) -> list[dict[str, Any]]:
        method = "get_transfers"

        def too_large(limit: int) -> WalletError:
            return WalletError("too_large", f"{method}: answer over {limit} bytes for {heights}")

        body = await self._fetch(method, params, self._max_body, too_large)
        try:
            answer = await run_sliced(
                self._reactor, rpc_answer(body, ("in", "pool"), self._max_entries)
            )
        except TooManyEntries:
            raise WalletError(
                "too_large", f"{method}: more than {self._max_entries} entries for {heights}"
            ) from None
        except (MalformedJson, WrongShape) as exc:
            # The message is one of jsonslices' own texts: nothing the wallet sent.
            raise WalletError("bad_response", f"{method}: {exc}") from None
        if answer.error is not None:
            self._rpc_error(method, answer.error)
        if not answer.result_ok:
            raise WalletError("bad_response", f"{method}: result is not an object")
        return answer.arrays.get("in", []) + answer.arrays.get("pool", [])

    async def _fetch(
        self,
        method: str,
        params: dict[str, Any] | None,
        limit: int,
        over: Callable[[int], WalletError],
    ) -> bytes:
        """POST one JSON-RPC request; the 200 answer's body, at most ``limit`` bytes (``over``
        makes the error for a longer one)."""
        request = {"jsonrpc": "2.0", "id": "0", "method": method, "params": params or {}}
        payload = json.dumps(request, separators=(",", ":")).encode()
        return await self._serialized(method, payload, limit, over)

    @staticmethod
    def _body_over(method: str) -> Callable[[int], WalletError]:
        def over(limit: int) -> WalletError:
            return WalletError("bad_response", f"{method}: body over {limit} bytes")

        return over

    async def _serialized(
        self, method: str, payload: bytes, limit: int, over: Callable[[int], WalletError]
    ) -> bytes:
        if self._lock is None:
            return await self._authenticated(method, payload, limit, over)
        await self._lock.acquire()
        try:
            return await self._authenticated(method, payload, limit, over)
        finally:
            self._lock.release()

    async def _authenticated(
        self, method: str, payload: bytes, limit: int, over: Callable[[int], WalletError]
    ) -> bytes:
        for attempt in (1, 2):
            response = await self._post(method, payload)
            body = await self._body(method, response, limit, over)
            if response.code != 401:
                if response.code != 200:
                    raise WalletError("http_error", f"{method}: HTTP status {response.code}")
                return body
            values = response.headers.getRawHeaders(b"www-authenticate", [])
            digest = _Digest.choose([v.decode("latin-1") for v in values])
            # A new or stale nonce (epee also issues one per new connection): adopt it; it is
            # valid on this connection even when the login itself was rejected.
            self._digest = digest
            if self._login is None or digest is None or attempt == 2:
                break
            self._log.debug("Wallet sent a new Digest challenge; retrying {method}", method=method)
        raise WalletError("auth", f"{method}: the wallet rejected the RPC login")

    async def _post(self, method: str, payload: bytes) -> Any:
        retried = False
        while True:
            headers = Headers({b"content-type": [b"application/json"]})
            if self._login is not None and self._digest is not None:
                user, password = self._login
                header = self._digest.authorization(user, password, "POST", self._uri)
                headers.setRawHeaders(b"authorization", [header])
            try:
                return await self._http.post(
                    self._url, data=payload, headers=headers, unbuffered=True, allow_redirects=False
                )
            except _NETWORK_ERRORS as exc:
                if _cancelled(exc):
                    raise CancelledError() from None
                if retried or not isinstance(exc, _STALE_CONNECTION):
                    raise WalletError("unreachable", f"{method}: {type(exc).__name__}") from exc
                retried = True
                self._log.debug("Wallet connection was stale; retrying {method}", method=method)

    async def _body(
        self, method: str, response: Any, limit: int, over: Callable[[int], WalletError]
    ) -> bytes:
        # Error bodies are read too: a half-read response pins its connection forever.
        try:
            return await read_capped(response, limit)
        except BodyTooLarge:
            raise over(limit) from None
        except _NETWORK_ERRORS as exc:
            if _cancelled(exc):
                raise CancelledError() from None
            raise WalletError("unreachable", f"{method}: {type(exc).__name__}") from exc

    def _decode(self, method: str, body: bytes) -> dict[str, Any]:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise WalletError("bad_response", f"{method}: body is not JSON") from None
        if not isinstance(document, dict):
            raise WalletError("bad_response", f"{method}: body is not a JSON-RPC object")
        error = document.get("error")
        if error is not None:
            self._rpc_error(method, error)
        result = document.get("result")
        if not isinstance(result, dict):
            raise WalletError("bad_response", f"{method}: result is not an object")
        return result

    def _rpc_error(self, method: str, error: object) -> NoReturn:
        """Raise the rpc_error for the JSON-RPC ``error`` member of an answer."""
        error = error if isinstance(error, dict) else {}
        code = error.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        text = self._clip(str(error.get("message", "")))
        raise WalletError("rpc_error", f"{method}: {text}", code=code)

    def _clip(self, text: str) -> str:
        """Server text fit for a message: the password masked, escaped, at most _CLIP long."""
        if self._login is not None and self._login[1]:
            text = text.replace(self._login[1], "***")
        # Escaped before clipping, so the clip bounds what is shown, escapes included.
        return _printable(text)[:_CLIP]
