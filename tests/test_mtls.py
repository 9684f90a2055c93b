"""Issue #13 item 4: the internal site off this machine, over mutual TLS (SPEC §12).

A CA, a server certificate, a client certificate and a foreign CA with its own client are made
with the ``openssl`` command line, as docs/operations.md tells the operator to.  The daemon's
internal site then listens on a real ``ssl:`` endpoint; clients are Twisted's TLS client and
``curl`` (run without blocking the reactor that serves it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from anonticket.config import ConfigError, check_internal_endpoint
from anonticket.metrics import Metrics
from anonticket.tap import AnonticketService, build
from anonticket.web.mtls import TLSServerEndpoint, parse_ssl
from anonticket.web.service import SiteService, StartupError
from anonticket.web.site import PrivacySite

from .conftest import daemon_config, reactor, tcp_port
from .rawhttp import parse_response
from .test_hardening import http_request, json_answer

SERVER_NAME = "internal.example"

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
    # Twisted's client side (optionsForClientTLS with a client certificate) still hands
    # pyOpenSSL its own, deprecated, objects; the daemon's side does not.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
]


# -- a small PKI, made as docs/operations.md says -------------------------------------------


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(cwd: Path, name: str) -> None:
    """``name.key`` and ``name.pem``: a self-signed CA (req -x509 marks it CA:TRUE)."""
    openssl(
        cwd,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30"),
        *("-subj", f"/CN={name}"),
    )


def make_leaf(cwd: Path, name: str, ca: str, extensions: str) -> None:
    """``name.key`` and ``name.pem``, signed by ``ca``."""
    (cwd / f"{name}.ext").write_text(extensions)
    openssl(
        cwd,
        *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
    )
    openssl(
        cwd,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-out", f"{name}.pem", "-days", "30", "-extfile", f"{name}.ext"),
    )


@dataclass(frozen=True)
class PKI:
    dir: Path
    client_cas: Path  # caCertsDir: the client CA only

    def path(self, name: str) -> Path:
        return self.dir / name

    def endpoint(self, interface: str | None = "127.0.0.1", **extra: str) -> str:
        keywords = {
            "privateKey": str(self.path("server.key")),
            "certKey": str(self.path("server.pem")),
            "caCertsDir": str(self.client_cas),
            **extra,
        }
        if interface is not None:
            keywords = {"interface": interface, **keywords}
        return "ssl:0:" + ":".join(f"{k}={v}" for k, v in keywords.items() if v)

    def client(self, name: str | None) -> Any:
        """Twisted client TLS options that trust the server's CA and present ``name``'s
        certificate (none for None)."""
        own = None
        if name is not None:
            pem = self.path(f"{name}.pem").read_bytes() + self.path(f"{name}.key").read_bytes()
            own = PrivateCertificate.loadPEM(pem)
        trust = Certificate.loadPEM(self.path("server-ca.pem").read_bytes())
        return optionsForClientTLS(SERVER_NAME, trustRoot=trust, clientCertificate=own)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "server-ca")
    make_ca(d, "client-ca")
    make_ca(d, "foreign-ca")
    make_leaf(
        d,
        "server",
        "server-ca",
        f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    for name, ca in (("client", "client-ca"), ("foreign", "foreign-ca")):
        make_leaf(d, name, ca, "extendedKeyUsage=clientAuth\n")
    cas = d / "client-cas"
    cas.mkdir()
    shutil.copy(d / "client-ca.pem", cas / "client-ca.pem")
    return PKI(d, cas)


# -- the daemon with its internal site on ssl: -----------------------------------------------

StartDaemon = Callable[[str], AnonticketService]


@pytest_twisted.async_yield_fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    started: list[AnonticketService] = []

    def start(internal: str) -> AnonticketService:
        config = daemon_config(tmp_path / f"d{len(started)}", internal=internal)
        root = build(config, reactor, Metrics())
        root.startService()
        started.append(root)
        return root

    yield start
    for root in reversed(started):
        await root.stopService()


def internal_port(root: AnonticketService) -> int:
    service: SiteService = root.getServiceNamed("internal-site")
    return tcp_port(service.port)


class _Answer(Protocol):
    """Sends one request; collects every byte until the connection is lost, and why."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.reason: Failure | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)


async def tls_request(
    port: int, options: Any, data: bytes, timeout: float = 10
) -> tuple[bytes, Failure]:
    """``data`` sent over TLS to 127.0.0.1; the bytes received and how the connection ended."""
    endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if options is not None:
        endpoint = wrapClientTLS(options, endpoint)
    proto = _Answer(data)
    await connectProtocol(endpoint, proto)
    proto.done.addTimeout(timeout, reactor)
    await proto.done
    assert proto.reason is not None
    return proto.received, proto.reason


