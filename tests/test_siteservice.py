"""SiteService binds where twistd expects a listener to: in privilegedStartService, before the
process gives up its privileges (as Twisted's StreamServerEndpointService does), except a unix
socket, which is made in startService as the daemon's own user, once the data directory exists.
startService alone (the onion's local site) still binds."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.web.resource import Resource

from anonticket.metrics import Metrics
from anonticket.tap import AnonticketService
from anonticket.web.service import SiteService, StartupError
from anonticket.web.site import PrivacySite

from .conftest import reactor, tcp_port


def _site(name: str = "public") -> PrivacySite:
    return PrivacySite(Resource(), name=name, metrics=Metrics(), clock=reactor)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """sun_path holds ~100 bytes; pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_a_tcp_site_binds_in_privileged_start_and_keeps_that_port() -> None:
    service = SiteService(reactor, "public", "tcp:0:interface=127.0.0.1", _site())
    service.privilegedStartService()
    try:
        port = service.port
        assert port is not None and not service.running
        bound = tcp_port(port)
        assert _connects(bound)
        service.startService()  # twistd's second call: no second listener
        assert service.running and service.port is port
    finally:
        await service.stopService()
    assert service.port is None and not _connects(bound)


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_is_made_in_start_where_the_data_directory_then_exists(
    short_dir: Path,
) -> None:
    data = short_dir / "data"  # made by the store as it starts, after privilegedStartService
    path = data / "internal.sock"
    service = SiteService(reactor, "internal", f"unix:{path}:mode=600", _site("internal"))
    service.privilegedStartService()
    assert service.port is None and not path.exists()
    data.mkdir(mode=0o700)
    service.startService()
    try:
        assert service.port is not None and path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_start_alone_binds_as_the_onion_starts_its_local_site() -> None:
    service = SiteService(reactor, "public", "tcp:0:interface=127.0.0.1", _site())
    service.startService()
    try:
        assert service.running and service.port is not None
        assert _connects(tcp_port(service.port))
    finally:
        await service.stopService()


def test_a_port_in_use_stops_privileged_start_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        description = f"tcp:{taken}:interface=127.0.0.1"
        service = SiteService(reactor, "public", description, _site())
        with pytest.raises(StartupError) as refused:
            service.privilegedStartService()
        assert "cannot listen" in str(refused.value) and service.port is None
        root = AnonticketService()
        SiteService(reactor, "public", description, _site()).setServiceParent(root)
        with pytest.raises(SystemExit) as stopped:
            root.privilegedStartService()
    message = str(stopped.value)
    assert message.startswith(f"anonticket: --public: cannot listen on '{description}'")
    assert "\n" not in message
