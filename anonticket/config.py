"""Configuration: ``twistd anonticket`` options and ``ANONTICKET_*`` variables → one frozen Config.

Every option has one name used everywhere: ``--min-confirmations`` is read from
``ANONTICKET_MIN_CONFIRMATIONS`` and documented under that name.  The command line wins over the
environment; values are trimmed and an empty value counts as unset.  Parsing never raises anything
but :class:`ConfigError`, whose message names the option, so start-up can fail with one line.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage

from anonticket.store.answercache import DEFAULT_SIZE as DEFAULT_ANSWER_CACHE
from anonticket.web.mtls import endpoint_arguments, parse_ssl

T = TypeVar("T")


class ConfigError(Exception):
    """A bad or missing configuration value; the message names the option."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    help: str
    flag: bool = False
    shown_default: str | None = None

    @property
    def env(self) -> str:
        return "ANONTICKET_" + self.name.upper().replace("-", "_")


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("data-dir", "./anonticket-data", "directory (created 0700) for the database and keys"),
    Setting(
        "database",
        None,
        "sqlite:///PATH or postgresql://...",
        shown_default="sqlite:///<data-dir>/anonticket.sqlite3",
    ),
    Setting(
        "public",
        "onion:80",
        "endpoint of the public site: onion:PORT (anonticket's own form: publish it as a Tor v3 "
        "onion service on virtual port PORT, key in <data-dir>/onion.key; not txtorcon's onion: "
        "endpoint string), or a Twisted tcp:..., tcp6:..., unix:... endpoint",
    ),
    Setting(
        "internal",
        "tcp:9180:interface=127.0.0.1",
        "endpoint of the internal site (metrics, revoke): loopback tcp or unix, or ssl with "
        "client certificates required (caCertsDir=DIR) on any interface",
    ),
    Setting(
        "tor-control",
        None,
        "control endpoint of a running tor (unix:/run/tor/control, tcp:127.0.0.1:9051)",
        shown_default="unset: launch a private tor",
    ),
    Setting(
        "tor-cookie-file",
        None,
        "the cookie file of the tor at --tor-control (an absolute path); the only file it may "
        "name for SAFECOOKIE",
        shown_default="unset: tor's usual locations",
    ),
    Setting(
        "tor-config",
        None,
        "torrc-style file of extra options for the tor anonticket launches (bridges, ...)",
        shown_default="unset",
    ),
    Setting("wallet-rpc", "http://127.0.0.1:18083", "monero-wallet-rpc base URL"),
    Setting(
        "wallet-rpc-login",
        None,
        "user:password for the wallet's --rpc-login (HTTP Digest); visible in ps: prefer "
        "--wallet-rpc-login-file",
        shown_default="unset: no authentication",
    ),
    Setting(
        "wallet-rpc-login-file",
        None,
        "file holding user:password for the wallet's --rpc-login (read at start; e.g. a "
        "systemd credential)",
        shown_default="unset",
    ),
    Setting("min-confirmations", "10", "confirmations before a payment is redeemable"),
    Setting("min-amount", "10000000000", "smallest redeemable transfer, atomic units"),
    Setting("start-height", "0", "first block height to scan when no cursor is stored"),
    Setting("poll-interval", "5", "seconds between wallet polls"),
    Setting(
        "answer-cache",
        str(DEFAULT_ANSWER_CACHE),
        "repeated token checks and redeems answered from memory (entries; 0: ask the database)",
    ),
    Setting(
        "admission-limit",
        "1000",
        "database operations waiting at which the public site answers 503 overloaded at once "
        "(0: never)",
    ),
    Setting(
        "idempotency-retention",
        "86400",
        "seconds a spend's Idempotency-Key is remembered (a retry within them replays the answer)",
    ),
    Setting(
        "webhook-url",
        None,
        "http(s) URL the events (issue, credit, spend, revoke, reversal, restoration) are POSTed "
        "to as signed Standard Webhooks",
        shown_default="unset: no events",
    ),
    Setting(
        "webhook-signing",
        "hmac",
        "hmac (v1, secret in <data-dir>/webhook.secret) or ed25519 (v1a, public key in "
        "<data-dir>/webhook.pub)",
    ),
    Setting(
        "webhook-retry-schedule",
        "5,300,1800,7200,18000,36000,36000",
        "seconds to wait before each retry of an event (comma list, +-10 % jitter); after the "
        "last it is failed",
    ),
    Setting(
        "pass-price",
        None,
        "atomic units a pass costs, taken from the buying token's balance (Privacy Pass "
        "issuer, token type 1)",
        shown_default="unset: no passes",
    ),
    Setting(
        "pass-key-file",
        None,
        'JSON {"seed": "<64 hex>", "info": "<text>"} the issuer keys are derived from',
        shown_default="<data-dir>/pass.key, made at first start",
    ),
    Setting(
        "pass-key-lifetime",
        "2592000",
        "seconds an issuer key is current before the next (the previous one still verifies "
        "for as long); 0: one key, never rotated",
    ),
    Setting(
        "pass-batch-max",
        "100",
        "token requests one POST /api/v1/passes may carry (1 to 100)",
    ),
    Setting(
        "log-format",
        "text",
        "text (twistd's lines), json (one JSON object per line: time, level, namespace, "
        "message, fields) or journal (text lines with a <N> priority prefix for journald)",
    ),
    Setting("no-monitor", None, "serve without polling the wallet (a second API node)", True),
)

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def resolve(
    command_line: Mapping[str, object], environ: Mapping[str, str]
) -> dict[str, str | bool | None]:
    """Merge command-line values (already without defaults) over env values over defaults."""
    merged: dict[str, str | bool | None] = {}
    for s in SETTINGS:
        given = command_line.get(s.name)
        if s.flag:
            if given:
                merged[s.name] = True
                continue
            env = _clean(environ.get(s.env))
            if env is None:
                merged[s.name] = False
            elif env.lower() in _TRUE:
                merged[s.name] = True
            elif env.lower() in _FALSE:
                merged[s.name] = False
            else:
                raise ConfigError(f"{s.env}: expected 1/true/yes/on or 0/false/no/off, got {env!r}")
            continue
        value = _clean(given if isinstance(given, str) else None)
        if value is None:
            value = _clean(environ.get(s.env))
        if value is None:
            value = s.default
        merged[s.name] = value
    return merged


