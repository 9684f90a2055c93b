"""``anonticket-admin`` (issue #14 items 7 and 8) against a real running daemon: token commands
and failed webhook events over the internal site's loopback tcp and unix socket (and mutual
TLS); backup while a write load runs, restored into a new directory that a daemon then serves
with the same balances and onion address; restores refused for a wrong key, a damaged or unsafe
archive, a non-empty target; the archive owner-only from its first byte."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from anonticket import __version__
from anonticket.admin import run
from anonticket.backup import known_schema
from anonticket.config import from_options
from anonticket.metrics import Metrics
from anonticket.onion import load_or_create_onion_key, onion_address
from anonticket.store import Store
from anonticket.tap import build

from .conftest import (
    daemon_config,
    get_json,
    post_json,
    reactor,
    running_daemon,
    tcp_port,
    transfer,
)
from .test_mtls import SERVER_NAME, pki  # noqa: F401 - the module's PKI fixture
from .webhookreceiver import Receiver

PID = "0123456789abcdef"
OTHER_PID = "fedcba9876543210"
AMOUNT = 918273645546  # distinctive: never in a log or in the admin's text about a token
ADMIN = str(Path(sys.executable).parent / "anonticket-admin")


async def admin(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    """The command in this process (the daemon under test shares the reactor)."""
    out, err = io.StringIO(), io.StringIO()
    code = await run(reactor, list(argv), out, err, io.StringIO(stdin or ""))
    return code, out.getvalue(), err.getvalue()


async def admin_process(*argv: str) -> tuple[int, str, str]:
    """The installed console script, as an operator runs it, without blocking the reactor."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONTICKET_")}
    out, err, code = await getProcessOutputAndValue(ADMIN, list(argv), env=env, reactor=reactor)
    return code, out.decode(), err.decode()


@dataclass
class Site:
    store: Store
    public_url: str
    internal_url: str | None  # for this test's own HTTP calls (tcp only)
    internal: str  # what anonticket-admin is given
    data_dir: Path


def _port(root: Any, name: str) -> int:
    return int(root.getServiceNamed(name).port.getHost().port)


@asynccontextmanager
async def unix_daemon(tmp_path: Path, **extra: str) -> AsyncIterator[Site]:
    # A short directory: a unix socket's path is limited to ~100 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="adm", dir="/tmp"))
    socket = sockets / "internal.sock"
    root = build(daemon_config(tmp_path, internal=f"unix:{socket}", **extra), reactor, Metrics())
    root.startService()
    try:
        yield Site(
            root.getServiceNamed("store").store,
            f"http://127.0.0.1:{_port(root, 'public-site')}",
            None,
            f"unix:{socket}",
            tmp_path,
        )
    finally:
        await root.stopService()
        shutil.rmtree(sockets, ignore_errors=True)


@asynccontextmanager
async def tcp_daemon(tmp_path: Path, **extra: str) -> AsyncIterator[Site]:
    async with running_daemon(daemon_config(tmp_path, **extra), tmp_path) as d:
        port = d.internal_url.rsplit(":", 1)[1]
        yield Site(
            d.store, d.public_url, d.internal_url, f"tcp:{port}:interface=127.0.0.1", tmp_path
        )


def daemon_on(transport: str, tmp_path: Path, **extra: str) -> Any:
    return (tcp_daemon if transport == "tcp" else unix_daemon)(tmp_path, **extra)


async def issue(site: Site, http: Any, pid: str = PID, txid: int = 1, amount: int = AMOUNT) -> str:
    await site.store.record_transfers([transfer(pid, txid, amount=amount)], now=1)
    code, body, _ = await post_json(http, site.public_url + "/api/v1/redeem", {"pid": pid})
    assert code == 200, body
    return str(body["service_token"])


def token_id(token: str) -> str:
    return hashlib.sha256(bytes.fromhex(token)).hexdigest()


