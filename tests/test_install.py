"""A production install: ``pip install`` of the built wheel, without the test tools, gives a
working ``twistd anonticket`` and the commands (issue #14 item 1)."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .monero_regtest import free_port

REPO = Path(__file__).resolve().parent.parent


def listed_packages() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return {p.strip() for p in config["options"]["packages"].split() if p.strip()}


def test_every_package_is_in_the_distribution() -> None:
    """A package left out of setup.cfg works in the checkout and is missing once installed."""
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "anonticket").rglob("__init__.py")
    }
    assert found, "no packages found"
    assert found | {"twisted.plugins"} == listed_packages()


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel and its runtime dependencies only."""
    work = tmp_path_factory.mktemp("install")
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(work / "dist"), str(REPO)]
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("anonticket-*.whl")
    venv = work / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    done = run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)])
    assert done.returncode == 0, done.stderr
    return venv


@pytest.mark.slow  # builds a wheel and a virtualenv, installs from the package index
def test_the_wheel_installs_the_daemon_and_commands_without_test_tools(
    installed: Path, tmp_path: Path
) -> None:
    bin_ = installed / "bin"
    python = str(bin_ / "python")
    # Run from elsewhere: nothing may come from this checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = run(
        [
            python,
            "-c",
            "import anonticket, sys; print(anonticket.__file__, anonticket.__version__)",
        ],
        cwd=tmp_path,
        env=env,
    )
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(installed), path
    for tool in ("pytest", "hypothesis", "mypy", "ruff", "schemathesis", "psycopg"):
        probe = run([python, "-c", f"import {tool}"], cwd=tmp_path, env=env)
        assert probe.returncode != 0, f"{tool} is installed by a production install"
    assert (
        run([str(bin_ / "anonticket-client"), "--version"], env=env)
        .stdout.strip()
        .endswith(version)
    )
    admin = run([str(bin_ / "anonticket-admin"), "version"], env=env, cwd=tmp_path)
    assert version in admin.stdout, admin.stdout + admin.stderr
    help_ = run([str(bin_ / "twistd"), "--help"], env=env, cwd=tmp_path)
    assert "anonticket" in help_.stdout, help_.stdout + help_.stderr

    # The daemon from the install: its migrations (package data) make a database.
    internal = free_port()
    daemon = subprocess.Popen(
        [str(bin_ / "twistd"), "-n", "--pidfile=", "anonticket", "--no-monitor",
         "--data-dir", str(tmp_path / "data"), "--log-format", "json",
         "--public", f"tcp:{free_port()}:interface=127.0.0.1",
         "--internal", f"tcp:{internal}:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{internal}/healthz", timeout=5) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    daemon.kill()
                    raise AssertionError(daemon.communicate(timeout=30)[0].decode()) from None
                time.sleep(0.2)
    finally:
        daemon.terminate()
        output, _ = daemon.communicate(timeout=30)
    assert health["status"] == "ok" and health["store"] == "ok", health
    lines = [json.loads(line) for line in output.decode().splitlines()]
    assert any("database migrated to schema version" in r["message"] for r in lines), lines
