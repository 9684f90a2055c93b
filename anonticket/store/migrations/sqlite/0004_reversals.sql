-- Reversals are part of the books (docs/monitor.md, "Reversals").
--
-- payments.reversed_at (was flagged_at): set while a credited transfer is reversed - the wallet
-- reports it in the pool, unconfirmed, or not at all after a reorg or a double spend.  A claimed
-- reversed row stays claimed (its token was derived from it) and its amount is off the token's
-- balance until the transfer is confirmed again; an unclaimed one is pending again (status 0).
ALTER TABLE payments RENAME COLUMN flagged_at TO reversed_at;
UPDATE payments SET status = 0 WHERE status = 1 AND reversed_at IS NOT NULL;

-- A reversal can take a token's balance below zero, so the balance check goes (SQLite cannot
-- drop a CHECK constraint: the table is rebuilt as it was), and the token keeps the amount
-- reversed and not restored: a token whose balance a reversal took to zero or below is
-- "suspended" until the money is back.
CREATE TABLE tokens_new (
    id            INTEGER PRIMARY KEY,
    token_tag     BLOB    NOT NULL UNIQUE,
    pid_tag       BLOB    NOT NULL UNIQUE,
    first_txid    BLOB    NOT NULL CHECK (length(first_txid) = 32),
    balance       INTEGER NOT NULL,
    issued_at     INTEGER NOT NULL,
    revoked_at    INTEGER,
    revoke_reason TEXT,
    abuse_score   INTEGER NOT NULL DEFAULT 0,
    changed_seq   INTEGER NOT NULL DEFAULT 0,
    -- Reversed and not restored (reversals minus restorations): while it is above zero and the
    -- balance is not, the token is "suspended".
    reversed_amount INTEGER NOT NULL DEFAULT 0 CHECK (reversed_amount >= 0)
);
INSERT INTO tokens_new (id, token_tag, pid_tag, first_txid, balance, issued_at, revoked_at,
                        revoke_reason, abuse_score, changed_seq)
    SELECT id, token_tag, pid_tag, first_txid, balance, issued_at, revoked_at, revoke_reason,
           abuse_score, changed_seq FROM tokens;
DROP TABLE tokens;
ALTER TABLE tokens_new RENAME TO tokens;
CREATE INDEX tokens_by_change ON tokens (changed_seq);

-- The token's book of what the chain took back and gave again: kind 2 = reversal, 3 =
-- restoration (anonticket.store.records.LedgerKind; credits and spends join it later).  Amounts
-- are positive; the kind says which way.  It names the payment row, never a txid or a PID.
CREATE TABLE ledger (
    id         INTEGER PRIMARY KEY,
    token_id   INTEGER NOT NULL REFERENCES tokens (id),
    kind       INTEGER NOT NULL CHECK (kind BETWEEN 0 AND 3),
    amount     INTEGER NOT NULL CHECK (amount > 0),
    payment_id INTEGER REFERENCES payments (id),
    at         INTEGER NOT NULL
);
CREATE INDEX ledger_by_token ON ledger (token_id, id);

-- Claimed transfers flagged by an earlier version were kept on their tokens: take them off now.
INSERT INTO ledger (token_id, kind, amount, payment_id, at)
    SELECT t.id, 2, p.amount, p.id, p.reversed_at
    FROM payments p JOIN tokens t ON t.pid_tag = p.pid_tag
    WHERE p.status = 2 AND p.reversed_at IS NOT NULL AND p.amount > 0;
UPDATE tokens SET
    balance = balance - (SELECT sum(p.amount) FROM payments p
                         WHERE p.pid_tag = tokens.pid_tag AND p.status = 2
                         AND p.reversed_at IS NOT NULL),
    reversed_amount = (SELECT sum(p.amount) FROM payments p
                       WHERE p.pid_tag = tokens.pid_tag AND p.status = 2
                       AND p.reversed_at IS NOT NULL),
    changed_seq = (SELECT max(changed_seq) + 1 FROM tokens)
WHERE EXISTS (SELECT 1 FROM payments p WHERE p.pid_tag = tokens.pid_tag AND p.status = 2
              AND p.reversed_at IS NOT NULL);