async def curl(*args: str) -> tuple[int, bytes]:
    """curl's exit code and output, run beside the reactor that serves it."""
    executable = shutil.which("curl")
    assert executable is not None, "curl is not installed"
    out, _err, code = await getProcessOutputAndValue(
        executable, ("-sS", "--max-time", "10", *args), env=dict(os.environ)
    )
    return int(code), bytes(out)


# -- a client of a configured CA gets in; others fail at the handshake -----------------------


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_of_a_configured_ca_is_served(
    pki: PKI, start_daemon: StartDaemon
) -> None:
    port = internal_port(start_daemon(pki.endpoint()))
    host = f"{SERVER_NAME}:{port}".encode()
    raw, _ = await tls_request(port, pki.client("client"), http_request(path="/metrics", host=host))
    code, headers, body = parse_response(raw)
    assert code == 200 and headers["content-type"].startswith("text/plain")
    assert b"anonticket_" in body

    # The operator's tool, as docs/operations.md shows it (curl checks the server's name).
    url = f"https://{SERVER_NAME}:{port}/healthz"
    resolve = f"{SERVER_NAME}:{port}:127.0.0.1"
    code_, out = await curl(
        *("--resolve", resolve, "--cacert", str(pki.path("server-ca.pem"))),
        *("--cert", str(pki.path("client.pem")), "--key", str(pki.path("client.key")), url),
    )
    assert code_ == 0 and b'"status"' in out


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("client", "alert"), [(None, "certificate required"), ("foreign", "unknown ca")]
)
async def test_no_client_certificate_or_a_foreign_one_fails_at_the_handshake(
    pki: PKI,
    start_daemon: StartDaemon,
    caplog_events: list[str],
    client: str | None,
    alert: str,
) -> None:
    port = internal_port(start_daemon(pki.endpoint()))
    caplog_events.clear()
    raw, reason = await tls_request(port, pki.client(client), http_request(path="/metrics"))
    # Under TLS 1.3 the client's side of the handshake completes before the server's refusal
    # reaches it: what shows is no HTTP answer, and a TLS alert as the reason.
    assert raw == b""
    assert reason.check(SSL.Error), reason
    assert alert in reason.getErrorMessage()

    args = ["--cacert", str(pki.path("server-ca.pem"))]
    if client is not None:
        args += ["--cert", str(pki.path(f"{client}.pem")), "--key", str(pki.path(f"{client}.key"))]
    code, out = await curl(
        *args,
        *("--resolve", f"{SERVER_NAME}:{port}:127.0.0.1"),
        f"https://{SERVER_NAME}:{port}/metrics",
    )
    assert code != 0 and out == b""
    # Plain HTTP on the TLS port gets no HTTP answer either.
    raw, _ = await tls_request(port, None, http_request(path="/metrics"))
    assert not raw.startswith(b"HTTP/")
    # Refused handshakes are the client's business: nothing logged, no traceback.
    assert not [e for e in caplog_events if "Traceback" in e or "Unhandled" in e], caplog_events


@pytest_twisted.ensureDeferred
async def test_over_mutual_tls_any_host_is_served_but_other_sites_pages_are_not(
    pki: PKI, start_daemon: StartDaemon
) -> None:
    """A client certificate is ambient, like a cookie: a browser holding one would present it
    for any page's request, so the Origin check stays; the Host check has nothing left to
    protect (see anonticket/web/guard.py) and would only refuse legitimate names."""
    port = internal_port(start_daemon(pki.endpoint(interface=None)))  # every interface
    own = f"{SERVER_NAME}:{port}".encode()

    async def ask(host: bytes | None, *headers: tuple[bytes, bytes]) -> tuple[int, Any]:
        request = http_request(host=host, headers=headers)
        raw, _ = await tls_request(port, pki.client("client"), request)
        return json_answer(raw)

    host: bytes | None
    for host in [own, SERVER_NAME.encode(), b"10.1.2.3:9443", b"[2001:db8::1]", b"localhost"]:
        code, body = await ask(host)
        assert code == 200, (host, body)
    assert (await ask(own, (b"Origin", b"https://" + own)))[0] == 200
    for headers in [
        ((b"Origin", b"https://evil.example"),),
        ((b"Origin", b"http://" + own),),  # this site is https
        ((b"Sec-Fetch-Site", b"cross-site"),),
    ]:
        code, body = await ask(own, *headers)
        assert (code, body["code"]) == (403, "forbidden_origin"), (headers, body)
    for host in [None, b"..", b"a b"]:
        code, body = await ask(host)
        assert (code, body["code"]) == (403, "forbidden_host"), (host, body)