# ----------------------------------------------------------------- tokens, over tcp and unix


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_show_revoke_unrevoke_and_ledger(transport, tmp_path, http, store_spend):
    async with daemon_on(transport, tmp_path) as site:
        token = await issue(site, http)
        await store_spend(site, token, 1000, "order-1", "one month")
        i = ("--internal", site.internal)

        code, out, err = await admin("show", token, *i, "--json")
        assert (code, err) == (0, "")
        shown = json.loads(out)
        assert shown["token_id"] == token_id(token)
        assert shown["token"]["balance"] == AMOUNT - 1000 and shown["token"]["status"] == "active"
        assert [e["kind"] for e in shown["ledger"]["entries"]] == ["spend", "credit"]
        assert shown["ledger"]["entries"][0]["memo"] == "one month"
        assert shown["revocations"] == []

        # The token from standard input; the text never shows it, only its id.
        code, out, err = await admin("show", "-", *i, stdin=token + "\n")
        assert code == 0, err
        assert token not in out and token_id(token) in out and "one month" in out
        assert f"{AMOUNT - 1000} atomic units" in out

        code, out, _ = await admin("revoke", token, *i, "--reason", "chargeback", "--json")
        revoked = json.loads(out)
        assert code == 0 and revoked["changed"] and revoked["token"]["status"] == "revoked"
        _, public, _ = await get_json(http, f"{site.public_url}/api/v1/token/{token}")
        assert public["status"] == "revoked"
        code, out, _ = await admin("revoke", token, *i, "--reason", "again")
        assert code == 0 and "already revoked" in out and "chargeback" in out

        code, _, err = await admin("unrevoke", token, *i)  # a reason is required
        assert code == 2 and "--reason" in err
        code, _, err = await admin("unrevoke", token, *i, "--reason", "  ")
        assert code == 2 and "--reason" in err
        code, out, err = await admin("unrevoke", token, *i, "--reason", "refund settled")
        assert code == 0, err
        assert "revocation undone" in out and token not in out
        _, public, _ = await get_json(http, f"{site.public_url}/api/v1/token/{token}")
        assert public["status"] == "active"
        code, out, _ = await admin("unrevoke", token, *i, "--reason", "twice")
        assert code == 0 and "not revoked: nothing changed" in out

        code, out, _ = await admin("show", token, *i)
        assert code == 0 and "revocations undone" in out
        assert "(chargeback)" in out and "(refund settled)" in out

        # The ledger, paged and whole.
        for n in range(2, 6):
            await store_spend(site, token, n, f"order-{n}", None)
        code, out, _ = await admin("ledger", token, *i, "--limit", "2", "--json")
        page = json.loads(out)
        assert code == 0 and len(page["entries"]) == 2 and page["next"]
        code, out, _ = await admin(
            "ledger", token, *i, "--limit", "2", "--before", page["next"], "--json"
        )
        assert [e["amount"] for e in json.loads(out)["entries"]] == [3, 2]
        code, out, _ = await admin("ledger", token, *i, "--limit", "2", "--all", "--json")
        whole = json.loads(out)
        assert [e["kind"] for e in whole["entries"]] == ["spend"] * 5 + ["credit"]
        assert whole["next"] is None


@pytest.fixture
def store_spend():
    """A spend made through the store, as the internal site makes one."""
    from anonticket.domain import ServiceToken
    from anonticket.store.records import SpendAnswer, SpendRequest

    async def make(site: Site, token: str, amount: int, key: str, memo: str | None) -> None:
        request = SpendRequest(ServiceToken.parse(token), amount, memo, key.encode())
        assert isinstance(await site.store.spend(request, 5), SpendAnswer)

    return make