@dataclass(frozen=True)
class Config:
    data_dir: Path
    database: str
    public: str
    internal: str
    tor_control: str | None
    tor_config: dict[str, str | list[str]]
    wallet_rpc: str
    wallet_rpc_login: tuple[str, str] | None
    min_confirmations: int
    min_amount: int
    start_height: int
    poll_interval: float
    monitor: bool
    answer_cache: int
    admission_limit: int = 1000
    tor_cookie_file: Path | None = None
    idempotency_retention: int = 86_400
    webhook_url: str | None = None
    webhook_signing: str = "hmac"
    webhook_retry_schedule: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    pass_price: int | None = None
    pass_key_file: Path | None = None
    pass_key_lifetime: int = 2_592_000
    pass_batch_max: int = 100
    log_format: str = "text"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None for another database."""
        if self.database.startswith("sqlite:///"):
            return Path(self.database[len("sqlite:///") :])
        return None


def _bounded_int(name: str, value: str | None, minimum: int, maximum: int = 2**63 - 1) -> int:
    assert value is not None
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"--{name}: expected a whole number, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise ConfigError(f"--{name}: must be between {minimum} and {maximum}, got {number}")
    return number


def _database(value: str | None, data_dir: Path) -> str:
    if value is None:
        return f"sqlite:///{data_dir / 'anonticket.sqlite3'}"
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("postgresql://", "postgres://")):
        return value
    raise ConfigError(f"--database: expected sqlite:///PATH or postgresql://..., got {value!r}")


def _wallet_url(value: str | None) -> str:
    assert value is not None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"--wallet-rpc: not a valid URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--wallet-rpc: expected http://HOST:PORT, got {value!r}")
    if parts.username or parts.password:
        raise ConfigError("--wallet-rpc: put credentials in --wallet-rpc-login, not in the URL")
    return value.rstrip("/").removesuffix("/json_rpc")


def _webhook_url(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises for a port out of range
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or not value.isascii():
        raise ConfigError("--webhook-url: expected an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # It would be sent in the clear with every event and shown in logs and ps.
        raise ConfigError("--webhook-url: must not carry a user or password")
    if parts.fragment:
        raise ConfigError("--webhook-url: must not have a #fragment")
    return value


def _webhook_signing(value: str | None) -> str:
    if value not in ("hmac", "ed25519"):
        raise ConfigError("--webhook-signing: expected hmac or ed25519")
    return value


def _retry_schedule(value: str | None) -> tuple[int, ...]:
    delays = (value or "").split(",")
    if not 1 <= len(delays) <= 50 or not all(
        d.strip().isascii() and d.strip().isdigit() and 1 <= int(d) <= 7 * 86_400 for d in delays
    ):
        raise ConfigError(
            "--webhook-retry-schedule: expected 1 to 50 comma-separated delays in seconds, "
            "each from 1 to 604800"
        )
    return tuple(int(d) for d in delays)


def _login(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--wallet-rpc-login: expected user:password")
    return user, password


def _login_file(value: str | None) -> tuple[str, str] | None:
    """Read user:password from a file (one line; a trailing newline is fine)."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read(4097)
    except OSError as e:
        raise ConfigError(f"--wallet-rpc-login-file: cannot read {value}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--wallet-rpc-login-file: not UTF-8 text") from None
    line = text.strip("\r\n")
    if len(text) > 4096 or "\n" in line:
        raise ConfigError("--wallet-rpc-login-file: expected one line user:password")
    try:
        return _login(line)
    except ConfigError:
        # Never echo the file's content: it is a secret.
        raise ConfigError("--wallet-rpc-login-file: expected one line user:password") from None