@pytest_twisted.ensureDeferred
async def test_tls_without_client_certificates_on_loopback_keeps_the_host_check(
    pki: PKI, start_daemon: StartDaemon
) -> None:
    port = internal_port(start_daemon(pki.endpoint(caCertsDir="")))
    for host, expected in [(b"127.0.0.1", 200), (SERVER_NAME.encode(), 403)]:
        raw, _ = await tls_request(port, pki.client(None), http_request(host=host))
        assert json_answer(raw)[0] == expected, host


# -- what is refused before anything listens -------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        "ssl:9443:interface=127.0.0.1:privateKey=/k.pem:certKey=/c.pem:caCertsDir=/cas",
        "ssl:9443:interface=0.0.0.0:privateKey=/k.pem:certKey=/c.pem:caCertsDir=/cas",
        "ssl:9443:interface=10.0.0.1:privateKey=/k.pem:caCertsDir=/cas",
        "ssl:port=9443:privateKey=/k.pem:caCertsDir=/cas",  # every interface
        "ssl:9443:interface=\\:\\::privateKey=/k.pem:caCertsDir=/c\\:as",
        # TLS without client certificates on loopback is no worse than plain tcp there.
        "ssl:9443:interface=127.0.0.1:privateKey=/k.pem:certKey=/c.pem",
        "ssl:9443:interface=\\:\\:1:privateKey=/k.pem:extraCertChain=/chain.pem",
    ],
)
def test_ssl_internal_endpoints_accepted(endpoint: str) -> None:
    assert check_internal_endpoint(endpoint) == endpoint


