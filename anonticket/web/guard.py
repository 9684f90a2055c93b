"""What a request's ``Host`` and browser headers may be, before any route sees the request.

Two separate concerns:

* :func:`routing_host`: the host name handed to Klein/Werkzeug's URL map.  Werkzeug IDNA-encodes
  it while binding the map, outside any route's error handling, so a name like ``..``, ``.a``,
  a 64-character label or a fullwidth dot raised ``BadHost`` there and twisted.web answered 500
  with a logged traceback.  No route depends on the host, so the map gets the name only if it
  is a plain DNS name or address literal, and a fixed placeholder otherwise.
* :class:`BrowserGuard`: the internal site has no authentication: whoever reaches it may use it.
  A browser on the operator's machine reaches it too, on behalf of any web page: a form POST is
  a cross-site revoke (CSRF), and a page whose name is rebound to 127.0.0.1 (DNS rebinding) can
  read ``/metrics``.  Browsers cannot forge ``Host``, ``Origin`` or ``Sec-Fetch-Site``, so the
  guard refuses a request whose ``Host`` is not one of the site's own names and any request a
  browser marks as coming from another site.

  Served over mutual TLS (off this machine, :mod:`anonticket.web.mtls`), the site accepts any
  well-formed ``Host`` and keeps the browser checks.  The ``Host`` check stops DNS rebinding, and
  over TLS rebinding cannot get that far: the browser checks the server's certificate against
  the name it thinks it is talking to (the attacker's), and the site's certificate is not for
  that name, so the handshake fails and a script cannot click through it.  Whatever else
  completes the handshake proved a certificate of a configured CA: it is an authorised client,
  free to send any ``Host`` anyway.  The check would only refuse such clients for naming the
  site by a name or address the daemon cannot know (one in its certificate, a load balancer's,
  a NAT's).  Cross-site requests are another matter: a client certificate is an ambient
  credential like a cookie, and a browser that holds one (an operator who imported it to read
  ``/metrics``) presents it for any page's form POST or fetch to the site, perhaps after asking,
  perhaps silently under an auto-select policy.  Those requests carry ``Origin`` or
  ``Sec-Fetch-Site``, so that check stays.  TLS *without* client certificates (allowed only on
  loopback) proves nothing about the client and keeps the ``Host`` check.
"""

from __future__ import annotations

import re
from typing import Final

from twisted.web.iweb import IRequest

# Longer than any DNS name (253) plus a port: not worth matching.
_MAX_HOST: Final = 262
# A DNS name of LDH labels (1-63 characters, no leading/trailing hyphen), optional final dot;
# or a bracketed IPv6 literal.  Then an optional port.
_LABEL: Final = rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST: Final = re.compile(
    rb"(?P<name>(?:" + _LABEL + rb"\.)*" + _LABEL + rb"\.?|\[[0-9a-f:.]{2,45}\])"
    rb"(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
PLACEHOLDER_HOST: Final = b"host.invalid"  # RFC 6761: a name that is never anyone's

LOOPBACK_NAMES: Final = frozenset({b"localhost", b"127.0.0.1", b"[::1]"})
# Sec-Fetch-Site values of requests a browser made on its own (typed URL, bookmark) or for a
# page of the same origin.  "same-site" is refused: another port of localhost is a same-site
# origin, and so is any other web app the operator runs there.
_SAME_ORIGIN_FETCH: Final = frozenset({b"none", b"same-origin"})


def split_host(value: bytes) -> tuple[bytes, bytes | None] | None:
    """``(name, port)`` of a ``Host`` value, lower-case; None unless a plain DNS name or an
    address literal with an optional numeric port."""
    if len(value) > _MAX_HOST:
        return None
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    name, port = match.group("name").lower(), match.group("port")
    if len(name.rstrip(b".")) > 253 or (port is not None and int(port) > 65535):
        return None
    return name, port


def routing_host(request: IRequest) -> bytes:
    """The name Klein may bind its URL map with (see the module docstring)."""
    value = request.getHeader(b"host")
    parts = split_host(value) if value is not None else None
    if parts is None:
        return PLACEHOLDER_HOST
    name = parts[0]
    # Twisted's own parsing hands Klein an IPv6 literal without brackets.
    return name[1:-1] if name.startswith(b"[") else name


class BrowserGuard:
    """Refuses requests to a site that only local tools should use (see the module docstring).

    :param names: the ``Host`` names accepted besides :data:`LOOPBACK_NAMES` (the address the
        site is bound to, in ``Host`` form); any port is accepted, so a tunnel to another local
        port still works.
    :param unix: the site listens on a unix socket, where a request may omit ``Host``.
    :param clients_authenticated: every connection proved a client certificate (mutual TLS):
        any well-formed ``Host`` is accepted (see the module docstring).
    """

    def __init__(
        self,
        names: frozenset[bytes] = frozenset(),
        unix: bool = False,
        clients_authenticated: bool = False,
    ) -> None:
        self.names = LOOPBACK_NAMES | names
        self.unix = unix
        self.clients_authenticated = clients_authenticated

    def refusal(self, request: IRequest) -> tuple[str, str] | None:
        """``(code, message)`` if the request must be refused, else None."""
        headers = request.requestHeaders
        hosts = headers.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            return "forbidden_host", "more than one Host header"
        if not hosts:
            if not self.unix:
                return "forbidden_host", "a Host header is required"
        else:
            parts = split_host(hosts[0])
            if parts is None or not (self.clients_authenticated or parts[0] in self.names):
                return "forbidden_host", "Host is not this site's own address"
        origins = headers.getRawHeaders(b"origin") or []
        if len(origins) > 1:
            return "forbidden_origin", "more than one Origin header"
        if origins and (not hosts or origins[0].lower() != _own_origin(request, hosts[0])):
            return "forbidden_origin", "requests from web pages of other origins are refused"
        fetch_site = headers.getRawHeaders(b"sec-fetch-site") or []
        if any(value.strip().lower() not in _SAME_ORIGIN_FETCH for value in fetch_site):
            return "forbidden_origin", "requests from web pages of other origins are refused"
        return None


def _own_origin(request: IRequest, host: bytes) -> bytes:
    scheme = b"https://" if request.isSecure() else b"http://"
    return scheme + host.lower()