LOG_FORMATS: Final = ("text", "json", "journal")


def _log_format(value: str | None) -> str:
    if value not in LOG_FORMATS:
        raise ConfigError(f"--log-format: expected one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


def _poll_interval(value: str | None) -> float:
    try:
        seconds = float(value or "")
    except ValueError:
        raise ConfigError(f"--poll-interval: expected seconds, got {value!r}") from None
    if not 0.1 <= seconds <= 3600:
        raise ConfigError(f"--poll-interval: must be between 0.1 and 3600 seconds, got {value}")
    return seconds


def from_options(options: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from parsed Options (command line) and the environment.

    Every bad value is reported, in one line, so an operator fixes them all in one go.
    """
    v = resolve(options, os.environ if environ is None else environ)
    errors: list[str] = []

    def parse(name: str, parser: Callable[[str | None], T]) -> T:
        value = v[name]
        assert value is None or isinstance(value, str)
        try:
            return parser(value)
        except ConfigError as e:
            errors.append(str(e))
            return None  # type: ignore[return-value]  # never used: errors is not empty

    data_dir = Path(parse("data-dir", lambda x: x or "."))
    login = parse("wallet-rpc-login", _login)
    login_file = parse("wallet-rpc-login-file", _login_file)
    if login is not None and login_file is not None:
        errors.append("--wallet-rpc-login and --wallet-rpc-login-file: give one, not both")
    config = Config(
        data_dir=data_dir,
        database=parse("database", lambda x: _database(x, data_dir)),
        public=parse("public", lambda x: check_public_endpoint(x or "")),
        internal=parse("internal", lambda x: check_internal_endpoint(x or "")),
        tor_control=parse("tor-control", check_tor_control),
        tor_config=parse("tor-config", read_tor_config),
        tor_cookie_file=parse("tor-cookie-file", _cookie_file),
        wallet_rpc=parse("wallet-rpc", _wallet_url),
        wallet_rpc_login=login or login_file,
        log_format=parse("log-format", _log_format),
        min_confirmations=parse(
            "min-confirmations", lambda x: _bounded_int("min-confirmations", x, 1, 1_000_000)
        ),
        min_amount=parse("min-amount", lambda x: _bounded_int("min-amount", x, 1)),
        start_height=parse("start-height", lambda x: _bounded_int("start-height", x, 0, 2**40)),
        poll_interval=parse("poll-interval", _poll_interval),
        monitor=not v["no-monitor"],
        answer_cache=parse(
            "answer-cache", lambda x: _bounded_int("answer-cache", x, 0, 10_000_000)
        ),
        admission_limit=parse(
            "admission-limit", lambda x: _bounded_int("admission-limit", x, 0, 1_000_000)
        ),
        idempotency_retention=parse(
            "idempotency-retention",
            lambda x: _bounded_int("idempotency-retention", x, 60, 366 * 86_400),
        ),
        webhook_url=parse("webhook-url", _webhook_url),
        webhook_signing=parse("webhook-signing", _webhook_signing),
        webhook_retry_schedule=parse("webhook-retry-schedule", _retry_schedule),
        pass_price=parse(
            "pass-price", lambda x: None if x is None else _bounded_int("pass-price", x, 1)
        ),
        pass_key_file=parse("pass-key-file", lambda x: None if x is None else Path(x)),
        pass_key_lifetime=parse(
            "pass-key-lifetime",
            lambda x: _bounded_int("pass-key-lifetime", x, 0, 10 * 366 * 86_400),
        ),
        pass_batch_max=parse("pass-batch-max", lambda x: _bounded_int("pass-batch-max", x, 1, 100)),
    )
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def _endpoint_kind(name: str, description: str) -> str:
    kind = description.split(":", 1)[0].lower()
    if not description or ":" not in description:
        raise ConfigError(f"--{name}: expected an endpoint such as tcp:PORT or unix:PATH")
    return kind


def _endpoint_parts(name: str, description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and keyword arguments of a Twisted endpoint string, read as Twisted reads
    them (backslash escapes).  A repeated keyword is refused: Twisted takes the last value, so a
    check that read another one (``interface=127.0.0.1:interface=0.0.0.0``) would be beaten."""
    try:
        return endpoint_arguments(description)
    except ValueError as e:
        raise ConfigError(f"--{name}: {e}") from None


def _twisted_parses(name: str, description: str, *, server: bool) -> None:
    """Refuse at start-up, before the database or the monitor, what the endpoint parser would
    refuse only at listen or connect time (``tcp:notaport``, ``mode=999``, unknown keys)."""
    parse = serverFromString if server else clientFromString
    try:
        parse(None, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ConfigError(f"--{name}: bad endpoint {description!r}: {e}") from None


def _owner_only(description: str) -> str:
    """A unix socket is created owner-only (mode 600) unless the operator says otherwise:
    Twisted's default is 666, whatever the umask."""
    _, keywords = _endpoint_parts("", description)
    return description if "mode" in keywords else description + ":mode=600"


def check_public_endpoint(description: str) -> str:
    kind = _endpoint_kind("public", description)
    if kind == "onion":
        port = description.split(":", 1)[1]
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(
                "--public: expected onion:PORT (the onion's virtual port, e.g. onion:80); "
                "tor itself is chosen with --tor-control"
            )
        return description
    if kind not in ("tcp", "tcp6", "unix"):
        raise ConfigError(
            f"--public: unsupported endpoint type {kind!r} (use onion:, tcp:, tcp6: or unix:)"
        )
    _endpoint_parts("public", description)
    _twisted_parses("public", description, server=True)
    return _owner_only(description) if kind == "unix" else description


def onion_port(description: str) -> int | None:
    """The virtual port of an ``onion:PORT`` public endpoint, or None for tcp/unix."""
    kind, _, port = description.partition(":")
    return int(port) if kind.lower() == "onion" else None


_TOR_OPTIONS_SET_BY_US: Final = {
    name.lower(): name
    for name in (
        "DataDirectory",
        "ControlPort",
        "ControlSocket",
        "SocksPort",
        "CookieAuthentication",
        "CookieAuthFile",
    )
}


def read_tor_config(path: str | None) -> dict[str, str | list[str]]:
    """``Option value`` lines (torrc syntax, ``#`` comments); a repeated option keeps every
    value.  Anonticket sets the data directory, the control socket and its cookie, and the SOCKS
    port (none) itself."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--tor-config: cannot read {path!r}: {e}") from None
    options: dict[str, str | list[str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        if not key.isalnum() or not value.strip():
            raise ConfigError(f"--tor-config: line {number}: expected 'Option value'")
        # tor reads option names in any case: "socksport" is SocksPort.
        ours = _TOR_OPTIONS_SET_BY_US.get(key.lower())
        if ours is not None:
            raise ConfigError(f"--tor-config: line {number}: anonticket sets {ours} itself")
        previous = options.get(key)
        if previous is None:
            options[key] = value.strip()
        else:
            values = previous if isinstance(previous, list) else [previous]
            options[key] = [*values, value.strip()]
    return options


def _cookie_file(value: str | None) -> Path | None:
    if value is None:
        return None
    if not value.startswith("/"):
        raise ConfigError("--tor-cookie-file: expected an absolute path")
    return Path(value)


def check_tor_control(description: str | None) -> str | None:
    """A running tor's control port: a unix socket, or tcp on this machine (the onion's target
    is a loopback address here, which a tor elsewhere could not reach)."""
    if description is None:
        return None
    kind = _endpoint_kind("tor-control", description)
    if kind == "unix":
        _endpoint_parts("tor-control", description)
        _twisted_parses("tor-control", description, server=False)
        return description
    if kind == "tcp":
        positional, keywords = _endpoint_parts("tor-control", description)
        host = keywords.get("host", positional[0] if positional else "")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            _twisted_parses("tor-control", description, server=False)
            return description
    raise ConfigError(
        "--tor-control: expected unix:/run/tor/control or tcp:127.0.0.1:9051 "
        "(a tor on this machine, cookie authentication)"
    )


def _is_loopback(interface: str) -> bool:
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False


def check_internal_endpoint(description: str) -> str:
    """The internal site (metrics, revocation) is reachable from another host only over mutual
    TLS: an ``ssl:`` endpoint with ``caCertsDir=`` (see :mod:`anonticket.web.mtls`)."""
    kind = _endpoint_kind("internal", description)
    if kind == "unix":
        _endpoint_parts("internal", description)
        _twisted_parses("internal", description, server=True)
        return _owner_only(description)
    if kind == "ssl":
        _endpoint_parts("internal", description)
        try:
            tls = parse_ssl(description)
        except ValueError as e:
            raise ConfigError(f"--internal: bad endpoint {description!r}: {e}") from None
        assert tls is not None
        # TLS without client certificates on loopback is no worse than plain tcp there; off
        # loopback, only a client certificate keeps other hosts out.  The files are read when
        # the site binds (SiteService.privilegedStartService): before twistd drops to --uid.
        if not tls.mutual and not _is_loopback(tls.interface):
            raise ConfigError(
                "--internal: an ssl: endpoint off loopback must require client certificates: "
                "add caCertsDir=DIR (the CA certificates whose clients are accepted)"
            )
        return description
    if kind not in ("tcp", "tcp6"):
        raise ConfigError(
            "--internal: must be a loopback tcp: endpoint, a unix: socket or an ssl: endpoint "
            f"with caCertsDir=, got {kind!r}"
        )
    _, keywords = _endpoint_parts("internal", description)
    interface = keywords.get("interface")
    if interface is None:
        raise ConfigError(
            "--internal: tcp endpoints listen on every interface unless given "
            "interface=127.0.0.1 (or ::1); refusing to expose the internal site"
        )
    if not _is_loopback(interface):
        raise ConfigError(f"--internal: interface {interface!r} is not a loopback address")
    _twisted_parses("internal", description, server=True)
    return description


class Options(usage.Options):
    """``twistd anonticket`` options; each also reads its ``ANONTICKET_*`` variable."""

    synopsis = "[options]"
    longdesc = (
        "Pay Monero to an integrated address, redeem the payment ID for a service token. "
        "Every option can also be set with the environment variable shown in brackets; "
        "the command line wins."
    )
    optFlags = [[s.name, None, f"{s.help} [{s.env}]"] for s in SETTINGS if s.flag]
    # Defaults are shown in the help text but not stored: an unset option must fall through to
    # its environment variable, so defaults are applied by resolve().
    optParameters = [
        [s.name, None, None, f"{s.help} [{s.env}; default: {s.shown_default or s.default}]"]
        for s in SETTINGS
        if not s.flag
    ]