@pytest_twisted.ensureDeferred
async def test_the_environment_names_the_site_and_errors_are_one_line(tmp_path, http, monkeypatch):
    async with tcp_daemon(tmp_path) as site:
        token = await issue(site, http)
        monkeypatch.setenv("ANONTICKET_INTERNAL", f"  {site.internal}  ")
        code, out, _ = await admin("show", token, "--json")
        assert code == 0 and json.loads(out)["token"]["balance"] == AMOUNT
        # Unknown token: 4; malformed: 2, never echoed; not the daemon: 1.
        code, out, err = await admin("show", "cd" * 32)
        assert (code, out) == (4, "") and "token_not_found" in err and err.count("\n") == 1
        almost = token[:-1] + "x"
        code, _, err = await admin("revoke", almost)
        assert code == 2 and almost not in err and err.startswith("anonticket-admin: error:")
        code, _, err = await admin("webhooks", "failed")
        assert code == 4 and "webhooks_disabled" in err
        code, _, err = await admin("show", token, "--internal", "tcp:1:interface=127.0.0.1")
        assert code == 1 and "cannot reach the internal site" in err and err.count("\n") == 1
        code, _, err = await admin("show", token, "--internal", "tcp:9180")
        assert code == 2 and "interface=" in err
        code, _, err = await admin("show", token, "--internal", "onion:80")
        assert code == 2
        assert token not in err


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_failed_webhook_events_are_listed_and_retried(transport, tmp_path, http):
    receiver = Receiver()
    url = receiver.listen()
    port = tcp_port(receiver.port)
    await receiver.stop()  # down: every attempt is refused
    try:
        extra = {"webhook-url": url, "webhook-retry-schedule": "1"}
        async with daemon_on(transport, tmp_path, **extra) as site:
            i = ("--internal", site.internal)
            await issue(site, http)
            await issue(site, http, OTHER_PID, 2)
            events: list[dict[str, Any]] = []
            for _ in range(100):
                code, out, err = await admin("webhooks", "failed", *i, "--json")
                assert code == 0, err
                events = json.loads(out)["events"]
                if len(events) == 2:
                    break
                await deferLater(reactor, 0.1, lambda: None)
            assert [(e["type"], e["attempts"]) for e in events] == [("token.issued", 2)] * 2
            code, out, _ = await admin("webhooks", "failed", *i, "--limit", "1", "--all")
            assert code == 0 and out.count("token.issued") == 2
            code, _, err = await admin("webhooks", "retry", *i)
            assert code == 2 and "--all" in err
            receiver.listen(port)
            first = events[0]["id"]
            code, out, err = await admin("webhooks", "retry", first, "msg_unknown", *i, "--json")
            assert code == 4 and json.loads(out) == {"retried": 1, "not_found": ["msg_unknown"]}
            await receiver.wait_for(1)
            code, out, _ = await admin("webhooks", "retry", "--all", *i)
            assert code == 0 and "retried: 1" in out
            await receiver.wait_for(2)
            code, out, _ = await admin("webhooks", "failed", *i)
            assert code == 0 and "no failed events" in out
    finally:
        await receiver.stop()
    assert sorted(d.event_id for d in receiver.accepted) == sorted(e["id"] for e in events)


@pytest_twisted.ensureDeferred
async def test_version_names_this_tool_and_the_running_daemon(tmp_path):
    async with unix_daemon(tmp_path) as site:
        code, out, err = await admin("version", "--internal", site.internal, "--json")
        assert (code, err) == (0, "")
        assert json.loads(out) == {
            "admin": {"version": __version__, "schema": known_schema()},
            "daemon": {"version": __version__},
        }
    # No daemon: this tool's version still, then the error.
    code, out, err = await admin("version", "--internal", site.internal)
    assert code == 1 and __version__ in out and "cannot reach" in err


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # Twisted's calls
@pytest_twisted.ensureDeferred
async def test_over_mutual_tls_with_a_client_certificate(tmp_path, http, pki):  # noqa: F811
    async with tcp_daemon(tmp_path, internal=pki.endpoint()) as site:
        token = await issue(site, http)
        tls = (
            "--ca-cert",
            str(pki.path("server-ca.pem")),
            "--server-name",
            SERVER_NAME,
        )
        port = site.internal.split(":")[1]
        mine = ("--client-cert", str(pki.path("client.pem")), "--client-key")
        url = ("--internal", f"https://127.0.0.1:{port}")
        code, out, err = await admin("show", token, *url, *tls, *mine, str(pki.path("client.key")))
        assert code == 0, err
        assert "active" in out
        # The daemon's own ssl: string works too; without a client certificate, no answer.
        code, out, err = await admin(
            "show",
            token,
            "--internal",
            pki.endpoint().replace("ssl:0", f"ssl:{port}"),
            *tls,
            *mine,
            str(pki.path("client.key")),
        )
        assert code == 0, err
        code, _, err = await admin("show", token, *url, *tls, "--timeout", "5")
        assert code == 1 and err.count("\n") == 1


# ----------------------------------------------------------------- backup and restore


