"""A private Tor network on 127.0.0.1 for tests: directory authorities, relays, one client tor
with a SOCKS port and one "service" tor whose control port a daemon attaches to (to publish an
onion service with ADD_ONION).  Standard library only; the API is synchronous and blocking.

    with TorNetwork() as net:                 # keys, torrcs, authorities and relays started
        socks_port = net.client_tor()         # waits for the core's consensus, then starts it
        control = net.service_tor()           # "unix:/tmp/tn-.../svc/control" (cookie auth)
        net.wait_ready(90)                    # every started tor bootstrapped to 100 %
        ...                                   # txtorcon.connect(control) -> create_onion_service
                                              # -> fetch through tcp:127.0.0.1:<socks_port>
        net.torrc_lines_for_network()         # for one more tor (e.g. txtorcon.launch) to join

Set TOR_PRIVNET_KEEP=1 to keep the work directory (torrcs, notice.log of every tor).

Facts this relies on (tor 0.4.9.11; see shared/research/tor-local.md):

* Onion circuits need at least 4 relays, authorities included (with 3, "Failed to find node for
  hop #3").  The default layout is 1 authority + 3 relays: one authority means one tor-gencert
  run (~0.6 s each) and no inter-authority voting, and it was as fast as 3 authorities + 2 relays.
* Consensuses come every 10 s (the shortest valid voting schedule), aligned to the wall clock.
  Relays that publish their descriptor late miss the first vote, and a client that bootstraps
  from such a partial consensus stalls for 10-30 s.  So the client and service tors start only
  once every directory server has a consensus and microdescriptors listing every relay.
* By default relays are no directory caches (``DirCache 0``), so clients fetch everything from
  the authorities, which hold it the moment the consensus is made.  With caches, a client that
  asks a relay before the relay has fetched gets a 404 and retries ~10 s later, so one has to
  wait for every relay too: 20-25 s to ready instead of 10-18 s here.  The price: only the
  authorities are HSDirs, which is all an onion service needs.
* Every tor is our direct child (no RunAsDaemon) with ``PR_SET_PDEATHSIG`` = SIGKILL.  Linux sends
  it when the *thread* that forked the child ends, so one long-lived thread forks them all: a
  call from a short-lived pool thread cannot kill its tors by finishing, and the end of the test
  process (or of that thread, after :meth:`TorNetwork.stop`) kills any survivor.
* Everything binds to 127.0.0.1 and the DirAuthority lines replace the public authorities, so no
  tor here ever tries the internet.  Unix socket paths must stay under ~100 bytes, hence the
  short work directory in /tmp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .children import Forker, dies_with_parent

TOR = "tor"
GENCERT = "tor-gencert"
HOST = "127.0.0.1"
STOP_GRACE = 5.0  # seconds after SIGTERM before SIGKILL (a tor once hung on SIGTERM)
POLL = 0.25

T = TypeVar("T")

# Lines every tor of the network carries; {dir} is its own directory.
_COMMON = """\
TestingTorNetwork 1
Nickname {name}
DataDirectory {dir}
PidFile {dir}/pid
Log notice file {dir}/notice.log
SafeLogging 0
ShutdownWaitLength 0
ControlPort unix:{dir}/control
CookieAuthentication 1
SocksPort {socks}
ClientUseIPv6 0
PathsNeededToBuildCircuits 0.25
"""
# GeoIP parsing alone costs ~0.8 CPU-s per tor at start-up: point it at an empty file.
_NETWORK = """\
GeoIPFile {base}/empty
GeoIPv6File {base}/empty
"""
_AUTHORITY = """\
Address {host}
ORPort {host}:{orport}
DirPort {host}:{dirport}
AddressDisableIPv6 1
ExitRelay 0
AssumeReachable 1
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
TestingV3AuthInitialVotingInterval 10
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVotingInterval 10
V3AuthVoteDelay 2
V3AuthDistDelay 2
V3AuthNIntervalsValid 2
TestingDirAuthVoteGuard *
TestingDirAuthVoteHSDir *
TestingMinExitFlagThreshold 0
"""
_RELAY = """\
Address {host}
ORPort {host}:{orport}
AddressDisableIPv6 1
ExitRelay 0
AssumeReachable 1
"""
# A caching relay fetches early, to have the directory before the clients ask it.
_DIRCACHE = {
    True: "DirCache 1\nFetchDirInfoEarly 1\nFetchDirInfoExtraEarly 1\n",
    False: "DirCache 0\n",
}


def available() -> bool:
    return shutil.which(TOR) is not None and shutil.which(GENCERT) is not None


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open while choosing, so no duplicates)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<{exc}>"


class TorControlError(Exception):
    pass


class TorControl:
    """A minimal control-port client over a unix socket with cookie authentication."""

    def __init__(self, socket_path: Path, cookie_path: Path, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(socket_path))
            self._file = self._sock.makefile("rb")
            self.command("AUTHENTICATE " + cookie_path.read_bytes().hex())
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> TorControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self) -> str:
        raw = self._file.readline()
        if not raw:
            raise ConnectionError("tor closed the control connection")
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def command(self, line: str) -> list[str]:
        """Send one command; return the reply's lines (a data block as one multi-line item)."""
        self._sock.sendall(line.encode() + b"\r\n")
        replies: list[str] = []
        while True:
            text = self._line()
            code, kind, rest = text[:3], text[3:4], text[4:]
            if kind == "+":
                data = [rest]
                while (more := self._line()) != ".":
                    data.append(more[1:] if more.startswith(".") else more)
                rest = "\n".join(data)
            replies.append(rest)
            if kind == " ":
                if not code.startswith("2"):
                    raise TorControlError(f"{line.split()[0]}: {text}")
                return replies

    def getinfo(self, key: str) -> str:
        return self.command(f"GETINFO {key}")[0].removeprefix(f"{key}=").lstrip("\n")


