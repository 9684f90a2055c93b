"""``anonticket-client``: make a payment ID and its integrated address, redeem it, check a token.

The PID is drawn and parsed on this machine, so a malformed one never leaves it.  The server is
treated as untrusted: every exchange has one deadline covering connect, headers and body, bodies
are read with a size cap, and only checked fields are printed (server text is made printable).
Exit codes: see EXIT_CODES (a server's HTTP 400 maps to 2, like our own input checks).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO
from urllib.parse import urlsplit

import nacl.utils
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from anonticket import __version__, cli
from anonticket.address import NETWORK_BYTES, AddressError, make_integrated_address, parse_address
from anonticket.cli import print_fields, seconds, terminal_text
from anonticket.domain import DomainError, PaymentId, ServiceToken
from anonticket.httpbody import BodyTooLarge, BytesProducer, read_capped
from anonticket.passes.client import (
    PassError,
    PassStore,
    blind,
    choose_token_key,
    finish,
    token_challenge,
)
from anonticket.passes.wire import b64url, from_b64url

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_PENDING: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_REVOKED: Final = 5
EXIT_SUSPENDED: Final = 6

PROG: Final = "anonticket-client"
DIRECTORY: Final = "/.well-known/private-token-issuer-directory"
MAX_RESPONSE: Final = 64 * 1024
DEFAULT_TIMEOUT: Final = 60.0  # Tor circuits to an onion service are slow to build
ATOMIC_PER_XMR: Final = 10**12
SOCKS_ENV: Final = "ANONTICKET_SOCKS"
ONION_NEEDS_SOCKS: Final = (
    "reaching .onion addresses needs Tor: run a local tor and pass --socks tcp:127.0.0.1:9050 "
    f"(or set {SOCKS_ENV})"
)
EXIT_CODES: Final = """exit codes:
  0  done; the token is active
  1  network, timeout or server error
  2  malformed input (payment id, token, address, options)
  3  payment seen but not confirmed enough yet: retry later
  4  payment or token not found
  5  the token is revoked
  6  the token is suspended: a payment credited to it was taken back by the chain"""
PID_IS_SECRET: Final = (
    "keep the payment id secret until you have redeemed it: whoever knows it can claim the payment"
)

Handler = Callable[[Any, argparse.Namespace, TextIO, TextIO], Awaitable[int]]


class ClientError(Exception):
    """A failure shown as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def format_xmr(atomic: int) -> str:
    sign = "-" if atomic < 0 else ""
    whole, frac = divmod(abs(atomic), ATOMIC_PER_XMR)  # integers only: no float rounding
    return f"{atomic} atomic units ({sign}{whole}.{frac:012d} XMR)"


# --------------------------------------------------------------------------- new


def new_payment_id() -> PaymentId:
    while True:
        raw = nacl.utils.random(8)
        if any(raw):  # all-zero means "no payment id" to wallets and is never redeemable
            return PaymentId(raw)