def test_the_ssl_form_is_read_as_twisted_reads_it() -> None:
    tls = parse_ssl("SSL:port=9443:interface=\\:\\::privateKey=/k\\:1.pem:caCertsDir=/c")
    assert tls is not None and tls.mutual
    assert (tls.port, tls.interface, tls.backlog) == (9443, "::", 50)
    assert str(tls.private_key) == str(tls.certificate) == "/k:1.pem"
    assert parse_ssl("tcp:9443") is None


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("ssl:9443:interface=0.0.0.0:privateKey=/k.pem", "must require client certificates"),
        ("ssl:9443:interface=10.0.0.1:privateKey=/k.pem", "add caCertsDir=DIR"),
        ("ssl:9443:privateKey=/k.pem:certKey=/c.pem", "must require client certificates"),
        ("tcp:9180:interface=10.0.0.1", "interface '10.0.0.1' is not a loopback address$"),
        ("tcp:9180", "listen on every interface"),
        ("ssl:9443:interface=127.0.0.1", "privateKey=KEY.pem is required"),
        ("ssl:9443:interface=127.0.0.1:privateKey=/k:caCertsDir=/a:caCertsDir=/b", "more than"),
        ("ssl:9443:interface=127.0.0.1:privateKey=/k:sslmethod=TLS_METHOD", "no 'sslmethod'"),
        ("ssl:9443:interface=127.0.0.1:privateKey=/k:caCertsDir=", "caCertsDir= is empty"),
        ("ssl:99999:interface=127.0.0.1:privateKey=/k", "port= must be a number"),
        ("ssl:9443:interface=localhost:privateKey=/k:caCertsDir=/c", "not an IP address"),
        ("ssl:privateKey=/k:caCertsDir=/c", "expected one port"),
    ],
)
def test_ssl_internal_endpoints_refused(endpoint: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^--internal: .*{message}") as refused:
        check_internal_endpoint(endpoint)
    assert "\n" not in str(refused.value)


@given(st.text(max_size=80))
def test_the_ssl_check_never_raises_anything_but_config_error(text: str) -> None:
    try:
        check_internal_endpoint("ssl:" + text)
    except ConfigError as e:
        assert str(e).startswith("--internal: ")


# -- files that cannot be used stop start-up with one line -----------------------------------


def _site() -> PrivacySite:
    return PrivacySite(Resource(), name="internal", metrics=Metrics(), clock=reactor)


@pytest.fixture
def broken(pki: PKI, tmp_path: Path) -> Callable[[str], Path]:
    """Makes the file (or directory) of a broken case, by name."""

    def make(name: str) -> Path:
        path = tmp_path / name
        if name == "empty-dir":
            path.mkdir()
            (path / "README").write_text("the CAs go here\n")
        elif name == "garbage-dir":
            path.mkdir()
            shutil.copy(pki.client_cas / "client-ca.pem", path / "a.pem")
            (path / "b.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n")
        elif name == "key-dir":
            path.mkdir()
            (path / "ca.pem").write_bytes(
                pki.path("client-ca.pem").read_bytes() + pki.path("client-ca.key").read_bytes()
            )
        elif name == "garbage.pem":
            path.write_text("not a PEM file\n")
        elif name == "encrypted.key":
            openssl(
                tmp_path,
                *("pkey", "-in", str(pki.path("client.key")), "-out", str(path)),
                *("-aes256", "-passout", "pass:secret"),
            )
        return path

    return make


@pytest.mark.parametrize(
    ("keyword", "name", "message"),
    [
        ("caCertsDir", "missing-dir", "caCertsDir .*missing-dir: No such file or directory"),
        ("caCertsDir", "empty-dir", "caCertsDir .*empty-dir: no \\*.pem CA certificate in it"),
        ("caCertsDir", "garbage-dir", "caCertsDir .*b.pem: not PEM certificates"),
        ("caCertsDir", "key-dir", "caCertsDir .*ca.pem: holds a private key"),
        ("privateKey", "missing.key", "privateKey .*missing.key: No such file"),
        ("privateKey", "garbage.pem", "privateKey .*garbage.pem: not a PEM private key"),
        ("privateKey", "encrypted.key", "privateKey .*encrypted.key: the key is encrypted"),
        ("certKey", "garbage.pem", "certKey .*garbage.pem: not PEM certificates"),
        ("certKey", "missing.pem", "certKey .*missing.pem: No such file"),
        ("privateKey", "client.key", "privateKey .*client.key is not the key of certKey"),
    ],
)
def test_unusable_files_stop_start_up_with_one_line(
    pki: PKI, broken: Callable[[str], Path], keyword: str, name: str, message: str
) -> None:
    path = pki.path(name) if name == "client.key" else broken(name)
    service = SiteService(reactor, "internal", pki.endpoint(**{keyword: str(path)}), _site())
    with pytest.raises(StartupError, match=f"^--internal: {message}") as refused:
        service.startService()
    assert "\n" not in str(refused.value)
    assert service.port is None and not service.running


def test_the_daemon_stops_with_one_line_for_a_bad_ca_directory(pki: PKI, tmp_path: Path) -> None:
    config = daemon_config(tmp_path / "d", internal=pki.endpoint(caCertsDir=str(tmp_path / "no")))
    root = build(config, reactor, Metrics())
    with pytest.raises(SystemExit) as stopped:
        root.startService()
    text = str(stopped.value)
    assert text.startswith("anonticket: --internal: caCertsDir ") and "\n" not in text


@pytest_twisted.ensureDeferred
async def test_tls_without_client_certificates_is_refused_off_loopback_at_start(
    pki: PKI,
) -> None:
    """config.py refuses it; the service checks the address it really bound too."""
    description = pki.endpoint(interface="0.0.0.0", caCertsDir="")
    service = SiteService(reactor, "internal", description, _site())
    with pytest.raises(StartupError, match="not on a loopback address"):
        service.startService()
    assert service.port is None
    # With client certificates required it may listen there.
    ok = SiteService(reactor, "internal", pki.endpoint(interface="0.0.0.0"), _site())
    ok.startService()
    assert ok.port is not None and ok.site.guard is not None and ok.site.guard.clients_authenticated
    await ok.stopService()


# -- a site at its connection cap, behind TLS ------------------------------------------------


class _Refusing(Factory):
    """A site at its cap: no protocol for a new connection."""

    def buildProtocol(self, addr: Any) -> None:
        return None


@pytest_twisted.ensureDeferred
async def test_a_connection_the_site_refuses_is_closed_without_a_traceback(
    pki: PKI, caplog_events: list[str]
) -> None:
    tls = parse_ssl(pki.endpoint())
    assert tls is not None
    port = await TLSServerEndpoint(reactor, tls).listen(_Refusing())
    try:
        raw, _ = await tls_request(tcp_port(port), pki.client("client"), b"x")
        assert raw == b""
    finally:
        stopped = port.stopListening()
        assert stopped is not None  # a TCP port's: fires once the socket is closed
        await stopped
    await deferLater(reactor, 0, lambda: None)
    assert not [e for e in caplog_events if "Traceback" in e or "Unhandled" in e], caplog_events
