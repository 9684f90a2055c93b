-- Facts about the store itself.  key_check: a keyed tag of a fixed text under secret.key, so
-- a database restored without its secret.key (every PID and token tag would silently miss)
-- stops start-up with one line instead (anonticket.store.keycheck).
CREATE TABLE store_meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
