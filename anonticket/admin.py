"""``anonticket-admin``: the operator's commands (docs/admin.md).

Token commands (show, ledger, revoke, unrevoke) and failed webhook events (list, retry) talk to
the running daemon's internal site, reached by the same endpoint the daemon listens on
(``--internal`` / ``ANONTICKET_INTERNAL``: a loopback ``tcp:``, a ``unix:`` socket, ``ssl:``) or
an ``https://`` URL with a client certificate (mutual TLS).  ``backup`` and ``restore`` work on
the data directory itself (:mod:`anonticket.backup`); ``version`` asks both.

A token is a bearer secret: it is read from the command line or, as ``-``, from standard input
(out of ``ps`` and the shell history), sent only to the internal site, and never printed; output
names a token by its id (the SHA-256 that webhook events carry).  Server text is made printable
before it reaches the terminal.  Exit codes: see EXIT_CODES.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import crypto
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from anonticket import __version__, backup, cli
from anonticket.cli import print_fields, seconds, terminal_text
from anonticket.client import format_xmr
from anonticket.domain import DomainError, ServiceToken
from anonticket.httpbody import BodyTooLarge, BytesProducer, read_capped
from anonticket.web.mtls import endpoint_arguments, parse_ssl

PROG: Final = "anonticket-admin"
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_CODES: Final = """exit codes:
  0  done
  1  the internal site cannot be reached or failed; a file or database error
  2  malformed input or options (checked here before anything is sent)
  3  refused: a check failed (backup/restore: the key does not match the database, the
     target is not empty, the archive is damaged or unsafe; the site refused a change)
  4  not found: the token, or the event (or webhooks are off)"""

DEFAULT_INTERNAL: Final = "tcp:9180:interface=127.0.0.1"  # the daemon's default --internal
INTERNAL_ENV: Final = "ANONTICKET_INTERNAL"
DEFAULT_TIMEOUT: Final = 30.0
MAX_ANSWER: Final = 2 * 1024 * 1024  # a ledger page of 500 entries with memos fits well
MAX_PAGES: Final = 100_000  # --all stops here whatever the site says (a loop guard)
_EVENT_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,100}")
_BUILD_INFO: Final = re.compile(r'^anonticket_build_info\{[^}]*version="([^"\\]*)"', re.MULTILINE)

_TLS_KEYS: Final = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)

Handler = Callable[[Any, argparse.Namespace, TextIO, TextIO], Awaitable[int]]


class AdminError(Exception):
    """A failure shown as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _env(name: str) -> str | None:
    """An ``ANONTICKET_*`` variable as the daemon reads it: trimmed, empty counts as unset."""
    value = os.environ.get(name, "").strip()
    return value or None


# --------------------------------------------------------------------------- the internal site


@dataclass(frozen=True)
class Internal:
    """How the internal site is reached: the endpoint, the base URL requests name (its
    ``Host`` passes the site's check), and how errors name it."""

    endpoint: IStreamClientEndpoint
    url: str
    shown: str


