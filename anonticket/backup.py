"""Backups of a data directory into one owner-only archive, and their restore (docs/admin.md).

An archive is a plain tar of regular files with flat names: ``manifest.json`` (the format, the
anonticket version and schema, when, and the SHA-256 and size of every other member), the
database (SQLite: a snapshot made with SQLite's online backup API while the daemon runs; with
PostgreSQL there is none: pg_dump it) and the key files of the data directory.

Which files, and why:

* ``secret.key``: every PID and token is stored as a tag keyed with it; without it the database
  is useless.  Required.
* ``onion.key``: the onion address; a new key is a new address users do not know.
* ``pass.key``: passes sold so far verify only with it.
* ``webhook.secret``, ``webhook.key``, ``webhook.pub``: the receivers were given the secret or
  the public key; a new one would make them refuse every event until reconfigured.
* not ``node.id``: a node's own id on the events it leases.  Restored onto a second node of the
  same PostgreSQL database, a copy would let the two release each other's leases; a new one is
  made at start, and leases of the old one run out within a minute.
* not ``onion_hostname`` (rewritten from ``onion.key`` at start), ``tor/`` (tor rebuilds it),
  ``public.sock``, nor the SQLite ``-wal``/``-shm`` files (the snapshot is self-contained).

Everything here blocks (files, SQLite): ``anonticket-admin`` runs it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from anonticket import __version__
from anonticket.keys import (
    SECRET_KEY_BYTES,
    SECRET_KEY_FILE,
    DataDirError,
    fsync_dir,
    read_private_file,
)
from anonticket.onion import ONION_KEY_FILE, SEED_BYTES, onion_address
from anonticket.passes.issuer import KEY_FILE as PASS_KEY_FILE
from anonticket.store.dialect import Dialect, SQLiteDialect, dialect_for
from anonticket.store.keycheck import check_key
from anonticket.webhook.signing import PUBLIC_KEY_FILE, SECRET_FILE, SIGNING_KEY_FILE

FORMAT: Final = "anonticket-backup"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "manifest.json"
DATABASE_MEMBER: Final = "anonticket.sqlite3"
DEFAULT_DATABASE_FILE: Final = "anonticket.sqlite3"  # as config.py names it in the data dir
# The key files, in the order a restore moves them into place: secret.key last, so that an
# interrupted restore never leaves a directory a daemon would start on (a database holding
# payments without its key is refused at start).
KEY_FILES: Final = (
    ONION_KEY_FILE,
    PASS_KEY_FILE,
    SECRET_FILE,
    SIGNING_KEY_FILE,
    PUBLIC_KEY_FILE,
    SECRET_KEY_FILE,
)
MAX_KEY_FILE: Final = 64 * 1024
MAX_MANIFEST: Final = 64 * 1024
_FIXED_SIZE: Final = {SECRET_KEY_FILE: SECRET_KEY_BYTES, ONION_KEY_FILE: SEED_BYTES}
_COPY_CHUNK: Final = 1 << 20


class BackupError(Exception):
    """A backup or restore that cannot go on; the message is one line.  ``refused``: a check
    failed (the archive, the target or the key), as opposed to a file or database failure."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def known_schema() -> int:
    """The newest schema this version's migrations reach."""
    return max(version for version, _ in SQLiteDialect("").migrations())


