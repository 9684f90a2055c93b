-- Events for the service (SPEC §13, docs/webhooks.md): a transactional outbox.
--
-- tokens.token_id: SHA-256 of the token, the id events name it by (the service computes it from
-- a token a user shows; it is not the token).  Stored only while --webhook-url is set, from the
-- first change that knows the token (a redeem, a spend, a revoke, a reversal the wallet
-- reports): a reversal found by absence knows only the PID's tag, so it reads it from here.
ALTER TABLE tokens ADD COLUMN token_id BLOB CHECK (token_id IS NULL OR length(token_id) = 32);

-- One row per event, written in the transaction of the change.  token_row orders the events
-- of one token (delivered in id order, one at a time); state 0 waiting, 1 delivered, 2 failed
-- (retries used up; kept until retried from the internal site).  leased_until: a node
-- delivering the event holds it until then (another takes over after); lease_owner: which
-- node (<data-dir>/node.id), so that a node restarted after a crash takes its own back at once.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT    NOT NULL UNIQUE,
    token_row       INTEGER NOT NULL REFERENCES tokens (id),
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    state           INTEGER NOT NULL DEFAULT 0 CHECK (state BETWEEN 0 AND 2),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    leased_until    INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    settled_at      INTEGER,
    last_error      TEXT
);
CREATE INDEX outbox_waiting ON outbox (state, next_attempt_at);
CREATE INDEX outbox_by_token ON outbox (token_row, state, id);
