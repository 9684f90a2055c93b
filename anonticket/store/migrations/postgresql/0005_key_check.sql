-- See the SQLite migration of the same number: facts about the store (the secret.key check).
CREATE TABLE store_meta (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
