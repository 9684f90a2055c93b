-- anonticket schema v1 (PostgreSQL): the same tables as the SQLite schema, in PostgreSQL types.
-- No usable secret at rest: PIDs and tokens appear only as keyed BLAKE2b tags (secret.key).

CREATE TABLE monitor_state (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

CREATE TABLE payments (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txid          BYTEA    NOT NULL CHECK (octet_length(txid) = 32),
    subaddr_major BIGINT   NOT NULL,
    subaddr_minor BIGINT   NOT NULL,
    pid_tag       BYTEA    NOT NULL,
    amount        BIGINT   NOT NULL CHECK (amount >= 0),
    height        BIGINT   NOT NULL CHECK (height >= 0),
    status        SMALLINT NOT NULL CHECK (status BETWEEN 0 AND 4),
    seen_at       BIGINT   NOT NULL,
    claimed_at    BIGINT,
    UNIQUE (txid, subaddr_major, subaddr_minor)
);
CREATE INDEX payments_by_pid ON payments (pid_tag, status);

CREATE TABLE tokens (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_tag     BYTEA    NOT NULL UNIQUE,
    pid_tag       BYTEA    NOT NULL UNIQUE,
    first_txid    BYTEA    NOT NULL CHECK (octet_length(first_txid) = 32),
    balance       BIGINT   NOT NULL CHECK (balance >= 0),
    issued_at     BIGINT   NOT NULL,
    revoked_at    BIGINT,
    revoke_reason TEXT,
    abuse_score   SMALLINT NOT NULL DEFAULT 0
);
