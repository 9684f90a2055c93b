"""Run the real ``twistd -n anonticket`` as a child process for end-to-end tests (blocking API)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anonticket.client import SOCKS_ENV

from .children import dies_with_parent
from .monero_regtest import free_port

TWISTD = str(Path(sys.executable).parent / "twistd")
REPO = Path(__file__).resolve().parent.parent
CLIENT = [str(Path(sys.executable).parent / "anonticket-client")]  # the console script


class Daemon:
    def __init__(
        self,
        data_dir: Path,
        *args: str,
        public: str | None = None,
        internal: str | None = None,
        umask: int | None = None,
    ) -> None:
        """``public``/``internal``: the endpoints; default free loopback TCP ports.  ``umask``:
        the one the daemon inherits (default: the test's)."""
        self.data_dir = data_dir
        self.public_port = free_port()
        self.public = public or f"tcp:{self.public_port}:interface=127.0.0.1"
        self.internal_port = free_port()
        self.internal = internal or f"tcp:{self.internal_port}:interface=127.0.0.1"
        self.umask = umask
        self.args = list(args)
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    def start(self, wait: bool = True) -> Daemon:
        argv = [
            TWISTD,
            "-n",
            "--pidfile=",
            "anonticket",
            "--data-dir",
            str(self.data_dir),
            "--public",
            self.public,
            "--internal",
            self.internal,
            *self.args,
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=dies_with_parent(umask=self.umask),
            )
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log_text()
            try:
                self.get("/metrics")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"daemon did not listen:\n{self.log_text()}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.internal_url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def health(self) -> dict[str, Any]:
        answer = json.loads(self.get("/healthz")[1])
        assert isinstance(answer, dict), answer
        return answer

    def metric(self, line_prefix: str) -> float:
        text = self.get("/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_for_height(self, height: int, timeout: float = 30) -> dict[str, Any]:
        """Until the monitor has acted on this wallet height (or higher): it trusts a height
        once two polls in a row have seen it, so this is the poll after the first one that
        saw it."""
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            health = self.health()
            if (health.get("trusted_height") or 0) >= height and health["status"] == "ok":
                return health
            time.sleep(0.05)
        raise AssertionError(f"monitor never reached {height}: {health}\n{self.log_text()}")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_client(
    *argv: str, command: Sequence[str] = CLIENT, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``anonticket-client`` as a user would; a developer's own ``ANONTICKET_SOCKS`` is left
    out so it cannot reroute a test (pass it in *env* to set it)."""
    environ = {k: v for k, v in os.environ.items() if k != SOCKS_ENV}
    return subprocess.run(
        [*command, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
        env={**environ, **env},
    )


def client(*args: str) -> tuple[int, Any]:
    """Run ``anonticket-client ... --json``; (exit code, parsed JSON or the raw output)."""
    result = run_client(*args, "--json")
    try:
        return result.returncode, json.loads(result.stdout)
    except ValueError:
        return result.returncode, result.stdout + result.stderr
