"""The schema brought up to date at start, and refused when a newer anonticket wrote it."""

from __future__ import annotations

from twisted.logger import Logger

from anonticket import __version__
from anonticket.store.dialect import DatabaseError, Dialect

# The namespace these lines had before the store package was split: log filters keep working.
log = Logger(namespace="anonticket.store")


def migrate(dialect: Dialect) -> int:
    """Bring the schema up to date; each migration once, in order, in its own transaction."""
    try:
        conn = dialect.connect()
    except Exception as e:  # the driver's own error types differ per database
        raise DatabaseError(f"cannot open the database: {e}") from None
    try:
        known = dialect.migrations()
        found = dialect.schema_version(conn)
        if known and found > known[-1][0]:
            # A newer anonticket wrote this database (a rollback without restoring the backup
            # taken before the upgrade): its tables may mean things this version does not know.
            raise DatabaseError(
                f"the database is at schema version {found}, newer than this anonticket "
                f"{__version__} knows ({known[-1][0]}): run the newer version, or restore the "
                "backup taken before the upgrade (docs/admin.md)"
            )
        for version, script in known:
            if dialect.apply_migration(conn, version, script):
                log.info("database migrated to schema version {version}", version=version)
        return dialect.schema_version(conn)
    except DatabaseError:
        raise
    except Exception as e:
        raise DatabaseError(f"cannot migrate the database: {e}") from None
    finally:
        conn.close()