@pytest.mark.slow  # the console script runs as its own process
@pytest_twisted.ensureDeferred
async def test_a_backup_taken_under_write_load_restores_to_a_daemon_with_the_same_balances(
    tmp_path, http
):
    data = tmp_path / "data"
    async with tcp_daemon(data) as site:
        seed = load_or_create_onion_key(data)  # as a daemon publishing its onion keeps it
        hot = await issue(site, http)
        still = await issue(site, http, OTHER_PID, 2, amount=777_000)
        # Some bulk, so that the copy takes a moment: unclaimed payments to other PIDs.
        bulk = [transfer(f"{n:016x}", 10 + n, amount=10**10) for n in range(1, 20_001)]
        for start in range(0, len(bulk), 2000):
            await site.store.record_transfers(bulk[start : start + 2000], now=1)
        spent: list[str] = []  # spend_ids, in the order the site answered them
        running = True

        async def load() -> None:
            n = 0
            while running:
                n += 1
                code, body, _ = await post_json(
                    http,
                    f"{site.internal_url}/api/v1/token/{hot}/spend",
                    {"amount": 1, "memo": f"m{n}"},
                    {"Idempotency-Key": f"k{n}"},
                )
                assert code == 200, body
                spent.append(body["spend_id"])

        loading = ensureDeferred(load())
        await deferLater(reactor, 0.3, lambda: None)
        before = len(spent)
        archive = tmp_path / "backup.tar"
        code, out, err = await admin_process(
            "backup", "--data-dir", str(data), str(archive), "--json"
        )
        during = len(spent) - before
        running = False
        await loading
        assert code == 0, err
        made = json.loads(out)
        assert during > 0, "the write load did not run while the backup was taken"
        assert os.stat(archive).st_mode & 0o777 == 0o600
        assert made["manifest"]["schema"] == known_schema()
        assert made["onion_address"] == onion_address(seed)
        original = await whole_ledger(hot, site.internal)
    restored = tmp_path / "restored"
    code, out, err = await admin("restore", str(archive), "--data-dir", str(restored))
    assert code == 0, err
    assert onion_address(seed) in out
    assert {p.name for p in restored.iterdir()} == {
        "anonticket.sqlite3",
        "secret.key",
        "onion.key",
    }
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in restored.iterdir())
    assert restored.stat().st_mode & 0o777 == 0o700
    assert (restored / "onion.key").read_bytes() == seed
    async with running_daemon(daemon_config(restored), restored) as again:
        _, token, _ = await get_json(http, f"{again.internal_url}/api/v1/token/{still}")
        assert (token["balance"], token["version"]) == (777_000, 1)
        _, token, _ = await get_json(http, f"{again.internal_url}/api/v1/token/{hot}")
        port = again.internal_url.rsplit(":", 1)[1]
        ledger = await whole_ledger(hot, f"tcp:{port}:interface=127.0.0.1")
    # A consistent moment: the spends answered before the copy began are in it, the ones after
    # its end are not, and what it holds is exactly the first ones, in order.
    in_copy = token["version"] - 1
    assert before <= in_copy <= before + during
    assert token["balance"] == AMOUNT - in_copy and token["spent"] == in_copy
    copied = [e["spend_id"] for e in ledger["entries"] if e["kind"] == "spend"]
    assert copied[::-1] == spent[:in_copy]
    assert original["entries"][-len(ledger["entries"]) :] == ledger["entries"]


async def whole_ledger(token: str, internal: str) -> dict[str, Any]:
    code, out, err = await admin("ledger", token, "--internal", internal, "--all", "--json")
    assert code == 0, err
    ledger: dict[str, Any] = json.loads(out)
    return ledger


async def made_backup(tmp_path: Path, http: Any) -> tuple[Path, str]:
    """A data directory with a token, backed up while the daemon runs; the archive and token."""
    data = tmp_path / "data"
    async with tcp_daemon(data) as site:
        load_or_create_onion_key(data)
        token = await issue(site, http)
        archive = tmp_path / "backup.tar"
        code, _, err = await admin("backup", "--data-dir", str(data), str(archive))
        assert code == 0, err
    return archive, token


