"""Async JSON-RPC client for monero-wallet-rpc, on treq, with its own HTTP Digest client.

Every failure reaches callers as one `WalletError` whose `kind` is a small fixed set (usable as a
Prometheus label).  Neither treq nor Twisted has a Digest *client*, and epee's server is strict
about it: the nonce lives on the keep-alive TCP connection and `nc` must equal the server's own
per-nonce counter.  So authenticated calls are serialized behind a lock, over one persistent
connection, and a 401 is answered by taking the new challenge and retrying once.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal
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

# get_transfers of a busy wallet is large, but a body without bound is a memory attack.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
_CLIP = 100  # longest piece of server-provided text that may appear in an error message

WalletErrorKind = Literal[
    "unreachable", "timeout", "http_error", "bad_response", "rpc_error", "auth"
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


class WalletError(Exception):
    """Any failure talking to the wallet.  The message never holds the RPC password, and holds
    at most ~100 characters of anything the server sent."""

    def __init__(self, kind: WalletErrorKind, message: str, code: int | None = None) -> None:
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
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("wallet URL must be http(s)://host:port")
        self._reactor = reactor
        self._url = base_url.rstrip("/") + "/json_rpc"
        self._uri = urlsplit(self._url).path  # what the Digest `uri` field must repeat
        self._login = login
        self._timeout = timeout
        self._max_body = max_body
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
        the call (e.g. at shutdown) raises CancelledError, the only non-WalletError."""
        request = {"jsonrpc": "2.0", "id": "0", "method": method, "params": params or {}}
        payload = json.dumps(request, separators=(",", ":")).encode()
        exchange = Deferred.fromCoroutine(self._serialized(method, payload))
        exchange.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        try:
            body = await exchange
        except (WalletError, CancelledError):
            raise
        except Exception as exc:
            # Callers handle one exception type; an unforeseen one is still logged in full.
            self._log.failure("Unexpected error calling the wallet ({method})", method=method)
            raise WalletError("unreachable", f"{method}: {type(exc).__name__}") from exc
        return self._decode(method, body)

    def _timed_out(self, result: object, timeout: float) -> bytes:
        raise WalletError("timeout", f"no complete answer within {timeout:g} s")

    async def refresh(self) -> dict[str, Any]:
        return await self.call("refresh")

    async def get_height(self) -> int:
        height = (await self.call("get_height")).get("height")
        if not isinstance(height, int) or isinstance(height, bool) or height < 0:
            raise WalletError("bad_response", "get_height: height is not a non-negative integer")
        return height

    async def get_transfers(self, min_height: int, max_height: int) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"in": True, "pool": True, "filter_by_height": True}
        params.update(min_height=min_height, max_height=max_height)
        result = await self.call("get_transfers", params)
        transfers: list[dict[str, Any]] = []
        for key in ("in", "pool"):
            entries = result.get(key, [])
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise WalletError(
                    "bad_response", f"get_transfers: {key!r} is not a list of objects"
                )
            transfers.extend(entries)
        return transfers

    async def _serialized(self, method: str, payload: bytes) -> bytes:
        if self._lock is None:
            return await self._authenticated(method, payload)
        await self._lock.acquire()
        try:
            return await self._authenticated(method, payload)
        finally:
            self._lock.release()

    async def _authenticated(self, method: str, payload: bytes) -> bytes:
        for attempt in (1, 2):
            response = await self._post(method, payload)
            body = await self._body(method, response)
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

    async def _body(self, method: str, response: Any) -> bytes:
        # Error bodies are read too: a half-read response pins its connection forever.
        try:
            return await read_capped(response, self._max_body)
        except BodyTooLarge:
            raise WalletError("bad_response", f"body over {self._max_body} bytes") from None
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
            error = error if isinstance(error, dict) else {}
            code = error.get("code")
            code = code if isinstance(code, int) and not isinstance(code, bool) else None
            text = self._clip(str(error.get("message", "")))
            raise WalletError("rpc_error", f"{method}: {text}", code=code)
        result = document.get("result")
        if not isinstance(result, dict):
            raise WalletError("bad_response", f"{method}: result is not an object")
        return result

    def _clip(self, text: str) -> str:
        if self._login is not None and self._login[1]:
            text = text.replace(self._login[1], "***")
        return text[:_CLIP].encode("ascii", "backslashreplace").decode()