def redacted(url: str) -> str:
    """A database URL fit to print: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(int(timestamp), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:200])


# ------------------------------------------------------------------------------- backup


@dataclass(frozen=True)
class BackupResult:
    archive: Path
    manifest: dict[str, Any]
    onion_address: str | None


def backup(data_dir: Path, database: str, out: Path, *, now: float | None = None) -> BackupResult:
    """Write the archive ``out`` (refused if it exists): created 0600 under a temporary name in
    its directory and linked into place whole, so it is never readable by others nor seen half
    written.  The database snapshot's key check is verified against ``secret.key`` first: a
    backup that could not be restored is not made."""
    if os.path.lexists(out):
        raise BackupError(f"{out} exists: choose a new name (a backup never overwrites)", True)
    if not data_dir.is_dir():
        raise BackupError(f"--data-dir: {data_dir} is not a directory")
    keys = _read_keys(data_dir)
    dialect = _dialect(database)
    created = time.time() if now is None else now
    with tempfile.TemporaryDirectory(prefix=".anonticket-backup-", dir=out.parent) as scratch:
        snapshot: Path | None = None
        if isinstance(dialect, SQLiteDialect):
            snapshot = Path(scratch) / DATABASE_MEMBER
            schema = _sqlite_snapshot(Path(dialect.path), snapshot, keys[SECRET_KEY_FILE])
        else:
            schema = _check_postgresql(dialect, keys[SECRET_KEY_FILE])
        files: dict[str, dict[str, Any]] = {}
        if snapshot is not None:
            files[DATABASE_MEMBER] = _describe_file(snapshot)
        for name, data in keys.items():
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "anonticket": __version__,
            "created_at": _rfc3339(created),
            "database": dialect.name,
            "schema": schema,
            "files": files,
        }
        _write_archive(out, manifest, snapshot, keys, created)
    seed = keys.get(ONION_KEY_FILE)
    return BackupResult(out, manifest, None if seed is None else onion_address(seed))


def _read_keys(data_dir: Path) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for name in KEY_FILES:
        path = data_dir / name
        if not os.path.lexists(path):
            if name == SECRET_KEY_FILE:
                raise BackupError(f"{path} is missing: a backup without it restores nothing")
            continue
        try:
            keys[name] = read_private_file(path, MAX_KEY_FILE)
        except DataDirError as e:
            raise BackupError(str(e)) from None
    return keys


def _dialect(database: str) -> Dialect:
    try:
        return dialect_for(database)
    except Exception as e:  # DatabaseError: one line already
        raise BackupError(str(e)) from None


def _sqlite_snapshot(source: Path, snapshot: Path, key: bytes) -> int:
    """Copy the live database with SQLite's backup API (one step: a consistent snapshot as of
    one read transaction; the daemon's writers go on meanwhile, WAL lets them), make the copy a
    single self-contained file, check it, and return its schema version."""
    if not source.is_file():
        raise BackupError(f"no SQLite database at {source} (give --database if it is elsewhere)")
    # mode=ro: never create or change the daemon's file; the daemon's pragmas are not needed
    # to read it.  The busy timeout covers a checkpoint in progress.
    uri = f"file:{quote(str(source.resolve()))}?mode=ro"
    try:
        src = sqlite3.connect(uri, uri=True, timeout=30)
        try:
            dst = sqlite3.connect(snapshot)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one file: no -wal beside it
                return _checked(dst, key)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise BackupError(f"cannot copy the database {source}: {e}") from None


def _checked(conn: sqlite3.Connection, key: bytes) -> int:
    """The copy's schema, once it proved whole and written with ``key``."""
    verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    if verdict != "ok":
        raise BackupError(f"the database copy is damaged ({_printable(str(verdict))})", True)
    dialect = SQLiteDialect("")
    schema = dialect.schema_version(conn)
    if schema < 5:  # the key check came with schema 5
        raise BackupError(f"the database is at schema {schema}: start anonticket 0.2 on it first")
    try:
        check_key(dialect, conn, key)
    except DataDirError as e:
        raise BackupError(str(e), True) from None
    return schema


def _check_postgresql(dialect: Dialect, key: bytes) -> int:
    try:
        dialect.check_driver()
        conn = dialect.connect()
    except Exception as e:
        raise BackupError(f"cannot connect to the database: {_printable(str(e))}") from None
    try:
        schema = dialect.schema_version(conn)
        if schema < 5:
            raise BackupError(f"the database is at schema {schema}: start anonticket 0.2 first")
        check_key(dialect, conn, key)
        return schema
    except DataDirError as e:
        raise BackupError(str(e), True) from None
    finally:
        conn.close()


