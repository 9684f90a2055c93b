-- See the SQLite migration of the same number: events for the service, a transactional outbox.
ALTER TABLE tokens ADD COLUMN token_id BYTEA
    CHECK (token_id IS NULL OR octet_length(token_id) = 32);

CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        TEXT     NOT NULL UNIQUE,
    token_row       BIGINT   NOT NULL REFERENCES tokens (id),
    body            TEXT     NOT NULL,
    created_at      BIGINT   NOT NULL,
    state           SMALLINT NOT NULL DEFAULT 0 CHECK (state BETWEEN 0 AND 2),
    attempts        INTEGER  NOT NULL DEFAULT 0,
    next_attempt_at BIGINT   NOT NULL,
    leased_until    BIGINT   NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    settled_at      BIGINT,
    last_error      TEXT
);
CREATE INDEX outbox_waiting ON outbox (state, next_attempt_at);
CREATE INDEX outbox_by_token ON outbox (token_row, state, id);