@implementer(IAgentEndpointFactory)
class _Fixed:
    """Every request goes to the one endpoint, whatever the URL says."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self._endpoint


def internal_site(reactor: Any, args: argparse.Namespace) -> Internal:
    """The internal site from ``--internal``: the daemon's own endpoint string (``tcp:``,
    ``tcp6:``, ``unix:``, ``ssl:``) or an ``https://HOST:PORT`` URL."""
    description = (args.internal or DEFAULT_INTERNAL).strip()
    timeout = max(1, math.ceil(args.timeout))
    if description.lower().startswith("https://"):
        try:
            parts = urlsplit(description)
            port = parts.port or 443
        except ValueError:
            raise AdminError("--internal: not an https://HOST:PORT URL", EXIT_USAGE) from None
        host = parts.hostname
        if not host or parts.path.strip("/") or parts.query or parts.username:
            raise AdminError("--internal: expected https://HOST:PORT and nothing else", EXIT_USAGE)
        tls = _tls_options(args, args.server_name or host)
        endpoint = wrapClientTLS(tls, HostnameEndpoint(reactor, host.encode("idna"), port, timeout))
        netloc = f"[{host}]" if ":" in host else host
        return Internal(endpoint, f"https://{netloc}:{port}", f"https://{netloc}:{port}")
    kind = description.partition(":")[0].lower()
    try:
        positional, keywords = endpoint_arguments(description)
    except ValueError as e:
        raise AdminError(f"--internal: {e}", EXIT_USAGE) from None
    if kind == "unix":
        path = keywords.get("address") or (positional[0] if positional else "")
        if not path:
            raise AdminError("--internal: unix: needs the socket's path", EXIT_USAGE)
        endpoint = UNIXClientEndpoint(reactor, path, timeout)
        # Over a unix socket the site needs no Host; "localhost" is one it takes anyway.
        return Internal(endpoint, "http://localhost", f"unix:{path}")
    if kind in ("tcp", "tcp6", "ssl"):
        if kind == "ssl":
            try:
                spec = parse_ssl(description)
            except ValueError as e:
                raise AdminError(f"--internal: {e}", EXIT_USAGE) from None
            assert spec is not None
            port, host = spec.port, spec.interface or "127.0.0.1"
        else:
            port_text = keywords.get("port") or (positional[0] if positional else "")
            host = keywords.get("interface", "")
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise AdminError(
                    "--internal: give the port the daemon listens on (tcp:PORT:interface=...)",
                    EXIT_USAGE,
                )
            if not host:
                raise AdminError("--internal: tcp: needs interface= (the daemon's)", EXIT_USAGE)
            port = int(port_text)
        if port == 0:
            raise AdminError("--internal: port 0 is any free port: give the actual one", EXIT_USAGE)
        host = host.strip("[]")
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tcp: IStreamClientEndpoint = (
            TCP6ClientEndpoint(reactor, host, port, timeout)
            if ":" in host
            else TCP4ClientEndpoint(reactor, host, port, timeout)
        )
        if kind == "ssl":
            tls = _tls_options(args, args.server_name or host)
            return Internal(wrapClientTLS(tls, tcp), f"https://{netloc}", f"https://{netloc}")
        return Internal(tcp, f"http://{netloc}", f"http://{netloc}")
    raise AdminError(
        "--internal: expected the daemon's endpoint (tcp:PORT:interface=127.0.0.1, "
        "unix:PATH, ssl:...) or https://HOST:PORT",
        EXIT_USAGE,
    )