def rewritten(
    archive: Path,
    out: Path,
    change: Any = None,
    manifest_change: Any = None,
    manifest: bool = True,
) -> Path:
    """A copy of the archive with its members passed through ``change(name, data)``, which
    returns the new (name, data) or None to drop it; the manifest is rewritten to match, then
    through ``manifest_change``, or left out (``manifest=False``)."""
    with tarfile.open(archive) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    listed = json.loads(dict(members)["manifest.json"])
    kept = []
    for name, data in members:
        changed = (name, data) if change is None or name == "manifest.json" else change(name, data)
        if changed is not None and name != "manifest.json":
            kept.append(changed)
    listed["files"] = {
        n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in kept
    }
    if manifest_change is not None:
        manifest_change(listed)
    head = [("manifest.json", json.dumps(listed).encode())] if manifest else []
    with tarfile.open(out, "w") as tar:
        for name, data in [*head, *kept]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest_twisted.ensureDeferred
async def test_a_restore_with_another_secret_key_is_refused_before_anything_is_written(
    tmp_path, http
):
    archive, _ = await made_backup(tmp_path, http)
    other = rewritten(
        archive,
        tmp_path / "other-key.tar",
        lambda n, d: (n, os.urandom(32)) if n == "secret.key" else (n, d),
    )
    target = tmp_path / "target"
    code, out, err = await admin("restore", str(other), "--data-dir", str(target))
    assert (code, out) == (3, "")
    assert "secret.key is not the key this database was written with" in err
    assert not target.exists()  # the directory made for it is gone again, nothing left
    target.mkdir()
    code, _, _ = await admin("restore", str(other), "--data-dir", str(target))
    assert code == 3 and list(target.iterdir()) == []
    # Without any secret.key at all: refused as well.
    keyless = rewritten(
        archive, tmp_path / "keyless.tar", lambda n, d: None if n == "secret.key" else (n, d)
    )
    code, _, err = await admin("restore", str(keyless), "--data-dir", str(target))
    assert code == 3 and "secret.key" in err and list(target.iterdir()) == []
    # The real one restores into that empty directory.
    code, _, err = await admin("restore", str(archive), "--data-dir", str(target))
    assert code == 0, err


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def _raw_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **kind: Any) -> None:
    info = tarfile.TarInfo(name)
    for key, value in kind.items():
        setattr(info, key, value)
    if info.isreg():
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


