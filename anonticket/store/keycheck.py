"""The database and its secret.key belong together: check it before serving anything.

Every PID and token is stored as a keyed tag under ``secret.key``.  A database restored without
its key (or with another one) would run and answer "not found" for every payment and token.
So the database keeps a *key check* - the tag of a fixed text under the key - and start-up
compares it; and a database holding payments never gets a new key made for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from anonticket.keys import SECRET_KEY_FILE, DataDirError, Tagger, load_or_create_secret_key
from anonticket.store.dialect import Dialect

_NAME: Final = "key_check"


def open_key(dialect: Dialect, conn: Any, data_dir: Path) -> Tagger:
    """The data directory's key as a Tagger, checked against the database (``conn``, migrated).

    Refuses, with one line: a missing ``secret.key`` for a database that holds payments or
    tokens (it is not made anew), and a key whose check differs from the stored one.  Stores the
    check on first use (a new database, or one from before the check existed)."""
    if not (data_dir / SECRET_KEY_FILE).exists() and _holds_data(conn):
        raise DataDirError(
            f"{data_dir / SECRET_KEY_FILE} is missing but the database holds payments: restore "
            "the secret.key backed up with this database (a new key would match nothing)"
        )
    tagger = Tagger(load_or_create_secret_key(data_dir))
    check = tagger.key_check()
    stored = _stored(dialect, conn)
    if stored is None:
        _store(dialect, conn, check)
        stored = _stored(dialect, conn)  # another node may have stored its own first
    if stored != check:
        raise DataDirError(
            f"{data_dir / SECRET_KEY_FILE} is not the key this database was written with: "
            "restore the secret.key backed up with this database"
        )
    return tagger


def _holds_data(conn: Any) -> bool:
    for table in ("payments", "tokens"):
        if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
            return True
    return False


def _stored(dialect: Dialect, conn: Any) -> bytes | None:
    row = conn.execute(
        dialect.sql("SELECT value FROM store_meta WHERE name = ?"), (_NAME,)
    ).fetchone()
    return None if row is None else bytes(row[0])


def _store(dialect: Dialect, conn: Any, check: bytes) -> None:
    conn.execute(dialect.begin_write)
    try:
        conn.execute(
            dialect.sql(
                "INSERT INTO store_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
            ),
            (_NAME, check),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def check_key(dialect: Dialect, conn: Any, key: bytes) -> None:
    """Refuse, with one line, unless ``key`` is the key the database (``conn``, migrated to
    schema 5 or later) was written with; read only: nothing is stored (restores and backups
    check what they copy with it, before anything can start on it)."""
    stored = _stored(dialect, conn)
    if stored is None:
        if _holds_data(conn):
            raise DataDirError(
                "the database holds payments but no check of its key: it was never opened by "
                "anonticket 0.2 or later, so the key cannot be verified"
            )
        return
    if stored != Tagger(key).key_check():
        raise DataDirError(f"{SECRET_KEY_FILE} is not the key this database was written with")
