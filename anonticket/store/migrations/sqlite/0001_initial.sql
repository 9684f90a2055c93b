-- anonticket schema v1 (SQLite).
-- No usable secret at rest: PIDs and tokens appear only as keyed BLAKE2b tags (secret.key).
-- Statuses are small integers (see anonticket.store.records.PaymentStatus).

CREATE TABLE monitor_state (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- One row per incoming transfer: a transaction can pay several subaddresses, so the identity is
-- the txid plus the subaddress index.  Several payments to one PID are all kept and summed.
CREATE TABLE payments (
    id            INTEGER PRIMARY KEY,
    txid          BLOB    NOT NULL CHECK (length(txid) = 32),
    subaddr_major INTEGER NOT NULL,
    subaddr_minor INTEGER NOT NULL,
    pid_tag       BLOB    NOT NULL,
    amount        INTEGER NOT NULL CHECK (amount >= 0),
    height        INTEGER NOT NULL CHECK (height >= 0),  -- 0 while in the pool
    status        INTEGER NOT NULL CHECK (status BETWEEN 0 AND 4),
    seen_at       INTEGER NOT NULL,
    claimed_at    INTEGER,
    UNIQUE (txid, subaddr_major, subaddr_minor)
);
CREATE INDEX payments_by_pid ON payments (pid_tag, status);

-- One token per PID.  first_txid is the txid the token was derived from; the token itself is
-- not stored, it is re-derived from the PID the client sends.
CREATE TABLE tokens (
    id            INTEGER PRIMARY KEY,
    token_tag     BLOB    NOT NULL UNIQUE,
    pid_tag       BLOB    NOT NULL UNIQUE,
    first_txid    BLOB    NOT NULL CHECK (length(first_txid) = 32),
    balance       INTEGER NOT NULL CHECK (balance >= 0),
    issued_at     INTEGER NOT NULL,
    revoked_at    INTEGER,
    revoke_reason TEXT,
    abuse_score   INTEGER NOT NULL DEFAULT 0
);