# Each damage, and what the refusal must name (the check that caught it).
DAMAGES = {
    "byte_in_database": "not what was backed up",
    "byte_in_database_and_manifest": "database is damaged",
    "truncated": "damaged or unreadable",
    "traversal": "'../evil', which no anonticket backup holds",
    "absolute": "evil', which no anonticket backup holds",
    "symlink": "pass.key is not a regular file",
    "hardlink": "pass.key is not a regular file",
    "directory": "pass.key is not a regular file",
    "duplicate": "secret.key twice",
    "unlisted": "unlisted ['pass.key']",
    "no_manifest": "has no manifest.json",
    "newer_schema": "newer than this anonticket knows",
    "not_a_tar": "not a tar archive",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest_twisted.ensureDeferred
async def test_a_damaged_or_unsafe_archive_is_refused(tmp_path, http, damage):
    archive, _ = await made_backup(tmp_path, http)
    bad = tmp_path / "bad.tar"
    outside = tmp_path / "evil"
    raw = archive.read_bytes()
    if damage == "byte_in_database":
        # A flipped byte in the database member's data: its SHA-256 no longer matches.
        with tarfile.open(archive) as tar:
            member = tar.getmember("anonticket.sqlite3")
        bad.write_bytes(_flip(raw, member.offset_data + 5000))
    elif damage == "byte_in_database_and_manifest":
        # Altered with a manifest to match: SQLite's own check, or the key check, refuses.
        bad = rewritten(
            archive,
            bad,
            lambda n, d: (
                (n, d[:4096] + b"\xff" * 4096 + d[8192:]) if n == "anonticket.sqlite3" else (n, d)
            ),
        )
    elif damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "not_a_tar":
        bad.write_bytes(os.urandom(4096))
    elif damage == "newer_schema":
        bad = rewritten(archive, bad, manifest_change=lambda m: m.update(schema=known_schema() + 1))
    elif damage == "no_manifest":
        bad = rewritten(archive, bad, manifest=False)
    else:
        shutil.copy(archive, bad)
        with tarfile.open(bad, "a") as tar:
            if damage == "traversal":
                _raw_member(tar, f"../{outside.name}")
            elif damage == "absolute":
                _raw_member(tar, str(outside))
            elif damage == "symlink":
                _raw_member(tar, "pass.key", type=tarfile.SYMTYPE, linkname=str(outside))
            elif damage == "hardlink":
                _raw_member(tar, "pass.key", type=tarfile.LNKTYPE, linkname="secret.key")
            elif damage == "directory":
                _raw_member(tar, "pass.key", type=tarfile.DIRTYPE)
            elif damage == "duplicate":
                _raw_member(tar, "secret.key", os.urandom(32))
            elif damage == "unlisted":
                _raw_member(tar, "pass.key", b"{}")
    bad.chmod(0o600)
    target = tmp_path / "target"
    code, out, err = await admin("restore", str(bad), "--data-dir", str(target))
    assert (code, out) == (3, ""), err
    assert err.count("\n") == 1 and DAMAGES[damage] in err
    assert not target.exists() and not outside.exists()
    assert not list(tmp_path.glob(".restore-*"))


@pytest_twisted.ensureDeferred
async def test_restore_refuses_a_non_empty_target_and_backup_an_existing_archive(tmp_path, http):
    archive, _ = await made_backup(tmp_path, http)
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code, _, err = await admin("restore", str(archive), "--data-dir", str(target))
    assert code == 3 and "not empty" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    code, _, err = await admin("backup", "--data-dir", str(tmp_path / "data"), str(archive))
    assert code == 3 and "exists" in err
    code, _, err = await admin(
        "backup", "--data-dir", str(tmp_path / "missing"), str(tmp_path / "b.tar")
    )
    assert code == 1 and err.count("\n") == 1


@pytest_twisted.ensureDeferred
async def test_the_archive_is_owner_only_from_its_first_byte(tmp_path, http):
    """With a umask that would make files world-readable, the archive (and everything on the
    way to it) is 0600: it is created so, under a temporary name, and linked into place."""
    data = tmp_path / "data"
    async with tcp_daemon(data) as site:
        await issue(site, http)
        old = os.umask(0)
        seen: set[int] = set()
        try:
            archive = tmp_path / "b.tar"
            watching = True

            async def watch() -> None:
                while watching:
                    for path in tmp_path.iterdir():
                        if path.is_file() and path.suffix in (".tar", ".partial"):
                            seen.add(path.stat().st_mode & 0o777)
                    await deferLater(reactor, 0, lambda: None)

            watcher = ensureDeferred(watch())
            code, _, err = await admin("backup", "--data-dir", str(data), str(archive))
            watching = False
            await watcher
        finally:
            os.umask(old)
        assert code == 0, err
        assert archive.stat().st_mode & 0o777 == 0o600
        assert seen <= {0o600}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest_twisted.ensureDeferred
async def test_postgresql_keys_only_and_a_restore_checked_against_the_database(
    tmp_path, http, pg_server
):
    database = pg_server.new_database()
    data = tmp_path / "data"
    async with tcp_daemon(data, database=database) as site:
        token = await issue(site, http)
        archive = tmp_path / "keys.tar"
        code, out, err = await admin(
            "backup", "--data-dir", str(data), "--database", database, str(archive)
        )
        assert code == 0, err
        assert "pg_dump --format=custom" in err and "keys only" in out
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "secret.key"]
    target = tmp_path / "target"
    code, _, err = await admin("restore", str(archive), "--data-dir", str(target))
    assert code == 3 and "pg_restore" in err and not target.exists()
    # Another database, with another key: refused.
    foreign = pg_server.new_database()
    other = Store(reactor, foreign, tmp_path / "other")
    other.open()
    await other.record_transfers([transfer(PID, 1)], now=1)
    other.close()
    code, _, err = await admin(
        "restore", str(archive), "--data-dir", str(target), "--database", foreign
    )
    assert code == 3 and "not the key" in err and not target.exists()
    code, out, err = await admin(
        "restore", str(archive), "--data-dir", str(target), "--database", database
    )
    assert code == 0, err
    config = from_options(
        {
            "data-dir": str(target),
            "database": database,
            "public": "tcp:0:interface=127.0.0.1",
            "internal": "tcp:0:interface=127.0.0.1",
            "no-monitor": True,
        },
        environ={},
    )
    async with running_daemon(config, target) as again:
        _, body, _ = await get_json(http, f"{again.internal_url}/api/v1/token/{token}")
        assert body["balance"] == AMOUNT
