-- See the SQLite migration of the same number: reversals are part of the books.
ALTER TABLE payments RENAME COLUMN flagged_at TO reversed_at;
UPDATE payments SET status = 0 WHERE status = 1 AND reversed_at IS NOT NULL;

-- A reversal can take a token's balance below zero; reversed_amount is what was reversed and
-- not restored (a token whose balance a reversal took to zero or below is "suspended").
ALTER TABLE tokens DROP CONSTRAINT tokens_balance_check;
ALTER TABLE tokens ADD COLUMN reversed_amount BIGINT NOT NULL DEFAULT 0
    CHECK (reversed_amount >= 0);

CREATE TABLE ledger (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_id   BIGINT   NOT NULL REFERENCES tokens (id),
    kind       SMALLINT NOT NULL CHECK (kind BETWEEN 0 AND 3),
    amount     BIGINT   NOT NULL CHECK (amount > 0),
    payment_id BIGINT   REFERENCES payments (id),
    at         BIGINT   NOT NULL
);
CREATE INDEX ledger_by_token ON ledger (token_id, id);

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
    changed_seq = nextval('token_changes')
WHERE EXISTS (SELECT 1 FROM payments p WHERE p.pid_tag = tokens.pid_tag AND p.status = 2
              AND p.reversed_at IS NOT NULL);