def _read(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise AdminError(f"{option}: cannot read {path}: {e.strerror}", EXIT_USAGE) from None


def _tls_options(args: argparse.Namespace, server_name: str) -> Any:
    """Client TLS options: the site's certificate checked against ``--ca-cert`` for
    ``server_name``, and ours from ``--client-cert``/``--client-key`` if given."""
    if not args.ca_cert:
        raise AdminError(
            "--ca-cert FILE is needed to check the internal site's certificate (the CA that "
            "signed it)",
            EXIT_USAGE,
        )
    try:
        cas = x509.load_pem_x509_certificates(_read("--ca-cert", args.ca_cert))
    except ValueError:
        raise AdminError(f"--ca-cert: no PEM certificate in {args.ca_cert}", EXIT_USAGE) from None
    trust = trustRootFromCertificates(
        [
            Certificate.load(c.public_bytes(serialization.Encoding.DER), crypto.FILETYPE_ASN1)
            for c in cas
        ]
    )
    own = None
    if bool(args.client_cert) != bool(args.client_key):
        raise AdminError("--client-cert and --client-key go together", EXIT_USAGE)
    if args.client_cert:
        try:
            cert = x509.load_pem_x509_certificate(_read("--client-cert", args.client_cert))
        except ValueError:
            message = f"--client-cert: no PEM certificate in {args.client_cert}"
            raise AdminError(message, EXIT_USAGE) from None
        try:
            # Read here with no passphrase: pyOpenSSL's loader would ask on the terminal.
            key = serialization.load_pem_private_key(
                _read("--client-key", args.client_key), password=None
            )
        except (ValueError, TypeError):
            message = f"--client-key: not an unencrypted PEM private key: {args.client_key}"
            raise AdminError(message, EXIT_USAGE) from None
        if not isinstance(key, _TLS_KEYS):
            raise AdminError(f"--client-key: not a key TLS takes: {args.client_key}", EXIT_USAGE)
        own = PrivateCertificate.fromCertificateAndKeyPair(
            Certificate.load(cert.public_bytes(serialization.Encoding.DER), crypto.FILETYPE_ASN1),
            KeyPair(crypto.PKey.from_cryptography_key(key)),
        )
    return optionsForClientTLS(server_name, trustRoot=trust, clientCertificate=own)


def _network_error(exc: BaseException) -> str:
    # Agent wraps the cause in ResponseNeverReceived/ResponseFailed([Failure, ...]).
    reasons = getattr(exc, "reasons", None)
    if reasons and isinstance(reasons[0], Failure) and reasons[0].value is not None:
        exc = reasons[0].value
    return terminal_text(str(exc).strip() or type(exc).__name__)


async def request(
    reactor: Any,
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> tuple[int, bytes]:
    """One exchange with the internal site: the status and the body (capped), within
    ``--timeout`` for all of it."""
    site = internal_site(reactor, args)
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(
        Agent.usingEndpointFactory(reactor, _Fixed(site.endpoint), pool=pool),
        data_to_body_producer=BytesProducer,
    )
    headers = Headers({b"Accept": [b"application/json"]})
    payload = None
    if body is not None:
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
        payload = json.dumps(body).encode("utf-8")

    async def exchange() -> tuple[int, bytes]:
        response = await client.request(
            method, site.url + path, data=payload, headers=headers, unbuffered=True
        )
        try:
            return response.code, await read_capped(response, MAX_ANSWER)
        except BodyTooLarge:
            raise AdminError(f"the internal site's answer exceeds {MAX_ANSWER} bytes") from None

    def timed_out(result: object, timeout: float) -> NoReturn:
        raise AdminError(f"no complete answer from {site.shown} within {timeout:g} s")

    d = Deferred.fromCoroutine(exchange())
    d.addTimeout(args.timeout, reactor, onTimeoutCancel=timed_out)
    try:
        return await d
    except AdminError:
        raise
    except Exception as exc:
        message = f"cannot reach the internal site {site.shown}: {_network_error(exc)}"
        raise AdminError(message) from None
    finally:
        await pool.closeCachedConnections()


async def call(
    reactor: Any,
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON exchange that must succeed: the object answered, or the site's refusal as an
    AdminError with its exit code."""
    code, raw = await request(reactor, args, method, path, body)
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise AdminError(f"the internal site answered HTTP {code} without a JSON object")
    if 200 <= code < 300:
        return answer
    message = terminal_text(answer.get("error", "(no message)"))
    error_code = answer.get("code")
    text = f"{message} ({terminal_text(error_code)})" if isinstance(error_code, str) else message
    if code == 400:
        raise AdminError(text, EXIT_USAGE)
    if code == 404:
        raise AdminError(text, EXIT_NOT_FOUND)
    if code in (409, 412, 422):
        raise AdminError(text, EXIT_REFUSED)
    raise AdminError(f"the internal site answered HTTP {code}: {text}")


# --------------------------------------------------------------------------- output


def _json(out: TextIO, value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True), file=out)


def _amount(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return terminal_text(value)
    return format_xmr(value)


def _text(value: object) -> str:
    return "-" if value is None else terminal_text(value)


def _token_fields(view: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("status", _text(view.get("status"))),
        ("balance", _amount(view.get("balance"))),
        ("credited", _amount(view.get("credited"))),
        ("spent", _amount(view.get("spent"))),
        ("reversed", _amount(view.get("reversed"))),
        ("version", _text(view.get("version"))),
        ("issued at", _text(view.get("issued_at"))),
        ("revoked at", _text(view.get("revoked_at"))),
        ("revoke reason", _text(view.get("revoke_reason"))),
        ("abuse score", _text(view.get("abuse_score"))),
    ]


def _ledger_lines(out: TextIO, entries: list[Any]) -> None:
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        line = f"  {_text(entry.get('at'))}  {_text(entry.get('kind')):<12}"
        line += f"{_text(entry.get('amount')):>20}"
        if entry.get("spend_id") is not None:
            line += f"  {terminal_text(entry['spend_id'])}"
            if entry.get("memo") is not None:
                line += f"  {terminal_text(entry['memo'], 200)}"
        print(line, file=out)


def _revocation_lines(out: TextIO, past: list[Any]) -> None:
    for entry in past:
        if isinstance(entry, dict):
            print(
                f"  revoked {_text(entry.get('revoked_at'))} ({_text(entry.get('revoke_reason'))})"
                f", undone {_text(entry.get('unrevoked_at'))} "
                f"({_text(entry.get('unrevoke_reason'))})",
                file=out,
            )


# --------------------------------------------------------------------------- token commands


def _token(args: argparse.Namespace, stdin: TextIO) -> ServiceToken:
    text = args.token
    if text == "-":
        text = stdin.readline().strip()
    try:
        return ServiceToken.parse(text)
    except DomainError as e:
        # The message never repeats the input: a near-miss token is still nearly a secret.
        raise AdminError(e.message, EXIT_USAGE) from None


def token_id(token: ServiceToken) -> str:
    """What webhook events name the token by (SHA-256 of its bytes): printable, not usable."""
    return hashlib.sha256(token.raw).hexdigest()


async def _all_pages(
    reactor: Any,
    args: argparse.Namespace,
    path: str,
    key: str,
    cursor: str,
    limit: int,
    start: str | None,
    every: bool,
) -> tuple[list[Any], str | None]:
    """Items of one page, or (``every``) of every page from ``start`` on; and the next cursor."""
    items: list[Any] = []
    after = start
    for _ in range(MAX_PAGES):
        query = f"?limit={limit}" + (f"&{cursor}={quote(after)}" if after else "")
        page = await call(reactor, args, "GET", path + query)
        found = page.get(key)
        if not isinstance(found, list):
            raise AdminError("unexpected answer from the internal site")
        items += found
        following = page.get("next")
        after = following if isinstance(following, str) and following.isdigit() else None
        if not every or after is None:
            break
    return items, after


async def _show(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    token = _token(args, args.stdin)
    base = f"/api/v1/token/{token.hex}"
    view = await call(reactor, args, "GET", base)
    past, _ = await _all_pages(
        reactor, args, base + "/revocations", "revocations", "before", 500, None, True
    )
    entries, following = await _all_pages(
        reactor, args, base + "/ledger", "entries", "before", args.limit, None, False
    )
    if args.json:
        _json(
            out,
            {
                "token_id": token_id(token),
                "token": view,
                "revocations": past,
                "ledger": {"entries": entries, "next": following},
            },
        )
        return EXIT_OK
    print_fields(out, [("token id", token_id(token)), *_token_fields(view)])
    if past:
        print("revocations undone (newest first):", file=out)
        _revocation_lines(out, past)
    more = f"; more with: {PROG} ledger - --before {following}" if following else ""
    print(f"ledger (newest first, {len(entries)} shown{more}):", file=out)
    _ledger_lines(out, entries)
    return EXIT_OK


async def _ledger(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    token = _token(args, args.stdin)
    entries, following = await _all_pages(
        reactor,
        args,
        f"/api/v1/token/{token.hex}/ledger",
        "entries",
        "before",
        args.limit,
        args.before,
        args.all,
    )
    if args.json:
        _json(out, {"entries": entries, "next": following})
        return EXIT_OK
    _ledger_lines(out, entries)
    if following:
        print(f"(more: --before {following})", file=err)
    return EXIT_OK


def _change_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"reason": args.reason}
    if args.abuse_score is not None:
        body["abuse_score"] = args.abuse_score
    return body


async def _revoke(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return await _change(reactor, args, out, "revoke")


async def _unrevoke(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not args.reason.strip():
        raise AdminError("--reason: say why the revocation is undone", EXIT_USAGE)
    return await _change(reactor, args, out, "unrevoke")


async def _change(reactor: Any, args: argparse.Namespace, out: TextIO, action: str) -> int:
    token = _token(args, args.stdin)
    base = f"/api/v1/token/{token.hex}"
    # Read first, to say whether this call changed anything (the route answers the same view
    # either way: asking twice is safe).
    before = await call(reactor, args, "GET", base)
    after = await call(reactor, args, "POST", f"{base}/{action}", _change_body(args))
    changed = before.get("version") != after.get("version")
    if args.json:
        _json(out, {"token_id": token_id(token), "changed": changed, "token": after})
        return EXIT_OK
    if action == "revoke":
        outcome = "revoked" if changed else "already revoked: the first revocation stands"
    else:
        outcome = "revocation undone" if changed else "not revoked: nothing changed"
    print_fields(out, [("token id", token_id(token)), ("outcome", outcome), *_token_fields(after)])
    return EXIT_OK


# --------------------------------------------------------------------------- webhooks


async def _failed(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    events, following = await _all_pages(
        reactor,
        args,
        "/api/v1/webhooks/failed",
        "events",
        "after",
        args.limit,
        args.after,
        args.all,
    )
    if args.json:
        _json(out, {"events": events, "next": following})
        return EXIT_OK
    if not events:
        print("no failed events", file=out)
    for event in events:
        if isinstance(event, dict):
            print(
                f"{_text(event.get('id'))}  {_text(event.get('type')):<18}"
                f"{_text(event.get('created_at'))}  attempts {_text(event.get('attempts'))}  "
                f"{_text(event.get('last_error'))}",
                file=out,
            )
    if following:
        print(f"(more: --after {following}, or --all)", file=err)
    return EXIT_OK


async def _retry(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.all == bool(args.ids):
        raise AdminError("give event ids (from 'webhooks failed') or --all", EXIT_USAGE)
    if args.all:
        answer = await call(reactor, args, "POST", "/api/v1/webhooks/failed/retry")
        retried = answer.get("retried")
        missing: list[str] = []
    else:
        retried, missing = 0, []
        for event_id in args.ids:
            if not _EVENT_ID.fullmatch(event_id):
                raise AdminError(f"not an event id: {terminal_text(event_id, 110)!r}", EXIT_USAGE)
        for event_id in args.ids:
            try:
                answer = await call(
                    reactor, args, "POST", f"/api/v1/webhooks/failed/{event_id}/retry"
                )
            except AdminError as e:
                if e.exit_code != EXIT_NOT_FOUND or "webhooks_disabled" in str(e):
                    raise
                missing.append(event_id)
                continue
            retried += int(answer.get("retried", 0))
    if args.json:
        _json(out, {"retried": retried, "not_found": missing})
    else:
        print(f"retried: {_text(retried)} (due again now, with a fresh retry schedule)", file=out)
        for event_id in missing:
            print(f"not a failed event: {event_id}", file=err)
    return EXIT_NOT_FOUND if missing else EXIT_OK


# --------------------------------------------------------------------------- version


async def _version(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    mine = {"version": __version__, "schema": backup.known_schema()}
    daemon: dict[str, Any] = {}
    problem: AdminError | None = None
    try:
        code, raw = await request(reactor, args, "GET", "/metrics")
        found = _BUILD_INFO.search(raw.decode("utf-8", "replace")) if code == 200 else None
        if found is None:
            raise AdminError(f"the internal site's /metrics (HTTP {code}) names no version")
        daemon["version"] = terminal_text(found.group(1), 60)
    except AdminError as e:
        problem = e
    if args.json:
        _json(out, {"admin": mine, "daemon": daemon or None})
    else:
        print_fields(
            out,
            [
                (PROG, f"{__version__} (knows schemas up to {mine['schema']})"),
                ("daemon", daemon.get("version", "-")),
            ],
        )
    if problem is not None:
        raise problem
    return EXIT_OK


# --------------------------------------------------------------------------- backup, restore


async def _in_thread(reactor: Any, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    # Files and SQLite block: off the reactor thread (a daemon in the same process, as in the
    # tests, keeps serving meanwhile).
    return await deferToThreadPool(reactor, reactor.getThreadPool(), fn, *a, **kw)


def _database(args: argparse.Namespace, data_dir: Path) -> str:
    return args.database or f"sqlite:///{data_dir / backup.DEFAULT_DATABASE_FILE}"


async def _backup(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    data_dir = Path(args.data_dir)
    database = _database(args, data_dir)
    result: backup.BackupResult = await _in_thread(
        reactor, backup.backup, data_dir, database, Path(args.archive)
    )
    manifest = result.manifest
    size = result.archive.stat().st_size
    hint = None
    if manifest["database"] == "postgresql":
        hint = (
            "the database is not in the archive: dump it now with "
            f"pg_dump --format=custom --file={result.archive.stem}.pgdump "
            f"'{backup.redacted(database)}' and keep the two together"
        )
    if args.json:
        _json(
            out,
            {
                "archive": str(result.archive),
                "size": size,
                "manifest": manifest,
                "onion_address": result.onion_address,
                "pg_dump": hint,
            },
        )
    else:
        database_text = (
            f"SQLite snapshot, schema {manifest['schema']}"
            if manifest["database"] == "sqlite"
            else f"PostgreSQL at schema {manifest['schema']}: keys only"
        )
        print_fields(
            out,
            [
                ("archive", f"{result.archive} (mode 0600, {size} bytes)"),
                ("database", database_text),
                ("files", ", ".join(sorted(manifest["files"]))),
                ("onion address", result.onion_address or "- (no onion.key)"),
                ("made", f"{manifest['created_at']} by anonticket {manifest['anonticket']}"),
            ],
        )
    if hint is not None:
        print(f"{PROG}: {hint}", file=err)
    print(
        f"{PROG}: the archive holds secret.key: whoever has it and the database can test "
        "guesses against every tag; keep it offline and owner-only",
        file=err,
    )
    return EXIT_OK


async def _restore(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    archive = Path(args.archive)
    with contextlib.suppress(OSError):
        if stat.S_IMODE(archive.stat().st_mode) & 0o077:
            print(
                f"{PROG}: warning: {archive} is readable by other users: the keys in it may "
                "have been copied",
                file=err,
            )
    result: backup.RestoreResult = await _in_thread(
        reactor, backup.restore, archive, Path(args.data_dir), args.database
    )
    manifest = result.manifest
    if args.json:
        _json(
            out,
            {
                "data_dir": str(result.data_dir),
                "database": result.database,
                "database_path": None
                if result.database_path is None
                else str(result.database_path),
                "files": result.files,
                "manifest": manifest,
                "onion_address": result.onion_address,
            },
        )
    else:
        where = f" into {result.database_path}" if result.database_path is not None else ""
        print_fields(
            out,
            [
                ("restored into", str(result.data_dir)),
                ("database", f"{result.database}, schema {manifest['schema']}{where}"),
                ("backed up", f"{manifest['created_at']} by anonticket {manifest['anonticket']}"),
                ("key check", "secret.key is the key the database was written with"),
                ("files", ", ".join(result.files)),
                ("onion address", result.onion_address or "- (none in the backup)"),
            ],
        )
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        print(
            f"{PROG}: restored as root: give the files to the daemon's user before it starts "
            f"(chown -R anonticket: {result.data_dir})",
            file=err,
        )
    return EXIT_OK


# --------------------------------------------------------------------------- command line


def _page(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 500:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 500")
    return int(text)


def _cursor(text: str) -> str:
    if not text.isdigit() or len(text) > 19:
        raise argparse.ArgumentTypeError("must be the 'next' value a previous page gave")
    return text


def _score(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if not -32768 <= value <= 32767:
        raise argparse.ArgumentTypeError("must be from -32768 to 32767")
    return value


def build_parser() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    site = argparse.ArgumentParser(add_help=False)
    site.add_argument(
        "--internal",
        default=_env(INTERNAL_ENV),
        metavar="ENDPOINT",
        help="the daemon's internal site: its --internal endpoint (tcp:PORT:interface=ADDR, "
        f"unix:PATH, ssl:...) or https://HOST:PORT (default: ${INTERNAL_ENV}, else "
        f"{DEFAULT_INTERNAL})",
    )
    site.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on an answer after this long (default {DEFAULT_TIMEOUT:g})",
    )
    site.add_argument("--ca-cert", metavar="FILE", help="TLS: the CA of the site's certificate")
    site.add_argument("--client-cert", metavar="FILE", help="TLS: this tool's certificate")
    site.add_argument("--client-key", metavar="FILE", help="TLS: its unencrypted key")
    site.add_argument(
        "--server-name", metavar="NAME", help="TLS: the name the site's certificate must carry"
    )
    token = argparse.ArgumentParser(add_help=False)
    token.add_argument(
        "token", help="the 64-hex service token, or - to read it from standard input"
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operator commands for a running anonticket daemon (over its internal "
        "site) and for its data directory (backup, restore).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser(
        "show",
        parents=[output, site, token],
        help="a token: status, balance, totals, revocations undone, its latest ledger entries",
    )
    show.add_argument("--limit", type=_page, default=20, help="ledger entries shown (default 20)")
    show.set_defaults(handler=_show)

    ledger = commands.add_parser(
        "ledger", parents=[output, site, token], help="a token's ledger, newest first"
    )
    ledger.add_argument("--limit", type=_page, default=50, help="entries a page (default 50)")
    ledger.add_argument("--before", type=_cursor, help="the page after this 'next' value")
    ledger.add_argument("--all", action="store_true", help="every page")
    ledger.set_defaults(handler=_ledger)

    revoke = commands.add_parser(
        "revoke",
        parents=[output, site, token],
        help="revoke a token (both sites answer 'revoked'; spends are refused)",
    )
    revoke.add_argument("--reason", help="why (kept with the revocation)")
    revoke.add_argument("--abuse-score", type=_score, help="a score kept with the token")
    revoke.set_defaults(handler=_revoke)

    unrevoke = commands.add_parser(
        "unrevoke",
        parents=[output, site, token],
        help="undo a token's revocation (the revocation is kept in its history)",
    )
    unrevoke.add_argument("--reason", required=True, help="why it is undone (required)")
    unrevoke.add_argument("--abuse-score", type=_score, help="a new score for the token")
    unrevoke.set_defaults(handler=_unrevoke)

    webhooks = commands.add_parser("webhooks", help="events whose delivery failed")
    actions = webhooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    failed = actions.add_parser(
        "failed", parents=[output, site], help="list events whose retries are used up"
    )
    failed.add_argument("--limit", type=_page, default=50, help="events a page (default 50)")
    failed.add_argument("--after", type=_cursor, help="the page after this 'next' value")
    failed.add_argument("--all", action="store_true", help="every page")
    failed.set_defaults(handler=_failed)
    retry = actions.add_parser(
        "retry", parents=[output, site], help="deliver failed events again, now"
    )
    retry.add_argument("ids", nargs="*", metavar="ID", help="event ids (webhook-id)")
    retry.add_argument("--all", action="store_true", help="every failed event")
    retry.set_defaults(handler=_retry)

    version = commands.add_parser(
        "version", parents=[output, site], help="this tool's version and the running daemon's"
    )
    version.set_defaults(handler=_version)

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--database",
        default=_env("ANONTICKET_DATABASE"),
        metavar="URL",
        help="the daemon's --database (default: $ANONTICKET_DATABASE, else "
        "sqlite:///<data-dir>/anonticket.sqlite3)",
    )
    make = commands.add_parser(
        "backup",
        parents=[output, data],
        help="one owner-only archive of the database and the keys, while the daemon runs",
    )
    make.add_argument(
        "--data-dir",
        default=_env("ANONTICKET_DATA_DIR") or "./anonticket-data",
        help="the daemon's --data-dir (default: $ANONTICKET_DATA_DIR, else ./anonticket-data)",
    )
    make.add_argument("archive", metavar="OUT.tar", help="the archive to write (must not exist)")
    make.set_defaults(handler=_backup)
    restore = commands.add_parser(
        "restore",
        parents=[output],
        help="restore an archive into a new data directory, after checking it",
    )
    restore.add_argument("archive", metavar="ARCHIVE.tar")
    restore.add_argument(
        "--data-dir", required=True, help="the new data directory (missing or empty)"
    )
    restore.add_argument(
        "--database",
        metavar="URL",
        help="SQLite: where the database goes (default <data-dir>/anonticket.sqlite3); "
        "PostgreSQL: the database restored with pg_restore, checked against the key",
    )
    restore.set_defaults(handler=_restore)
    return parser


async def run(
    reactor: Any,
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    stdin: TextIO | None = None,
) -> int:
    """The whole command: parse ``argv``, act, print, and return the exit code."""
    args = cli.parse_arguments(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):  # --help, or a usage error argparse has already printed
        return args
    args.stdin = sys.stdin if stdin is None else stdin
    handler: Handler = args.handler
    try:
        return await handler(reactor, args, stdout, stderr)
    except AdminError as exc:
        message, code = str(exc), exc.exit_code
    except BrokenPipeError:  # the reader went away (| head): nothing left to tell
        return EXIT_ERROR
    except backup.BackupError as exc:
        message, code = str(exc), EXIT_REFUSED if exc.refused else EXIT_ERROR
    except Exception as exc:  # one line, never a traceback
        message, code = f"unexpected {type(exc).__name__}: {terminal_text(exc)}", EXIT_ERROR
    print(f"{PROG}: error: {message}", file=stderr)
    return code


def main(argv: Sequence[str] | None = None) -> NoReturn:
    cli.main(run, argv)


if __name__ == "__main__":
    main()
