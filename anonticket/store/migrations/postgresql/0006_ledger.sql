-- See the SQLite migration of the same number: the ledger of credits and spends.
ALTER TABLE tokens ADD COLUMN version BIGINT NOT NULL DEFAULT 1 CHECK (version >= 1);
ALTER TABLE tokens ADD COLUMN spent BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0);

CREATE TABLE ledger_new (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_id   BIGINT   NOT NULL REFERENCES tokens (id),
    kind       SMALLINT NOT NULL CHECK (kind BETWEEN 0 AND 3),
    amount     BIGINT   NOT NULL CHECK (amount > 0),
    payment_id BIGINT   REFERENCES payments (id),
    at         BIGINT   NOT NULL,
    spend_id   TEXT,
    memo       TEXT
);
INSERT INTO ledger_new (token_id, kind, amount, payment_id, at)
    SELECT token_id, kind, amount, payment_id, at FROM (
        SELECT t.id AS token_id, 0 AS kind, p.amount AS amount, p.id AS payment_id,
               coalesce(p.claimed_at, t.issued_at) AS at, 0 AS later, p.id AS n
        FROM payments p JOIN tokens t ON t.pid_tag = p.pid_tag
        WHERE p.status = 2 AND p.amount > 0
        UNION ALL
        SELECT token_id, kind, amount, payment_id, at, 1, id FROM ledger
    ) AS entries ORDER BY at, later, n;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
ALTER INDEX ledger_new_pkey RENAME TO ledger_pkey;
CREATE INDEX ledger_by_token ON ledger (token_id, id);
UPDATE tokens SET version = 1 + (CASE WHEN revoked_at IS NULL THEN 0 ELSE 1 END)
    + (SELECT count(*) FROM ledger WHERE ledger.token_id = tokens.id);

CREATE TABLE idempotency (
    key_tag     BYTEA    PRIMARY KEY,
    fingerprint BYTEA    NOT NULL,
    outcome     SMALLINT NOT NULL CHECK (outcome BETWEEN 0 AND 3),
    balance     BIGINT   NOT NULL,
    version     BIGINT   NOT NULL,
    spend_id    TEXT,
    created_at  BIGINT   NOT NULL
);
CREATE INDEX idempotency_by_age ON idempotency (created_at);
