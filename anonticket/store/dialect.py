"""The tiny seam between the store's SQL and a database driver.

Everything that differs between SQLite and PostgreSQL lives here: the DB-API module adbapi
loads, how a connection is set up, how a write transaction begins, the parameter style, and
which migration files apply.  Queries are written once, with ``?`` placeholders.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

MIN_SQLITE: Final = (3, 35, 0)  # UPDATE ... RETURNING


class DatabaseError(Exception):
    """The database cannot be opened or migrated; the message is safe for a log line."""


class Dialect(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def module(self) -> str:
        """The DB-API module adbapi loads."""

    @property
    def begin_write(self) -> str:
        """The statement that starts a write transaction, taking the write lock up front."""

    @property
    def batch_transaction(self) -> bool:
        """Whether a batch of operations that writes runs in one transaction (see batch.py)."""

    def start_write(self, cursor: Any) -> None:
        """Begin the operation's write transaction, unless its batch runs in one already."""

    @property
    def next_token_change(self) -> str:
        """An SQL expression: the next ``tokens.changed_seq`` (inside a write transaction)."""

    @property
    def skip_locked(self) -> str:
        """Appended to a SELECT that takes rows for this node: skip those another is taking."""

    def check_driver(self) -> None: ...

    def sql(self, text: str) -> str: ...

    def connect_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]: ...

    def on_connect(self, conn: Any) -> None: ...

    def connect(self) -> Any: ...

    def pool_kwargs(self) -> dict[str, Any]: ...

    def migrations(self) -> list[tuple[int, str]]: ...

    def apply_migration(self, conn: Any, version: int, script: str) -> bool: ...

    def schema_version(self, conn: Any) -> int: ...


def _migrations(name: str) -> list[tuple[int, str]]:
    folder = resources.files("anonticket.store") / "migrations" / name
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(found)


WAL_CHECKPOINT_PAGES: Final = 250  # see SQLiteDialect.on_connect


@dataclass(frozen=True)
class SQLiteDialect:
    path: str
    busy_timeout_ms: int = 5000
    name: str = "sqlite"
    module: str = "sqlite3"
    begin_write: str = "BEGIN IMMEDIATE"
    # One connection, one writer at a time: a batch in one transaction commits (writes its
    # pages to the WAL) once instead of once per operation.
    batch_transaction: bool = True
    # Writers are serialised by the write lock, so this is unique and in commit order.
    next_token_change: str = "(SELECT max(changed_seq) + 1 FROM tokens)"
    skip_locked: str = ""  # one writer at a time: nobody else is taking rows meanwhile
    extra: dict[str, Any] = field(default_factory=dict)

    def start_write(self, cursor: Any) -> None:
        if not cursor.connection.in_transaction:
            cursor.execute(self.begin_write)

    def check_driver(self) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise DatabaseError(
                f"SQLite {sqlite3.sqlite_version} is too old: anonticket needs 3.35 or newer "
                "(for UPDATE ... RETURNING)"
            )

    def sql(self, text: str) -> str:
        return text

    def connect_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # check_same_thread=False: adbapi closes every thread's connection from the reactor
        # thread.  isolation_level=None: no implicit BEGIN; we BEGIN IMMEDIATE ourselves so a
        # writer takes the lock up front instead of failing on a read-to-write upgrade.
        return (self.path,), {
            "check_same_thread": False,
            "isolation_level": None,
            "timeout": self.busy_timeout_ms / 1000,
        }

    def on_connect(self, conn: Any) -> None:
        """Applied to every pooled connection (cp_openfun), not just the first."""
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys=ON")
        # Checkpoint every 250 WAL pages (1 MB) instead of 1,000: a checkpoint runs in the
        # committing call and ends with two fsyncs, stalling every request queued behind it;
        # smaller ones stall less (the figures: docs/performance.md, "What each optimisation
        # bought").
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")

    def connect(self) -> Any:
        args, kwargs = self.connect_args()
        conn = sqlite3.connect(*args, **kwargs)
        self.on_connect(conn)
        return conn

    def pool_kwargs(self) -> dict[str, Any]:
        # One connection: SQLite has one writer anyway, and a single thread keeps every
        # transaction strictly ordered without "database is locked" retries.
        return {"cp_min": 1, "cp_max": 1}

    def migrations(self) -> list[tuple[int, str]]:
        return _migrations(self.name)

    def apply_migration(self, conn: Any, version: int, script: str) -> bool:
        """Apply one migration atomically; False if another process got there first."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current >= version:
                conn.execute("ROLLBACK")
                return False
            # executescript() would COMMIT first; run statement by statement inside our BEGIN.
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return True

    def schema_version(self, conn: Any) -> int:
        row = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if row is None:
            return 0
        return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)


def _statements(script: str) -> list[str]:
    """Split a migration into statements with SQLite's own parser (no naive ';' split)."""
    statements = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        raise DatabaseError("migration ends with an incomplete statement")
    return statements


# Every node migrating one PostgreSQL database takes this lock first (any constant will do).
_MIGRATION_LOCK: Final = 0x616E6F6E  # "anon"


@dataclass(frozen=True)
class PostgresDialect:
    """PostgreSQL through psycopg 3: several nodes can share one database.

    Connections run in autocommit mode and write units say BEGIN themselves, as with SQLite;
    under READ COMMITTED the claim's ``UPDATE ... RETURNING`` makes a concurrent loser wait on
    the row lock, re-check, and get no row, which is what exactly-once needs.
    """

    url: str
    connect_timeout: int = 10
    statement_timeout_ms: int = 30_000
    name: str = "postgresql"
    module: str = "psycopg"
    begin_write: str = "BEGIN"
    # Several connections and nodes: a long transaction holding the row locks of a whole
    # batch could deadlock with another node's; every operation commits on its own.
    batch_transaction: bool = False
    next_token_change: str = "nextval('token_changes')"
    skip_locked: str = " FOR UPDATE SKIP LOCKED"

    def start_write(self, cursor: Any) -> None:
        cursor.execute(self.begin_write)

    def check_driver(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise DatabaseError(
                "--database: PostgreSQL needs psycopg: pip install 'anonticket[postgresql]'"
            ) from None

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def connect_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.url,), {"autocommit": True, "connect_timeout": self.connect_timeout}

    def on_connect(self, conn: Any) -> None:
        conn.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")

    def connect(self) -> Any:
        import psycopg

        args, kwargs = self.connect_args()
        conn = psycopg.connect(*args, **kwargs)
        self.on_connect(conn)
        return conn

    def pool_kwargs(self) -> dict[str, Any]:
        # Several connections: PostgreSQL takes concurrent writers; a broken connection (a
        # restarted server) is replaced instead of failing every later call.
        return {"cp_min": 1, "cp_max": 4, "cp_reconnect": True}

    def migrations(self) -> list[tuple[int, str]]:
        return _migrations(self.name)

    def apply_migration(self, conn: Any, version: int, script: str) -> bool:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current >= version:
                return False
            conn.execute(script)  # no parameters: several statements are allowed
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        return True

    def schema_version(self, conn: Any) -> int:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            return 0
        return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)


def dialect_for(database: str) -> Dialect:
    if database.startswith("sqlite:///"):
        return SQLiteDialect(database[len("sqlite:///") :])
    if urlsplit(database).scheme in ("postgresql", "postgres"):
        return PostgresDialect(database)
    raise DatabaseError("--database: expected sqlite:///PATH or postgresql://...")
