"""``ssl:`` endpoints, and the internal site off this machine over mutual TLS (SPEC §12).

``--internal ssl:PORT:interface=ADDR:privateKey=KEY.pem:certKey=CERT.pem:caCertsDir=DIR``

Twisted's server ``ssl:`` string has no keyword for the CAs of client certificates, so every
``ssl:`` endpoint is built here instead: the string is read as Twisted reads it (backslash
escapes), the key, the certificate and each ``*.pem`` of ``caCertsDir`` are loaded, and the site
listens on TCP behind a :class:`~twisted.protocols.tls.TLSMemoryBIOFactory` whose
:class:`~twisted.internet.ssl.CertificateOptions` is given ``trustRoot=`` those CAs.  That
sets ``verify`` and ``requireCertificate`` (OpenSSL's ``VERIFY_PEER |
VERIFY_FAIL_IF_NO_PEER_CERT``): a client without a certificate signed by one of them fails at
the handshake and no byte of it reaches HTTP.

A missing or bad file stops start-up with one line naming it (:class:`TLSSetupError`), where
Twisted's own parser would raise a traceback.  The files are read with ``cryptography``, not
pyOpenSSL's loaders: pyOpenSSL hands OpenSSL no passphrase callback, and OpenSSL then asks for
an encrypted key's passphrase on the terminal, which would hang a daemon started from one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

_KEYWORDS: Final = (
    "port",
    "interface",
    "backlog",
    "privateKey",
    "certKey",
    "extraCertChain",
    "caCertsDir",
)


class TLSSetupError(Exception):
    """A key, certificate or CA file cannot be used; the message is one line naming it."""


def endpoint_arguments(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and keyword arguments of a Twisted endpoint string (after its type), read
    as Twisted reads them (backslash escapes).  A repeated keyword is refused (ValueError):
    Twisted takes the last value, so a check that read another one
    (``interface=127.0.0.1:interface=0.0.0.0``) would be beaten."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            positional.append(part)
        elif key in keywords:
            raise ValueError(f"{key}= is given more than once")
        else:
            keywords[key] = value
    return positional, keywords


@dataclass(frozen=True)
class TLSListen:
    """An ``ssl:`` endpoint as the daemon reads it."""

    port: int
    interface: str  # "" listens on every IPv4 interface, as Twisted's ssl: does
    backlog: int
    private_key: Path
    certificate: Path
    extra_chain: Path | None
    client_cas: Path | None

    @property
    def mutual(self) -> bool:
        """Clients must present a certificate signed by one of the ``caCertsDir`` CAs."""
        return self.client_cas is not None


def parse_ssl(description: str) -> TLSListen | None:
    """The ``ssl:`` endpoint a description names, or None for any other type.

    Only the form is checked here (no file is read): config.py calls it for every
    ``--internal`` value.  ValueError says what is wrong, in one line.
    """
    kind, sep, _ = description.partition(":")
    if kind.lower() != "ssl" or not sep:
        return None
    positional, keywords = endpoint_arguments(description)
    for key in keywords:
        if key not in _KEYWORDS:
            raise ValueError(f"ssl: takes no {key!r} (it takes {'=, '.join(_KEYWORDS)}=)")
    if "port" in keywords:
        positional = [keywords["port"], *positional]
    if len(positional) != 1:
        raise ValueError("ssl: expected one port (ssl:PORT:privateKey=KEY.pem:...)")
    interface = keywords.get("interface", "")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"interface={interface!r} is not an IP address") from None
    private_key = _path(keywords, "privateKey")
    if private_key is None:
        # Twisted would read "server.pem" from the working directory: never what is meant.
        raise ValueError("ssl: privateKey=KEY.pem is required")
    return TLSListen(
        port=_number("port", positional[0], 0, 65535),
        interface=interface,
        backlog=_number("backlog", keywords.get("backlog", "50"), 1, 65535),
        private_key=private_key,
        # As in Twisted: without certKey=, the certificate is in the key's file.
        certificate=_path(keywords, "certKey") or private_key,
        extra_chain=_path(keywords, "extraCertChain"),
        client_cas=_path(keywords, "caCertsDir"),
    )


def _number(name: str, text: str, low: int, high: int) -> int:
    if not text.isdecimal() or not low <= int(text) <= high:
        raise ValueError(f"{name}= must be a number from {low} to {high}, got {text!r}")
    return int(text)


def _path(keywords: dict[str, str], name: str) -> Path | None:
    if name not in keywords:
        return None
    if not keywords[name]:
        raise ValueError(f"{name}= is empty")
    return Path(keywords[name])


# -- loading (at start-up, before the reactor runs: a few small files) -----------------------


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSSetupError(f"{name} {path}: {e.strerror or _one_line(e)}") from None


def _certificates(name: str, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(name, path))
    except ValueError as e:
        raise TLSSetupError(f"{name} {path}: not PEM certificates ({_one_line(e)})") from None


def load_client_cas(directory: Path) -> list[x509.Certificate]:
    """Every certificate of every ``*.pem`` file in ``directory`` (the names Twisted's client
    ``caCertsDir`` reads).  Unlike Twisted's client, which skips what it cannot read, a file
    that is unreadable, holds no certificate or a malformed one, or holds a private key (a CA's
    key belongs elsewhere) stops start-up: a CA silently left out would refuse its clients for
    no reason the operator can see."""
    name = "caCertsDir"
    try:
        files = sorted(p for p in directory.iterdir() if p.name.lower().endswith(".pem"))
    except OSError as e:
        raise TLSSetupError(f"{name} {directory}: {e.strerror or _one_line(e)}") from None
    authorities: list[x509.Certificate] = []
    for path in files:
        if b"PRIVATE KEY-----" in _read(name, path):
            raise TLSSetupError(f"{name} {path}: holds a private key; keep only CA certificates")
        authorities += _certificates(name, path)
    if not authorities:
        raise TLSSetupError(f"{name} {directory}: no *.pem CA certificate in it")
    return authorities


def _private_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read("privateKey", path), password=None)
    except TypeError:
        raise TLSSetupError(
            f"privateKey {path}: the key is encrypted; give the daemon an unencrypted key "
            "readable only by its user"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSSetupError(f"privateKey {path}: not a PEM private key ({_one_line(e)})") from None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_options(spec: TLSListen) -> tuple[CertificateOptions, int]:
    """The server's TLS options and how many client CAs they trust (0: no client
    certificates asked for); :class:`TLSSetupError` if a file cannot be used."""
    key = _private_key(spec.private_key)
    certificate = _certificates("certKey", spec.certificate)[0]
    if _spki(certificate.public_key()) != _spki(key.public_key()):
        raise TLSSetupError(
            f"privateKey {spec.private_key} is not the key of certKey {spec.certificate}"
        )
    chain = _certificates("extraCertChain", spec.extra_chain) if spec.extra_chain else None
    authorities = load_client_cas(spec.client_cas) if spec.client_cas else []
    try:
        options = CertificateOptions(
            # pyOpenSSL deprecates its own key and certificate objects for cryptography's, which
            # Twisted hands to it untouched (its annotations still name pyOpenSSL's).
            privateKey=cast(Any, key),
            certificate=cast(Any, certificate),
            extraCertChain=cast(Any, chain),
            # trustRoot= turns on verify and requireCertificate: a client without a certificate
            # of these CAs fails at the handshake.  (The store Twisted fills takes pyOpenSSL's.)
            trustRoot=trustRootFromCertificates(
                [Certificate(crypto.X509.from_cryptography(c)) for c in authorities]
            )
            if authorities
            else None,
        )
        # Built now so that what OpenSSL refuses (a key type, a key too small for its security
        # level) stops start-up rather than every handshake.
        options.getContext()
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSSetupError(
            f"certKey {spec.certificate}: OpenSSL cannot use it ({_one_line(e)})"
        ) from None
    return options, len(authorities)


class _TLSFactory(TLSMemoryBIOFactory):
    """TLS around a site that may refuse a connection.

    :class:`~anonticket.web.site.PrivacySite` refuses a connection at its cap by building no
    protocol; Twisted's wrapper would wrap that None and fail, with a logged traceback, once
    per refused connection.  Here no protocol means no connection, as on plain TCP.
    """

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        protocol: TLSMemoryBIOProtocol = self.protocol(self, inner)
        return protocol


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """An ``ssl:`` endpoint, with client certificates required when ``caCertsDir`` is given.

    The files are read when it is made (as its SiteService binds, before the reactor runs).
    """

    def __init__(self, reactor: Any, spec: TLSListen) -> None:
        self.spec = spec
        self.options, self.authorities = certificate_options(spec)
        self._tcp = TCP4ServerEndpoint(reactor, spec.port, spec.backlog, spec.interface)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self._tcp.listen(
            _TLSFactory(self.options, False, protocolFactory)
        )
        return listening