@dataclass
class TorNode:
    name: str
    role: str  # "authority", "relay", "client" or "service"
    dir: Path
    orport: int = 0
    dirport: int = 0
    socks: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # One kept connection for polling: tor logs every new one, which would bury its log.
    _control: TorControl | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def control_path(self) -> Path:
        return self.dir / "control"

    def control(self, timeout: float = 5.0) -> TorControl:
        """A new control connection (the caller closes it)."""
        return TorControl(self.control_path, self.dir / "control_auth_cookie", timeout)

    def query(self, key: str) -> str | None:
        """GETINFO ``key``, or None while the tor is not answering yet."""
        with self._lock:
            try:
                if self._control is None:
                    self._control = self.control()
                return self._control.getinfo(key)
            except TorControlError:
                return None  # e.g. 551 while tor has no answer yet: the connection is fine
            except OSError:
                self.disconnect_locked()
                return None

    def disconnect(self) -> None:
        with self._lock:
            self.disconnect_locked()

    def disconnect_locked(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    def diagnostics(self) -> str:
        code = None if self.process is None else self.process.poll()
        state = "not started" if self.process is None else f"exit code {code}"
        if code is None and self.process is not None:
            state = f"running, {self.query('status/bootstrap-phase')}"
        return f"--- {self.name} ({self.role}; {state})\n{_tail(self.dir / 'notice.log')}"


class TorNetwork:
    """Start with ``with`` or :meth:`start`; always :meth:`stop` (``with`` does).  ``timings``
    collects seconds since :meth:`start` for the stages reached."""

    def __init__(
        self,
        authorities: int = 1,
        relays: int = 3,
        relay_dircache: bool = False,
        keep: bool | None = None,
    ) -> None:
        if authorities < 1 or authorities + relays < 4:
            raise ValueError("onion circuits need at least 4 relays, authorities included")
        self.base = Path(tempfile.mkdtemp(prefix="tn-", dir="/tmp"))
        self.keep = bool(os.environ.get("TOR_PRIVNET_KEEP")) if keep is None else keep
        ports = iter(free_ports(2 * authorities + relays))
        self.authorities = [
            TorNode(f"a{i}", "authority", self.base / f"a{i}", next(ports), next(ports))
            for i in range(authorities)
        ]
        self.relays = [
            TorNode(f"r{i}", "relay", self.base / f"r{i}", next(ports)) for i in range(relays)
        ]
        self.core = self.authorities + self.relays
        self.relay_dircache = relay_dircache
        self.extra: dict[str, TorNode] = {}
        self.timings: dict[str, float] = {}
        self._dir_authorities: list[str] = []
        self._started = 0.0
        self._forker: Forker | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> TorNetwork:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            self._started = time.monotonic()
            self._forker = Forker("tor-privnet-forker")
            (self.base / "empty").touch()
            for node in self.core:
                node.dir.mkdir(mode=0o700)
            self._dir_authorities = [self._authority_keys(node) for node in self.authorities]
            self._mark("keys")
            for node in self.core:
                self._launch(node)
            self._mark("core started")

    def stop(self) -> None:
        """Stop every tor by PID (SIGTERM, then SIGKILL), then the forking thread."""
        with self._lock:
            for node in [*self.extra.values(), *self.core]:
                node.disconnect()
            nodes = [*self.extra.values(), *self.core]
            processes = [n.process for n in nodes if n.process is not None]
            for process in processes:
                process.terminate()  # a no-op for one already reaped
            deadline = time.monotonic() + STOP_GRACE
            for process in processes:
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._forker is not None:
                self._forker.close()
                self._forker = None
            if not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------ extra tors

    def client_tor(self, timeout: float = 90.0) -> int:
        """Start (once) a client tor with a SOCKS port; return the port."""
        node = self._extra("client", timeout, socks=True)
        return node.socks

    def service_tor(self, timeout: float = 90.0) -> str:
        """Start (once) a tor for a daemon to attach to; return its control endpoint string
        (Twisted client endpoint syntax; authenticate with the cookie, as txtorcon does)."""
        node = self._extra("service", timeout, socks=False)
        return f"unix:{node.control_path}"

    @property
    def client_socks_endpoint(self) -> str:
        return f"tcp:{HOST}:{self.client_tor()}"

    def torrc_lines_for_network(self) -> list[str]:
        """What any other tor needs in its config to join this network (and nothing else):
        for txtorcon, ``key, value = line.split(" ", 1)`` (DirAuthority repeats)."""
        lines = ["TestingTorNetwork 1", *self._dir_authorities]
        lines += ["ClientUseIPv6 0", "PathsNeededToBuildCircuits 0.25"]
        return lines + _NETWORK.format(base=self.base).splitlines()

    def _extra(self, role: str, timeout: float, socks: bool) -> TorNode:
        with self._lock:
            if role not in self.extra:
                self.wait_core(timeout)
                name = {"client": "c0", "service": "svc"}[role]
                node = TorNode(name, role, self.base / name)
                if socks:
                    node.socks = free_ports(1)[0]
                node.dir.mkdir(mode=0o700)
                self._launch(node)
                self.extra[role] = node
            return self.extra[role]

    # ------------------------------------------------------------------ waiting

    def wait_core(self, timeout: float = 90.0) -> None:
        """Until every directory server (authorities, and relays if they cache) has a consensus
        and microdescriptors listing every relay, so no client bootstraps from a partial one."""
        if "core consensus" in self.timings:
            return
        want = len(self.core)

        def complete(node: TorNode) -> bool:
            ns, md = node.query("ns/all"), node.query("md/all")
            if ns is None or md is None:
                return False
            routers = sum(line.startswith("r ") for line in ns.splitlines())
            micro = sum(line.startswith("ntor-onion-key ") for line in md.splitlines())
            return routers >= want and micro >= want

        servers = self.core if self.relay_dircache else self.authorities
        self._poll("core consensus", timeout, lambda: all(complete(n) for n in servers))

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the core has its consensus and every started client/service tor reports
        bootstrapped 100 %."""
        deadline = time.monotonic() + timeout
        self.wait_core(timeout)

        def bootstrapped() -> bool:
            return all(
                "PROGRESS=100" in (node.query("status/bootstrap-phase") or "")
                for node in self.extra.values()
            )

        self._poll("ready", max(0.0, deadline - time.monotonic()), bootstrapped)

    def _poll(self, stage: str, timeout: float, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if done():
                self._mark(stage)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"tor network not {stage} after {timeout:g} s\n{self.report()}")
            time.sleep(POLL)

    def _check_alive(self) -> None:
        for node in [*self.core, *self.extra.values()]:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"tor {node.name} exited\n{node.diagnostics()}")

    def report(self) -> str:
        return "\n".join(n.diagnostics() for n in [*self.core, *self.extra.values()])

    def _mark(self, stage: str) -> None:
        self.timings[stage] = round(time.monotonic() - self._started, 2)

    # ------------------------------------------------------------------ processes

    def _run(self, argv: list[str], stdin: bytes = b"") -> str:
        assert self._forker is not None
        preexec = dies_with_parent()
        done = self._forker.call(
            lambda: subprocess.run(
                argv, input=stdin, capture_output=True, timeout=60, preexec_fn=preexec
            )
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout!r} {done.stderr!r}")
        return done.stdout.decode()

    def _authority_keys(self, node: TorNode) -> str:
        """Make the authority's v3 keys and relay identity; return its DirAuthority line."""
        keys = node.dir / "keys"
        keys.mkdir(mode=0o700)
        self._run(
            [
                GENCERT, "--create-identity-key", "-m", "12",
                "-a", f"{HOST}:{node.dirport}",
                "-i", str(keys / "authority_identity_key"),
                "-s", str(keys / "authority_signing_key"),
                "-c", str(keys / "authority_certificate"),
                "--passphrase-fd", "0",
            ],
            stdin=b"\n",
        )  # fmt: skip
        cert = (keys / "authority_certificate").read_text()
        v3ident = next(
            line.split()[1] for line in cert.splitlines() if line.startswith("fingerprint ")
        )
        self._run(
            [
                TOR, "--list-fingerprint", "--quiet", "--ignore-missing-torrc",
                "-f", "/nonexistent", "--defaults-torrc", "/dev/null",
                "--DataDirectory", str(node.dir), "--Nickname", node.name,
                "--ORPort", f"{HOST}:{node.orport}", "--Address", HOST,
            ]
        )  # fmt: skip
        fingerprint = (node.dir / "fingerprint").read_text().split()[1]
        return (
            f"DirAuthority {node.name} orport={node.orport} v3ident={v3ident} "
            f"{HOST}:{node.dirport} {fingerprint}"
        )

    def _torrc(self, node: TorNode) -> str:
        socks = f"{HOST}:{node.socks}" if node.socks else "0"
        text = _COMMON.format(name=node.name, dir=node.dir, socks=socks)
        text += _NETWORK.format(base=self.base) + "\n".join(self._dir_authorities) + "\n"
        if node.role == "authority":
            text += _AUTHORITY.format(host=HOST, orport=node.orport, dirport=node.dirport)
        elif node.role == "relay":
            text += _RELAY.format(host=HOST, orport=node.orport) + _DIRCACHE[self.relay_dircache]
        return text

    def _launch(self, node: TorNode) -> None:
        assert self._forker is not None
        torrc = node.dir / "torrc"
        torrc.write_text(self._torrc(node))
        argv = [TOR, "-f", str(torrc), "--defaults-torrc", "/dev/null"]
        preexec = dies_with_parent()

        def spawn() -> subprocess.Popen[bytes]:
            with open(node.dir / "stdout.log", "wb") as out:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=node.dir,
                    preexec_fn=preexec,
                )

        node.process = self._forker.call(spawn)

    def pids(self) -> Iterator[int]:
        for node in [*self.core, *self.extra.values()]:
            if node.process is not None:
                yield node.process.pid
