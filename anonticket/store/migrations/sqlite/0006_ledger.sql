-- The ledger of credits and spends (SPEC §12, docs/spending.md).
--
-- tokens.version grows by one with every change of the token (a claim or top-up, a spend, a
-- reversal, a restoration, a revoke): the service's If-Match and the spend's compare-and-swap
-- both read it.  A token of an earlier schema starts above every version it could have shown.
-- tokens.spent is what spends took; credited = balance + spent + reversed_amount.
ALTER TABLE tokens ADD COLUMN version INTEGER NOT NULL DEFAULT 1 CHECK (version >= 1);
ALTER TABLE tokens ADD COLUMN spent INTEGER NOT NULL DEFAULT 0 CHECK (spent >= 0);

-- The ledger gains kinds 0 credit (one entry per claimed payment) and 1 spend (with its id and
-- memo).  Every claimed payment of an earlier schema becomes a credit, and the table is rebuilt
-- so that entries stay in the order they happened (the ledger view pages by entry id).
CREATE TABLE ledger_new (
    id         INTEGER PRIMARY KEY,
    token_id   INTEGER NOT NULL REFERENCES tokens (id),
    kind       INTEGER NOT NULL CHECK (kind BETWEEN 0 AND 3),
    amount     INTEGER NOT NULL CHECK (amount > 0),
    payment_id INTEGER REFERENCES payments (id),
    at         INTEGER NOT NULL,
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
    ) ORDER BY at, later, n;
DROP TABLE ledger;
ALTER TABLE ledger_new RENAME TO ledger;
CREATE INDEX ledger_by_token ON ledger (token_id, id);
UPDATE tokens SET version = 1 + (revoked_at IS NOT NULL)
    + (SELECT count(*) FROM ledger WHERE ledger.token_id = tokens.id);

-- Idempotency-Key answers of the spend route, so that a retried spend is applied once and
-- answered as the first time.  The key and the request's fingerprint (token, amount, memo) are
-- keyed tags under secret.key; the answer is what the service saw: the outcome (0 spent,
-- 1 insufficient balance, 2 revoked, 3 suspended) and the balance, version and spend id.
CREATE TABLE idempotency (
    key_tag     BLOB    PRIMARY KEY,
    fingerprint BLOB    NOT NULL,
    outcome     INTEGER NOT NULL CHECK (outcome BETWEEN 0 AND 3),
    balance     INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    spend_id    TEXT,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_by_age ON idempotency (created_at);