def _describe_file(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(mtime)
    info.type = tarfile.REGTYPE
    return info  # uid/gid 0 and no user names: the archive says nothing about this machine


def _write_archive(
    out: Path,
    manifest: dict[str, Any],
    snapshot: Path | None,
    keys: dict[str, bytes],
    mtime: float,
) -> None:
    # mkstemp creates 0600 whatever the umask: the keys are never readable by others, not
    # even for a moment; the name becomes ``out`` only once the archive is whole and on disk.
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                text = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
                tar.addfile(_member(MANIFEST, len(text), mtime), io.BytesIO(text))
                if snapshot is not None:
                    size = snapshot.stat().st_size
                    with snapshot.open("rb") as db:
                        tar.addfile(_member(DATABASE_MEMBER, size, mtime), db)
                for name, data in keys.items():
                    tar.addfile(_member(name, len(data), mtime), io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(partial, out)  # never replaces: a file made meanwhile is kept
        except FileExistsError:
            raise BackupError(f"{out} exists: choose a new name", True) from None
        fsync_dir(out.parent)
    except OSError as e:
        raise BackupError(f"cannot write {out}: {e.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


# ------------------------------------------------------------------------------ restore


@dataclass(frozen=True)
class RestoreResult:
    data_dir: Path
    database: str  # "sqlite" or "postgresql"
    database_path: Path | None
    manifest: dict[str, Any]
    files: list[str]
    onion_address: str | None


_ALLOWED: Final = frozenset({MANIFEST, DATABASE_MEMBER, *KEY_FILES})


def restore(archive: Path, data_dir: Path, database: str | None = None) -> RestoreResult:
    """Restore ``archive`` into ``data_dir``, which must be missing or empty.

    Every member is read into a staging directory inside the target first and checked there:
    only regular files with the names a backup writes (no path, no link, no device), sizes and
    SHA-256 as the manifest says, a schema this version knows, the database whole, and
    ``secret.key`` the key the database was written with.  Only then are the files moved into
    place (0600, the directory 0700), the database first and ``secret.key`` last.  A refused
    archive leaves the target as it was (a directory made for it is removed again).

    ``database``: where the SQLite database goes (``sqlite:///PATH``, default in the data
    directory), or the ``postgresql://`` database already restored with pg_restore, which the
    key is checked against (a PostgreSQL backup holds keys only)."""
    made = _prepare_target(data_dir)
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
        manifest, staged = _stage(archive, staging)
        kind = manifest["database"]
        db_path: Path | None = None
        if kind == "sqlite":
            target = database or f"sqlite:///{data_dir / DEFAULT_DATABASE_FILE}"
            dialect = _dialect(target)
            if not isinstance(dialect, SQLiteDialect):
                raise BackupError(
                    "this backup holds a SQLite database: --database must be a "
                    "sqlite:///PATH (or left out)",
                    True,
                )
            db_path = Path(dialect.path)
            if os.path.lexists(db_path):
                raise BackupError(f"{db_path} exists: restore into a new place", True)
            if DATABASE_MEMBER not in staged:
                raise BackupError("the archive holds no database", True)
            _check_staged_sqlite(staging / DATABASE_MEMBER, staged, manifest)
        else:
            if DATABASE_MEMBER in staged:
                raise BackupError("a PostgreSQL backup holds no database file: altered", True)
            if database is None or not database.startswith(("postgresql:", "postgres:")):
                raise BackupError(
                    "this backup holds the keys of a PostgreSQL database (no data): restore the "
                    "database with pg_restore first, then give --database postgresql://... so "
                    "that its key can be checked",
                    True,
                )
            schema = _check_postgresql(_dialect(database), staged[SECRET_KEY_FILE])
            if schema < int(manifest["schema"]):
                raise BackupError(
                    f"the database is at schema {schema}, older than the backup's "
                    f"{manifest['schema']}: is it the dump taken with these keys?",
                    True,
                )
        _move_into_place(staging, data_dir, db_path, list(staged))
    except BaseException:
        if staging is not None:
            _remove_tree(staging)
        if made:
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        raise
    _remove_tree(staging)
    seed = staged.get(ONION_KEY_FILE)
    files = [name for name in staged if name != DATABASE_MEMBER]
    return RestoreResult(
        data_dir,
        kind,
        db_path,
        manifest,
        files,
        None if seed is None else onion_address(seed),
    )


def _prepare_target(data_dir: Path) -> bool:
    """Check the target is missing or an empty directory; make it 0700 if missing.  Whether it
    was made here."""
    try:
        if os.path.lexists(data_dir):
            if not data_dir.is_dir():
                raise BackupError(f"{data_dir} exists and is not a directory", True)
            if any(data_dir.iterdir()):
                raise BackupError(
                    f"{data_dir} is not empty: restore into a new or empty directory (a restore "
                    "never mixes with or replaces a data directory)",
                    True,
                )
            data_dir.chmod(0o700)
            return False
        data_dir.mkdir(mode=0o700)
        data_dir.chmod(0o700)  # whatever the umask
        return True
    except OSError as e:
        raise BackupError(f"cannot use {data_dir}: {e.strerror}") from None


def _stage(archive: Path, staging: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read every member into ``staging``, refusing anything a backup does not write; the
    manifest and the key files' bytes (the database stays on disk)."""
    try:
        tar = tarfile.open(archive, mode="r:*")
    except FileNotFoundError:
        raise BackupError(f"{archive}: no such file") from None
    except tarfile.ReadError:
        raise BackupError(f"{archive} is not a tar archive (plain or compressed)", True) from None
    except (tarfile.TarError, OSError) as e:
        message = f"{archive} cannot be read ({_printable(str(e))})"
        raise BackupError(message, True) from None
    seen: dict[str, bytes] = {}
    manifest_text: bytes | None = None
    try:
        with tar:
            for member in _members(tar):
                name = member.name
                limit = MAX_MANIFEST if name == MANIFEST else MAX_KEY_FILE
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                if name == DATABASE_MEMBER:
                    _copy_out(source, staging / name, member.size)
                    seen[name] = b""
                    continue
                if member.size > limit:
                    raise BackupError(f"the archive's {name} is too large to be one", True)
                data = source.read(member.size)
                if name == MANIFEST:
                    manifest_text = data
                else:
                    _write_new(staging / name, data)
                seen[name] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        message = f"{archive} is damaged or unreadable ({_printable(str(e)) or 'truncated'})"
        raise BackupError(message, True) from None
    if manifest_text is None:
        raise BackupError(f"{archive} has no {MANIFEST}: it is not an anonticket backup", True)
    manifest = _manifest(manifest_text)
    _match_manifest(manifest, seen, staging)
    keys = {name: data for name, data in seen.items() if name != MANIFEST}
    return manifest, keys


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    names: set[str] = set()
    for member in tar:
        shown = _printable(member.name)
        if member.name not in _ALLOWED:
            raise BackupError(
                f"the archive holds {shown!r}, which no anonticket backup holds: refused", True
            )
        if not member.isreg():
            raise BackupError(f"the archive's {shown} is not a regular file: refused", True)
        if member.name in names:
            raise BackupError(f"the archive holds {shown} twice: refused", True)
        names.add(member.name)
        yield member


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_out(source: IO[bytes], path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        left = size
        while left:
            chunk = source.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise EOFError("the database member is truncated")
            f.write(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def _manifest(text: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    valid = (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and isinstance(manifest.get("files"), dict)
        and manifest.get("database") in ("sqlite", "postgresql")
        and isinstance(manifest.get("schema"), int)
        and not isinstance(manifest.get("schema"), bool)
    )
    if not valid:
        raise BackupError("the archive's manifest is not an anonticket backup's", True)
    assert isinstance(manifest, dict)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(
            f"the backup's format version {manifest.get('format_version')!r} is not "
            f"{FORMAT_VERSION}: restore it with the anonticket version that made it "
            f"({_printable(str(manifest.get('anonticket')))})",
            True,
        )
    newest = known_schema()
    if manifest["schema"] > newest:
        raise BackupError(
            f"the backup is of schema {manifest['schema']}, newer than this anonticket knows "
            f"({newest}): restore it with anonticket {_printable(str(manifest.get('anonticket')))}"
            " or later",
            True,
        )
    return manifest


def _match_manifest(manifest: dict[str, Any], seen: dict[str, bytes], staging: Path) -> None:
    listed: dict[str, Any] = manifest["files"]
    present = set(seen) - {MANIFEST}
    if set(listed) != present:
        missing = sorted(set(listed) - present)
        extra = sorted(present - set(listed))
        raise BackupError(
            f"the archive does not hold what its manifest lists (missing {missing}, "
            f"unlisted {extra}): damaged or altered",
            True,
        )
    if SECRET_KEY_FILE not in present:
        raise BackupError(f"the archive holds no {SECRET_KEY_FILE}", True)
    for name in sorted(present):
        entry = listed[name]
        if not isinstance(entry, dict):
            raise BackupError("the archive's manifest is not an anonticket backup's", True)
        described = (
            _describe_file(staging / name)
            if name == DATABASE_MEMBER
            else {"size": len(seen[name]), "sha256": hashlib.sha256(seen[name]).hexdigest()}
        )
        if (entry.get("size"), entry.get("sha256")) != (described["size"], described["sha256"]):
            raise BackupError(f"the archive's {name} is not what was backed up: damaged", True)
        expected = _FIXED_SIZE.get(name)
        if expected is not None and described["size"] != expected:
            raise BackupError(f"the archive's {name} is not {expected} bytes", True)


def _check_staged_sqlite(path: Path, keys: dict[str, bytes], manifest: dict[str, Any]) -> None:
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            schema = _checked(conn, keys[SECRET_KEY_FILE])
        finally:
            conn.close()
    except sqlite3.Error as e:
        message = f"the archive's database is damaged ({_printable(str(e))})"
        raise BackupError(message, True) from None
    except BackupError as e:
        raise BackupError(f"refused: {e}", True) from None
    if schema != manifest["schema"]:
        raise BackupError("the archive's database is not at the schema its manifest says", True)


def _move_into_place(staging: Path, data_dir: Path, db_path: Path | None, names: list[str]) -> None:
    """The database first, then the keys with ``secret.key`` last (see KEY_FILES)."""
    try:
        if db_path is not None:
            _place(staging / DATABASE_MEMBER, db_path)
        for name in KEY_FILES:
            if name in names:
                _place(staging / name, data_dir / name)
        fsync_dir(data_dir)
    except OSError as e:
        raise BackupError(f"cannot restore into {data_dir}: {e.strerror}") from None


def _place(source: Path, destination: Path) -> None:
    """Move a staged file into place, never over an existing one; across file systems (a
    database put elsewhere) by a copy that becomes the file only once whole."""
    try:
        os.link(source, destination)
        os.unlink(source)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):  # no hard link here
            raise
    fd, partial = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.link(partial, destination)
    finally:
        os.unlink(partial)
    fsync_dir(destination.parent)
    os.unlink(source)


def _remove_tree(path: Path) -> None:
    """Remove a staging directory (ours, made by mkdtemp)."""
    shutil.rmtree(path, ignore_errors=True)