async def _new(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        address = parse_address(args.address)
    except AddressError as exc:
        raise ClientError(f"not a Monero address: {terminal_text(exc)}", EXIT_USAGE) from None
    if address.kind == "subaddress":
        raise ClientError(
            "this is a subaddress; integrated addresses are built from the wallet's standard "
            "(primary) address",
            EXIT_USAGE,
        )
    if address.kind == "integrated":
        raise ClientError(
            "this is already an integrated address; give the standard (primary) address",
            EXIT_USAGE,
        )
    # Regtest uses mainnet prefixes, so a mainnet address is never refused unless asked to.
    if args.network is not None and address.network != args.network:
        raise ClientError(
            f"this is a {address.network} address, but --network {args.network} was given",
            EXIT_USAGE,
        )
    pid = new_payment_id()
    integrated = make_integrated_address(args.address, pid.raw)
    if args.json:
        print(json.dumps({"pid": pid.hex, "integrated_address": integrated}), file=out)
    else:
        print_fields(out, [("payment id", pid.hex), ("integrated address", integrated)])
        print(PID_IS_SECRET, file=err)
    return EXIT_OK


# --------------------------------------------------------------------------- HTTP


def make_agent(reactor: Any, args: argparse.Namespace) -> IAgent:
    """The one place that decides how the server is reached: through Tor, or directly."""
    if args.socks:
        return TorAgent(reactor, args.socks)
    if onion_host(args.url):
        raise ClientError(ONION_NEEDS_SOCKS)
    # Agent's default pool is not persistent: nothing lingers after the one exchange.
    return Agent(reactor, connectTimeout=args.timeout)


@implementer(IStreamClientEndpoint)
class _SocksPort:
    """The endpoint of tor's SOCKS port.  It keeps the connections it made, because txtorcon
    cannot cancel a SOCKS handshake (tor holds one open while it builds an onion circuit), so
    at the deadline we hang up ourselves; and it names the proxy when the proxy is the problem."""

    def __init__(self, endpoint: IStreamClientEndpoint, description: str) -> None:
        self._endpoint = endpoint
        self._description = description
        self._protocols: list[IProtocol] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def made(protocol: IProtocol) -> IProtocol:
            self._protocols.append(protocol)
            return protocol

        def failed(reason: Failure) -> NoReturn:
            reason.trap(ConnectError)
            where = terminal_text(self._description)
            message = terminal_text(reason.getErrorMessage())
            raise ClientError(f"cannot reach the Tor SOCKS port {where}: {message}")

        return self._endpoint.connect(factory).addCallbacks(made, failed)

    def hang_up(self) -> None:
        for protocol in self._protocols:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()


@implementer(IAgent)
class TorAgent:
    """Sends every request through a Tor SOCKS port.  txtorcon passes the hostname to tor,
    which resolves it: a .onion has to be, and no DNS query about the server leaves here."""

    def __init__(self, reactor: Any, socks: str) -> None:
        from txtorcon.web import tor_agent  # here: `new` should not pay for importing txtorcon

        try:
            endpoint = clientFromString(reactor, socks)
        except (ValueError, TypeError) as exc:
            raise ClientError(
                f"--socks: not a client endpoint like tcp:127.0.0.1:9050 ({terminal_text(exc)})",
                EXIT_USAGE,
            ) from None
        self.socks = socks
        self._port = _SocksPort(endpoint, socks)
        # No pool given: Agent's default one is not persistent, as in the direct case.
        self._agent: IAgent = tor_agent(reactor, self._port)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        return self._agent.request(method, uri, headers, bodyProducer)

    def hang_up(self) -> None:
        self._port.hang_up()


async def _exchange(
    client: HTTPClient,
    method: str,
    url: str,
    payload: bytes | None,
    extra: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    headers = Headers({b"Accept": [b"application/json"]})
    if payload is not None:
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
    for name, value in (extra or {}).items():
        headers.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
    # No redirects: the answer must come from the server the user named.  Unbuffered: treq's
    # buffering would read the whole body without any cap.
    response = await client.request(
        method, url, data=payload, headers=headers, allow_redirects=False, unbuffered=True
    )
    try:
        return response.code, await read_capped(response, MAX_RESPONSE)
    except BodyTooLarge:
        limit = MAX_RESPONSE // 1024
        raise ClientError(f"the server's answer exceeds {limit} KiB; gave up") from None


def _network_error_text(exc: BaseException) -> str:
    # Agent wraps the real cause in ResponseNeverReceived/ResponseFailed([Failure, ...]).
    reasons = getattr(exc, "reasons", None)
    if reasons and isinstance(reasons[0], Failure) and reasons[0].value is not None:
        exc = reasons[0].value
    return terminal_text(str(exc).strip() or type(exc).__name__)


async def fetch(
    reactor: Any,
    args: argparse.Namespace,
    method: str,
    path: str,
    payload: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, Any]]:
    """One HTTP exchange: the status, the body text and the JSON object in it."""
    agent = make_agent(reactor, args)
    client = HTTPClient(agent, data_to_body_producer=BytesProducer)
    exchange = Deferred.fromCoroutine(_exchange(client, method, args.url + path, payload, headers))

    def timed_out(result: object, timeout: float) -> NoReturn:
        # Whatever the cancelled exchange reports (a cancelled connect, a dropped body), the
        # cause was the deadline.
        raise ClientError(f"no complete answer from {args.url} within {timeout:g} s")

    # treq's own timeout= stops at the headers; this deadline also covers reading the body.
    exchange.addTimeout(args.timeout, reactor, onTimeoutCancel=timed_out)
    try:
        code, raw = await exchange
    except Exception as exc:
        if isinstance(agent, TorAgent):
            agent.hang_up()  # a SOCKS handshake cut short by the deadline is still open
        if isinstance(exc, ClientError):
            raise
        via = f" through {terminal_text(args.socks)}" if args.socks else ""
        raise ClientError(f"cannot reach {args.url}{via}: {_network_error_text(exc)}") from None
    try:
        text = raw.decode("utf-8")
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise ClientError(f"the server answered HTTP {code} without a JSON object")
    return code, text.strip(), body


def _refusal(code: int, body: dict[str, Any]) -> ClientError:
    error = body.get("error")
    message = terminal_text(error) if isinstance(error, str) else "(no message)"
    if code == 400:
        return ClientError(message, EXIT_USAGE)
    if code == 404:
        return ClientError(message, EXIT_NOT_FOUND)
    return ClientError(f"the server answered HTTP {code}: {message}")


def _unexpected(code: int) -> ClientError:
    return ClientError(f"unexpected answer from the server (HTTP {code})")


def _count(body: dict[str, Any], name: str, code: int) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _unexpected(code)
    return value


def _text(body: dict[str, Any], name: str, code: int, optional: bool = False) -> str:
    value = body.get(name)
    if value is None and optional:
        return "-"
    if not isinstance(value, str):
        raise _unexpected(code)
    return terminal_text(value)


def _redeem_outcome(code: int, body: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    status = body.get("status")
    if code == 200 and status in ("success", "already_claimed"):
        try:
            token = ServiceToken.parse(body.get("service_token"))
        except DomainError:
            raise _unexpected(code) from None
        balance = format_xmr(_balance(body, code))
        # An older server sends no token_status: its tokens were active or revoked unseen.
        token_status = body.get("token_status", "active")
        if token_status not in _TOKEN_EXIT:
            raise _unexpected(code)
        return _TOKEN_EXIT[token_status], [
            ("status", str(status)),
            ("service token", token.hex),
            ("balance", balance),
            ("token status", token_status),
        ]
    if code == 202 and status == "pending":
        have, need = _count(body, "confirmations", code), _count(body, "required", code)
        return EXIT_PENDING, [("pending", f"{have} of {need} confirmations")]
    if 200 <= code < 300:
        raise _unexpected(code)
    raise _refusal(code, body)


_TOKEN_EXIT: Final = {"active": EXIT_OK, "revoked": EXIT_REVOKED, "suspended": EXIT_SUSPENDED}


def _balance(body: dict[str, Any], code: int) -> int:
    """A balance: below zero only when a reversal took back money that had been spent."""
    value = body.get("balance")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _unexpected(code)
    return value


def _status_outcome(code: int, body: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    status = body.get("status")
    if code != 200 or status not in _TOKEN_EXIT:
        raise _refusal(code, body) if code >= 300 else _unexpected(code)
    fields = [
        ("status", str(status)),
        ("balance", format_xmr(_balance(body, code))),
        ("issued at", _text(body, "issued_at", code)),
        ("revoked at", _text(body, "revoked_at", code, optional=True)),
    ]
    return _TOKEN_EXIT[status], fields


def _report(
    args: argparse.Namespace,
    out: TextIO,
    answer: tuple[int, str, dict[str, Any]],
    outcome: Callable[[int, dict[str, Any]], tuple[int, list[tuple[str, str]]]],
) -> int:
    code, text, body = answer
    if not args.json:
        exit_code, fields = outcome(code, body)
        print_fields(out, fields)
        return exit_code
    # JSON mode: the server's object as sent, nothing else; the exit code still tells the story.
    print(text, file=out)
    try:
        return outcome(code, body)[0]
    except ClientError as exc:
        return exc.exit_code


async def _redeem(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    pid = PaymentId.parse(args.pid)
    payload = json.dumps({"pid": pid.hex}).encode()
    answer = await fetch(reactor, args, "POST", "/api/v1/redeem", payload)
    return _report(args, out, answer, _redeem_outcome)


async def _status(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    token = ServiceToken.parse(args.token)
    answer = await fetch(reactor, args, "GET", f"/api/v1/token/{token.hex}")
    return _report(args, out, answer, _status_outcome)


DEFAULT_STORE: Final = "~/.local/share/anonticket/passes.json"
PASSES_PER_REQUEST: Final = 100  # the issuer's --pass-batch-max default


async def _passes_buy(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    token = ServiceToken.parse(args.token)
    code, _, directory = await fetch(reactor, args, "GET", DIRECTORY)
    if code != 200:
        raise _refusal(code, directory)
    try:
        public_key = choose_token_key(directory, time.time())
    except PassError as e:
        raise ClientError(str(e)) from None
    host = urlsplit(args.url).hostname or ""
    challenge = from_b64url(args.challenge) if args.challenge else token_challenge(host)
    store = PassStore(Path(os.path.expanduser(args.store)))
    bought: list[bytes] = []
    balance = 0
    for start in range(0, args.count, PASSES_PER_REQUEST):
        made = blind(public_key, challenge, min(PASSES_PER_REQUEST, args.count - start))
        payload = json.dumps({"requests": [b64url(m.request) for m in made]}).encode()
        headers = {"Authorization": f"Bearer {token.hex}", "Idempotency-Key": secrets.token_hex(16)}
        answer = await _buy_once(reactor, args, payload, headers)
        code, _, body = answer
        if code != 200:
            raise _refusal(code, body)
        responses = body.get("responses")
        if not isinstance(responses, list) or len(responses) != len(made):
            raise _unexpected(code)
        try:
            answers = [from_b64url(str(r)) for r in responses]
        except ValueError:
            raise _unexpected(code) from None
        passes = [finish(m, r, public_key) for m, r in zip(made, answers, strict=True)]
        store.add(args.url, passes)  # kept at once: a later batch failing loses none of these
        bought += passes
        balance = _count(body, "balance", code)
    print_fields(
        out,
        [
            ("passes bought", str(len(bought))),
            ("balance", f"{balance} atomic units ({format_xmr(balance)} XMR)"),
            ("stored in", str(store.path)),
        ],
    )
    return EXIT_OK


async def _buy_once(
    reactor: Any, args: argparse.Namespace, payload: bytes, headers: dict[str, str]
) -> tuple[int, str, dict[str, Any]]:
    """One purchase; when no answer comes, asked again with the same Idempotency-Key and the
    same requests, so it is paid once however often it is retried."""
    for attempt in range(3):
        try:
            return await fetch(reactor, args, "POST", "/api/v1/passes", payload, headers)
        except ClientError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _passes_use(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = PassStore(Path(os.path.expanduser(args.store)))
    taken = store.take(args.issuer)
    if taken is None:
        raise ClientError("no unused pass left: buy some with 'passes buy'", EXIT_NOT_FOUND)
    print(f'PrivateToken token="{taken}"', file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- command line


def _base_url(text: str) -> str:
    """The URL with its host in the ASCII form a resolver would see (IDNA): the .onion check in
    :func:`make_agent` and the request then look at the same name, so no Unicode dot (U+FF0E,
    U+3002, U+FF61) can hide a .onion from the check and send a PID over plain TCP."""
    url = text.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError("must be an http:// or https:// URL, e.g. http://x.onion")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("must be a base URL without ?query or #fragment")
    if parts.username is not None or parts.password is not None:
        raise argparse.ArgumentTypeError("must be a URL without user:password@")
    host = parts.hostname
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise argparse.ArgumentTypeError("the URL's host name is not valid") from None
    if not host.isprintable() or any(c in host for c in "/\\@ "):
        raise argparse.ArgumentTypeError("the URL's host name is not valid")
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl().rstrip("/")


def onion_host(url: str) -> bool:
    """Whether the (already normalised) URL names a .onion, in any case, with or without the
    root's trailing dot."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    return host == "onion" or host.endswith(".onion")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--url", required=True, type=_base_url, help="base URL of the public site (http://x.onion)"
    )
    remote.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long, body included (default {DEFAULT_TIMEOUT:g})",
    )
    remote.add_argument(
        "--socks",
        # An empty value means none: it lets one call go direct despite the environment.
        default=os.environ.get(SOCKS_ENV) or None,
        metavar="ENDPOINT",
        help="send every request through this Tor SOCKS port, a Twisted client endpoint such "
        f"as tcp:127.0.0.1:9050 (default: ${SOCKS_ENV}, else direct; .onion needs it)",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pay Monero to an integrated address, then redeem its payment id for an "
        "anonymous service token.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = commands.add_parser(
        "new",
        parents=[common],
        help="make a fresh random payment id and its integrated address",
        description="Draw a random payment id on this machine and build the integrated address "
        "to pay to.  Keep the payment id secret until it is redeemed.",
    )
    new.add_argument(
        "--address", required=True, help="the service's standard (primary) Monero address"
    )
    new.add_argument(
        "--network",
        choices=sorted(NETWORK_BYTES),
        help="refuse an address of any other network (regtest uses mainnet addresses)",
    )
    new.set_defaults(handler=_new)
    redeem = commands.add_parser(
        "redeem",
        parents=[common, remote],
        help="redeem a paid payment id for a service token",
        description="Exchange the payment id for a service token.  Retrying is safe: it "
        "returns the same token.",
    )
    redeem.add_argument("pid", help="the 16-hex payment id printed by 'new'")
    redeem.set_defaults(handler=_redeem)
    status = commands.add_parser(
        "status",
        parents=[common, remote],
        help="show a service token's status and balance",
        description="Show whether a service token is active or revoked, and its balance.",
    )
    status.add_argument("token", help="the 64-hex service token")
    status.set_defaults(handler=_status)
    passes = commands.add_parser(
        "passes",
        help="buy unlinkable passes with a token's balance, and use them",
        description="Privacy Pass (RFC 9578 type 1): passes bought with a token cannot be "
        "linked to it when they are used.",
    )
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="PATH",
        help=f"the owner-only file the passes are kept in (default {DEFAULT_STORE})",
    )
    actions = passes.add_subparsers(dest="action", required=True, metavar="ACTION")
    buy = actions.add_parser(
        "buy",
        parents=[common, remote, store],
        help="buy passes: blinded here, paid from the token, proofs checked",
    )
    buy.add_argument("token", help="the 64-hex service token paying for them")
    buy.add_argument("--count", type=_pass_count, default=1, help="how many (default 1)")
    buy.add_argument(
        "--challenge",
        metavar="BASE64URL",
        help="the service's TokenChallenge (default: type 1, this issuer's host, no context)",
    )
    buy.set_defaults(handler=_passes_buy)
    use = actions.add_parser(
        "use",
        parents=[store],
        help="print one unused pass as an Authorization header value, and mark it used",
    )
    use.add_argument("--issuer", type=_base_url, help="only a pass bought from this URL")
    use.set_defaults(handler=_passes_use)
    return parser


def _pass_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 10000")
    return int(text)


async def run(reactor: Any, argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    """The whole command: parse ``argv``, act, print, and return the exit code."""
    args = cli.parse_arguments(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):  # --help, or a usage error argparse has already printed
        return args
    handler: Handler = args.handler
    try:
        return await handler(reactor, args, stdout, stderr)
    except ClientError as exc:
        message, code = str(exc), exc.exit_code
    except DomainError as exc:
        message, code = exc.message, EXIT_USAGE
    except PassError as exc:
        message, code = str(exc), EXIT_ERROR
    except Exception as exc:  # one line, never a traceback
        message, code = (
            f"unexpected {type(exc).__name__}: {terminal_text(exc)}",
            EXIT_ERROR,
        )
    print(f"{PROG}: error: {message}", file=stderr)
    return code


def main(argv: Sequence[str] | None = None) -> NoReturn:
    cli.main(run, argv)


if __name__ == "__main__":
    main()
